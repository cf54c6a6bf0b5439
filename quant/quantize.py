"""fp32 bundle -> int8 / int4 / fp16 bundle, with the accuracy it cost measured and written in.

The parent is read only: its manifest and every file's sha256 are checked before anything is
written, the child is built in a temporary folder beside OUT and renamed into place only when
complete, so a failure never leaves half a bundle behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import DataError
from proassist_edge.manifest import (
    MANIFEST,
    GraphEntry,
    Manifest,
    load_manifest,
    sha256_file,
    write_manifest,
)
from proassist_edge.progress import Stages
from proassist_edge.quant import graphs as G
from proassist_edge.quant.calibration import (
    FeedReader,
    FeedRecorder,
    Stream,
    episode_streams,
    frame_streams,
    plain_streams,
    record_feeds,
    vision_feeds,
)
from proassist_edge.quant.embeddings import EMBEDDING_DTYPES, convert_embeddings
from proassist_edge.quant.graphs import QuantizeError, Recipe
from proassist_edge.quant.report import (
    TARGETS,
    Evaluator,
    Targets,
    bundle_size,
    compare_decoders,
    compare_vision,
    graph_sizes,
    paper_metrics,
)
from proassist_edge.quant.sensitivity import explain_misses
from proassist_edge.runtime.bundle import Bundle, open_bundle

PRECISIONS = ("int8", "int4", "fp16")


@dataclass(frozen=True)
class Budget:
    """How much the comparison costs: held-out streams and their frames (calibration draws as
    many), the frames the non-default decoder variants replay (None: all of every stream;
    the QDQ graph, TensorRT's form, runs several times slower than the others on CPU), and
    whether a missed target starts the per-layer sensitivity scan."""

    streams: int
    frames: int
    other_frames: int | None
    sensitivity: bool


BUDGETS = {
    "quick": Budget(1, 40, 16, False),
    "standard": Budget(2, 60, 20, True),
    "thorough": Budget(3, 120, None, True),
}
SKIPPABLE = ("vision", "decoder")
REPORT = "quant_report.json"


@dataclass(frozen=True)
class Job:
    """One graph of the child: NAME made from the parent's SOURCE graph by RECIPE (None: copied)."""

    name: str
    source: str
    recipe: Recipe | None
    why: str


def plan(pm: Manifest, precision: str, skip: Collection[str], recipe: Recipe) -> list[Job]:
    jobs = []
    for name, g in pm.graphs.items():
        is_decoder = g.variant in ("portable", "optimized")
        if name == "vision" and "vision" not in skip:
            vr = replace(recipe, precision="fp16" if precision == "fp16" else "int8-qdq")
            jobs.append(Job(name, name, vr, "frames calibrate the vision tower separately"))
        elif is_decoder and "decoder" not in skip:
            jobs.append(Job(name, name, recipe, f"{g.variant} decoder"))
            if precision == "int8" and g.variant == "portable":
                qdq = replace(recipe, precision="int8-qdq")
                jobs.append(Job(f"{name}_qdq", name, qdq, "static QDQ of the portable graph, for TensorRT"))
        else:
            why = "skipped on request" if (is_decoder or name == "vision") else "small; kept fp32"
            jobs.append(Job(name, name, None, why))
    return jobs


def check_options(precision: str, skip: Collection[str], block_size: int, accuracy_level: int | None,
                  streams: int, frames: int, embeddings: str | None) -> None:
    if precision not in PRECISIONS:
        raise QuantizeError(f"precision {precision!r}: choose one of {PRECISIONS}")
    if bad := set(skip) - set(SKIPPABLE):
        raise QuantizeError(f"cannot skip {sorted(bad)}: choose from {SKIPPABLE}")
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block size {block_size}: use a power of two >= 16 (32, 64 or 128)")
    if accuracy_level is not None and accuracy_level not in range(5):
        raise QuantizeError(f"accuracy level {accuracy_level}: use 0-4 (4 = int8 compute on CPU)")
    if streams < 1 or frames < 2:
        raise QuantizeError("at least one stream of two frames is needed to calibrate and compare")
    if embeddings is not None and embeddings not in ("float32", "float16", "int8"):
        raise QuantizeError(f"embedding dtype {embeddings!r}: choose float32, float16 or int8")


def check_parent(pm: Manifest, parent: Path, out: Path) -> None:
    lowered = {n: g.precision for n, g in pm.graphs.items() if g.precision != "fp32"}
    if lowered or pm.embeddings.get("dtype", "float32") != "float32":
        raise QuantizeError(
            f"{parent} is already quantized ({lowered or pm.embeddings.get('dtype')}): "
            "quantize its fp32 parent instead (see its manifest's source.parent), or export "
            "the checkpoint again at fp32 (proassist-edge export CKPT -o BUNDLE)"
        )
    if out.resolve().is_relative_to(parent.resolve()):
        raise QuantizeError(f"{out} lies inside the parent bundle {parent}: write the child elsewhere")


def quantize_bundle(
    parent: str | Path, out: str | Path, precision: str = "int8", calibration: str | None = None,
    block_size: int = 32, accuracy_level: int | None = 4, skip: Collection[str] = (),
    keep_fp32: Sequence[str] = (), eval_data: str | Path | None = None, streams: int | None = None,
    frames: int | None = None, *, budget: str = "standard", embeddings: str | None = None,
    reply_tokens: int = 16,
    per_channel: bool = True, keep_8bit: Sequence[str] = (), max_calibration_samples: int = 128,
    targets: Targets | None = None,
    sensitivity_on_miss: bool | None = None, threads: int = 0, progress: bool = True,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """Write the quantized child of the fp32 bundle PARENT into OUT (which must not exist).

    Returns the report also written as OUT/quant_report.json. `calibration`: None/"synthetic" or
    a task-world split folder (episodes/*/frames.npy). `keep_fp32`: node-name or module-path
    patterns ("lm_head", "layers.3.", "decoder:layers.0.*", "vision:projector"). `keep_8bit`:
    patterns whose nodes an int4 decoder keeps in 8-bit blocks ("lm_head"). `evaluator` (bundle,
    data) -> metrics gives the paper's metrics of both bundles on `eval_data` (the CLI passes the
    eval part's; quant does not import it). `budget` (BUDGETS) sizes the comparison; `streams`,
    `frames` and `sensitivity_on_miss` override it."""
    t0 = time.time()
    if budget not in BUDGETS:
        raise QuantizeError(f"budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    streams, frames = streams or b.streams, frames or b.frames
    if sensitivity_on_miss is None:
        sensitivity_on_miss = b.sensitivity
    parent, out = Path(parent), Path(out)
    check_options(precision, skip, block_size, accuracy_level, streams, frames, embeddings)
    check_request(precision, out, keep_8bit, eval_data)
    pm = load_manifest(parent, verify=True)  # BundleError on sha256 or schema before any write
    check_parent(pm, parent, out)
    recipe = Recipe(precision, block_size, accuracy_level, per_channel, tuple(keep_8bit))
    jobs = plan(pm, precision, skip, recipe)
    cal, test = choose_streams(calibration, eval_data, streams, frames, pm.model.fps)
    compared = [j for j in jobs if pm.graphs[j.source].variant in ("portable", "optimized")]
    bar = Stages(3 + len(jobs) + len(compared), f"quantize {precision}", progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        base = open_bundle(parent, verify=False, threads=threads)
        recorder = None
        if any(j.recipe and j.recipe.precision == "int8-qdq" and j.name != "vision" for j in jobs):
            bar.set_postfix_str("recording multimodal decoder feeds")
            recorder = record(base, pm, cal, reply_tokens, max_calibration_samples)
        bar.update()
        entries, notes = build_graphs(jobs, pm, parent, tmp, keep_fp32, recorder, cal, bar)
        bar.set_postfix_str("embeddings")
        emb_dtype = embeddings or EMBEDDING_DTYPES[precision]
        manifest, emb_figures = assemble(pm, parent, tmp, entries, notes, precision, emb_dtype)
        bar.update()
        child = open_bundle(tmp, verify=True, threads=threads)
        # every episode for the default decoder (what the bundle runs); `streams` of them for
        # the other variants (the QDQ graph, TensorRT's form, runs ~5x slower on CPU)
        report = build_report(pm, manifest, parent, tmp, base, child, jobs, compared, test,
                              reply_tokens, bar, b.other_frames)
        report.update(
            precision=precision, calibration=str(calibration or "synthetic"), streams=len(test),
            frames=sum(len(t.frames) for t in test), reply_tokens=reply_tokens, embeddings=emb_figures,
            compared_on=str(eval_data) if eval_data else "held-out calibration streams",
            calibration_samples=sample_counts(recorder),
        )
        bar.stage("explaining misses" if sensitivity_on_miss else "targets")
        explain_misses(
            report, targets or TARGETS[precision], parent, base, child,
            {j.name: j.source for j in compared}, test, sensitivity_on_miss,
            recipes={j.name: j.recipe for j in jobs}, calibration=calibration,
            reply_tokens=reply_tokens, keep_fp32=keep_fp32, threads=threads,
        )
        bar.set_postfix_str("paper metrics" if eval_data else "writing")
        data = Path(eval_data) if eval_data else None
        report["eval"] = paper_metrics(parent, tmp, data, evaluator)
        bar.update()
        bar.close()
        report.update(budget=budget, elapsed_s=round(time.time() - t0, 1), **bar.summary())
        write_report(tmp, manifest, report)
        tmp.chmod(0o755)  # mkdtemp made it 0700: the bundle is read by whoever runs it
        tmp.rename(out)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"bundle": str(out), **report}


def check_request(precision: str, out: Path, keep_8bit: Sequence[str], eval_data: str | Path | None) -> None:
    if keep_8bit and precision != "int4":
        raise QuantizeError("keep_8bit applies to int4 only: use keep_fp32 for int8 and fp16")
    if out.exists():
        raise QuantizeError(f"{out} already exists: choose a new folder or remove it first")
    if eval_data is not None and not Path(eval_data).is_dir():
        raise DataError(f"eval data {eval_data} is not a folder: pass a task-world split folder")


def choose_streams(
    calibration: str | None, eval_data: str | Path | None, streams: int, frames: int, fps: float,
) -> tuple[list[np.ndarray], list[Stream]]:
    """(calibration frames, comparison streams). They never overlap: the report never grades
    its own calibration. With labelled data the comparison runs on its episodes (the data the
    model is graded on, each with its own system prompt and turns), else on held-out
    calibration streams."""
    synthetic = calibration is None or str(calibration) == "synthetic"
    cal = frame_streams(calibration, streams, frames, offset=100 if synthetic else 0)
    test = episode_streams(eval_data, None) if eval_data is not None else plain_streams(
        frame_streams(calibration, streams, frames, offset=0 if synthetic else streams), fps)
    return cal, test


def write_report(tmp: Path, manifest: Manifest, report: dict[str, Any]) -> None:
    """quant_report.json, and its headline figures in the manifest's `verify`."""
    (tmp / REPORT).write_text(json.dumps(report, indent=2))
    keys = ("decision_agreement", "p_not_talk_mae", "logit_cosine", "token_match_rate", "targets_met")
    manifest.verify = {"against": "fp32 parent", "report": REPORT, **{k: report[k] for k in keys}}
    write_manifest(tmp, manifest)


def build_graphs(
    jobs: list[Job], pm: Manifest, parent: Path, tmp: Path, keep_fp32: Sequence[str],
    recorder: FeedRecorder | None, cal: list[np.ndarray], bar: Stages,
) -> tuple[dict[str, GraphEntry], list[str]]:
    entries, notes = {}, []
    # prepared graphs live in a scratch folder beside the child, never inside a bundle
    with tempfile.TemporaryDirectory(prefix=f".{tmp.name}.prep.", dir=tmp.parent) as prep:
        prepared: dict[str, Path] = {}
        for job in jobs:
            bar.set_postfix_str(f"{job.name}: {job.recipe.precision if job.recipe else 'copy'}")
            if job.recipe is not None and job.source not in prepared:
                prepared[job.source] = prepare(pm.graphs[job.source], parent, Path(prep))
            entry, note = run_job(job, pm, parent, tmp, prepared.get(job.source), keep_fp32,
                                  recorder, cal)
            entries[job.name] = entry
            notes.append(note)
            bar.update()
    return entries, notes


def assemble(
    pm: Manifest, parent: Path, tmp: Path, entries: dict[str, GraphEntry], notes: list[str],
    precision: str, emb_dtype: str,
) -> tuple[Manifest, dict[str, Any]]:
    """Embeddings, tokenizer and the child's manifest (every file with its sha256)."""
    emb, emb_files, figures = convert_embeddings(parent / pm.embeddings["file"], tmp, emb_dtype)
    figures.update(dtype=emb_dtype, parent_size_bytes=(parent / pm.embeddings["file"]).stat().st_size)
    shutil.copy(parent / "tokenizer.json", tmp / "tokenizer.json")
    files = {"tokenizer.json": sha256_file(tmp / "tokenizer.json"), **emb_files}
    files.update({d: sha256_file(tmp / d) for e in entries.values() for d in e.data_files})
    default = pm.default_decoder if pm.default_decoder in entries else next(
        n for n, e in entries.items() if e.variant)
    manifest = Manifest(
        model=pm.model, graphs=entries, files=files, embeddings=emb,
        source={
            "parent": str(parent.resolve()), "precision": precision,
            "parent_manifest_sha256": sha256_file(parent / MANIFEST),
            "parent_source": pm.source, "parent_verify": pm.verify,
        },
        notes=[*notes, figures.pop("note"), f"default decoder {default}: the parent's default, quantized"],
        default_decoder=default,
    )
    write_manifest(tmp, manifest)
    return manifest, figures


def portable_name(pm: Manifest) -> str | None:
    return next((n for n, g in pm.graphs.items() if g.variant == "portable"), None)


def record(base: Bundle, pm: Manifest, cal: list[np.ndarray], reply_tokens: int, cap: int) -> FeedRecorder:
    name = portable_name(pm)
    assert name is not None
    frame_cap = max(1, cap * 3 // 4)  # frame steps first: they carry the vision tokens
    return record_feeds(replace(base, decoder_name=name), cal, reply_tokens, pm.model.fps,
                        frame_cap, max(1, cap - frame_cap))


def sample_counts(rec: FeedRecorder | None) -> dict[str, int]:
    if rec is None:
        return {}
    return {"frame_steps": len(rec.frames), "token_steps": len(rec.tokens),
            "frame_steps_seen": rec.seen["frame"], "token_steps_seen": rec.seen["token"]}


def external_data(entry: GraphEntry, root: Path) -> bool:
    # genai's graph keeps its weights beside it; any graph near protobuf's 2 GiB cap must too
    size = sum((root / f).stat().st_size for f in (entry.file, *entry.data_files))
    return bool(entry.data_files) or size > G.EXTERNAL_DATA_BYTES


def prepare(entry: GraphEntry, parent: Path, work: Path) -> Path:
    """The parent graph with constant weights, in the scratch folder (never in a bundle)."""
    dst = work / entry.file
    G.prepare(parent / entry.file, dst, external_data(entry, parent))
    return dst


def run_job(
    job: Job, pm: Manifest, parent: Path, tmp: Path, prepared: Path | None,
    keep_fp32: Sequence[str], recorder: FeedRecorder | None, cal: list[np.ndarray],
) -> tuple[GraphEntry, str]:
    src = pm.graphs[job.source]
    if job.recipe is None or prepared is None:
        for f in (src.file, *src.data_files):
            shutil.copy(parent / f, tmp / f)
        return replace(src, sha256=sha256_file(tmp / src.file)), f"{job.name}: fp32 copy ({job.why})"
    file = src.file if job.name == job.source else f"{job.name}.onnx"
    model = G.load_structure(prepared)
    patterns = G.scoped(keep_fp32, job.name)
    ops = G.VISION_OPS if job.name == "vision" else ("MatMul",)
    nodes, kept = G.select(G.weight_nodes(model, ops), patterns)
    fp32_nodes = G.nodes_matching(model, patterns)
    external = external_data(src, parent)
    reader = None
    if job.recipe.precision == "int8-qdq" and job.name == "vision":
        reader = FeedReader(vision_feeds(cal))
    elif job.recipe.precision == "int8-qdq":
        reader = FeedReader([s.feeds for s in recorder.samples()] if recorder else [])
    try:
        data = G.apply(job.recipe, prepared, tmp / file, nodes, fp32_nodes, reader, external, ops)
    except Exception as e:  # onnxruntime's quantizers raise anything; name the graph and recipe
        why = f"{job.recipe.precision} of {job.source} failed: {type(e).__name__}: {e}"
        if src.variant != "optimized":
            raise QuantizeError(why) from e
        for f in (src.file, *src.data_files):
            shutil.copy(parent / f, tmp / f)
        note = f"{job.name}: {why}; the optimized graph was kept fp32"
        return replace(src, sha256=sha256_file(tmp / src.file)), note
    entry = GraphEntry(file, job.recipe.precision, src.inputs, src.outputs, sha256_file(tmp / file),
                       src.variant, data)
    return entry, describe(job, len(nodes), kept, fp32_nodes, recorder)


def describe(job: Job, n: int, kept: list[str], fp32_nodes: list[str], rec: FeedRecorder | None) -> str:
    r = job.recipe
    assert r is not None
    chan = "per-channel" if r.per_channel else "per-tensor"
    what = {
        "int8": (
            f"int8 dynamic (onnxruntime quantize_dynamic, MatMulInteger), {chan} 7-bit weights "
            "(reduce_range: no int16 saturation on x86 without VNNI); the CPU path"
        ),
        "int8-qdq": (
            f"int8 static QDQ (quantize_static, MinMax), symmetric activations, {chan} 7-bit "
            "weights; for TensorRT (also runs on CPU)"
        ),
        "int4": f"int4 weight-only MatMulNBits, block {r.block_size}, accuracy level {r.accuracy_level}"
        + (f", 8-bit blocks for {' '.join(r.keep_8bit)}" if r.keep_8bit else ""),
        "fp16": "fp16 (onnxruntime float16, keep_io_types), norms/softmax/sigmoid/RoPE path in fp32",
    }[r.precision]
    if r.precision == "int8-qdq":
        src = "frames through the vision graph" if job.name == "vision" else (
            f"{len(rec.frames) + len(rec.tokens) if rec else 0} decoder feeds recorded from StreamCore on "
            "multimodal streams (system prompt, frame tokens, a user question, reply tokens)")
        what += f", calibrated on {src}"
    count = f"{len(fp32_nodes)} nodes kept fp32 by pattern" if r.precision == "fp16" else (
        f"{n} weight nodes quantized, {len(kept)} kept fp32 by pattern")
    return f"{job.name} (from {job.source}): {what}; {count}"


def build_report(
    pm: Manifest, cm: Manifest, parent: Path, child_root: Path, base: Bundle, child: Bundle,
    jobs: list[Job], compared: list[Job], streams: list[Stream], reply_tokens: int, bar: Stages,
    other_frames: int | None,
) -> dict[str, Any]:
    """The child against the parent. The parent side always replays on its optimized decoder
    when it has one (the same model as the portable one, verified at export, but without the
    portable graph's copy of the whole cache at every step); the default decoder is compared on
    every stream, the other variants on the first stream's first `other_frames` frames."""
    psizes, csizes = graph_sizes(parent, pm), graph_sizes(child_root, cm)
    graphs = {
        j.name: {"file": cm.graphs[j.name].file, "precision": cm.graphs[j.name].precision,
                 "variant": cm.graphs[j.name].variant, "parent": j.source,
                 "size_bytes": csizes[j.name], "parent_size_bytes": psizes[j.source]}
        for j in jobs
    }
    decoders = {}
    fast = next((k for k, g in pm.graphs.items() if g.variant == "optimized"), None)
    for j in compared:
        source = fast or j.source
        bar.stage(f"comparing {j.name} with {source}")
        on = streams if j.name == cm.default_decoder or other_frames is None else [
            st._replace(frames=st.frames[:other_frames]) for st in streams[:1]]
        figures = compare_decoders(replace(base, decoder_name=source), replace(child, decoder_name=j.name),
                                   on, reply_tokens, pm.model.fps)
        decoders[j.name] = {"parent_graph": source, "variant": cm.graphs[j.name].variant,
                            "precision": cm.graphs[j.name].precision, **figures}
        bar.update()
    vision: dict[str, Any] | str = "not quantized"
    if cm.graphs["vision"].precision != "fp32":
        vision = {"precision": cm.graphs["vision"].precision, **compare_vision(base, child, streams)}
    worst = {
        "decision_agreement": min(d["decision_agreement"] for d in decoders.values()),
        "p_not_talk_mae": max(d["p_not_talk_mae"] for d in decoders.values()),
        "logit_cosine": min(d["logit_cosine"] for d in decoders.values()),
        "token_match_rate": min(d["token_match_rate"] for d in decoders.values()),
    }
    return {
        **worst, "summary_over": "worst decoder", "default_decoder": cm.default_decoder,
        "size_bytes": bundle_size(child_root, cm), "parent_size_bytes": bundle_size(parent, pm),
        "graphs": graphs, "decoders": decoders, "vision": vision, "parent": str(parent.resolve()),
    }
