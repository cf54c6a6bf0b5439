"""The physical limit of decoding and the cost model behind the context sweep.

Decoding one token reads every weight of the decoder graph once, so its time is at least
`weight bytes / memory read bandwidth` (the floor). Attention adds work proportional to the
context, which the FLOP model below turns into a predicted latency ratio between contexts. Both
figures come from the bundle's own graph and from a bandwidth measured on this machine, so the
benchmark reports how far the runtime is from what the hardware allows, not only how fast it is.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from proassist_edge.bench.latency import percentiles
from proassist_edge.manifest import Manifest, ModelFacts
from proassist_edge.runtime.backend import (
    Decoder,
    GqaDecoder,
    PortableDecoder,
    StepOut,
    physical_cores,
)
from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.core import not_talk_probability

GIB = 1 << 30


@dataclass(frozen=True)
class Bandwidth:
    """Best-of-`repeats` read bandwidth in bytes/s, one thread and `threads` threads."""

    bytes_per_s: float  # the larger of the two: what a multi-threaded decoder can reach
    single_thread_bytes_per_s: float
    threaded_bytes_per_s: float
    threads: int
    array_bytes: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gb_per_s": self.bytes_per_s / 1e9}


def _timed_sum(chunks: list[np.ndarray]) -> float:
    """Seconds to reduce every chunk, one thread per chunk (numpy releases the GIL in reductions)."""
    sink = [0.0] * len(chunks)

    def work(i: int) -> None:
        sink[i] = float(np.add.reduce(chunks[i]))

    if len(chunks) == 1:
        t0 = time.perf_counter()
        work(0)
        return time.perf_counter() - t0
    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(chunks))]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def measure_bandwidth(
    array_bytes: int = GIB, repeats: int = 5, threads: int | None = None
) -> Bandwidth:
    """Memory read bandwidth from reducing a large float32 array (far larger than any cache).

    numpy reduces on one thread, and one core rarely saturates the memory bus, so the array is
    also reduced in `threads` slices at once; the decoder runs multi-threaded, so the larger
    figure is the honest floor.
    """
    threads = max(1, threads or os.cpu_count() or 1)
    # ones() touches every page now, so the timed passes never pay for page faults
    a = np.ones(max(array_bytes // 4, 1024), np.float32)
    slices = np.array_split(a, threads)
    single = min(_timed_sum([a]) for _ in range(repeats))
    multi = min(_timed_sum(slices) for _ in range(repeats)) if threads > 1 else single
    del a, slices
    s_bw, m_bw = array_bytes / single, array_bytes / multi
    return Bandwidth(max(s_bw, m_bw), s_bw, m_bw, threads, array_bytes, repeats)


# --- what a decoder graph reads per token -----------------------------------------------------
@dataclass(frozen=True)
class GraphWeights:
    """Bytes a graph reads per token (its weights), all initializer bytes incl. external data,
    and the parameter count of the weights."""

    bytes: int  # read once per forward: every initializer but the lookup tables
    total_bytes: int  # every initializer, lookup tables included
    params: int
    source: str  # "initializers" or "file sizes" (when onnx is not installed)


def _elem_size(data_type: int) -> float:
    import onnx

    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 0.5
    return float(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)


def graph_weights(path: Path, data_files: list[Path] | None = None) -> GraphWeights:
    """What an ONNX graph's initializers weigh, from their shapes (external data included).

    Lookup tables (a Gather's data, GroupQueryAttention's cos/sin caches) are read one row per
    position, so they count in `total_bytes` only. Block-quantized weights (MatMulNBits) count as
    K x N parameters; their scales and zero points as bytes only. Without onnx installed, the
    file sizes stand in (the initializers are nearly all of a decoder file).
    """
    try:
        import onnx
    except ImportError:
        files = [path, *(data_files or [])]
        n = sum(p.stat().st_size for p in files if p.is_file())
        return GraphWeights(n, n, n // 4, "file sizes")
    model = onnx.load(str(path), load_external_data=False)
    nbits_b: dict[str, int] = {}  # MatMulNBits weight input -> K*N parameters
    aux: set[str] = set()  # quantization scales and zero points
    lookup: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            nbits_b[node.input[1]] = int(attrs["K"]) * int(attrs["N"])
            aux.update(node.input[2:])
        elif node.op_type == "Gather":
            lookup.add(node.input[0])
        elif node.op_type == "GroupQueryAttention":
            lookup.update(node.input[7:9])  # cos_cache, sin_cache
    read, total, params = 0, 0, 0
    for init in model.graph.initializer:
        numel = int(np.prod(init.dims)) if init.dims else 1
        size = int(round(numel * _elem_size(init.data_type)))
        total += size
        if init.name in lookup:
            continue
        read += size
        if init.name in nbits_b:
            params += nbits_b[init.name]
        elif init.name not in aux and numel >= 1024:  # skip shapes, scales, small constants
            params += numel
    return GraphWeights(read, total, params, "initializers")


def decoder_weights(root: Path, manifest: Manifest, decoder: str) -> GraphWeights:
    g = manifest.graphs[decoder]
    w = graph_weights(root / g.file, [root / d for d in g.data_files])
    if "head" in manifest.graphs:  # the decision head runs on every frame step too
        h = graph_weights(root / manifest.graphs["head"].file)
        w = GraphWeights(w.bytes + h.bytes, w.total_bytes + h.total_bytes, w.params + h.params, w.source)
    return w


# --- FLOP model for latency vs context ---------------------------------------------------------
def flops_per_token(params: int, m: ModelFacts, context: int) -> float:
    """2*params for the weight matmuls, plus attention: Q.K and P.V over `context` positions for
    every query head of every layer (2 FLOPs per multiply-add)."""
    heads = max(1, m.hidden_size // m.head_dim)  # query heads (Llama: heads * head_dim = hidden)
    return 2.0 * params + 2.0 * m.num_layers * heads * m.head_dim * context * 2


def context_ratio_predicted(params: int, m: ModelFacts, lo: int, hi: int) -> float:
    """Predicted latency(hi) / latency(lo) of a decode step if time followed FLOPs."""
    return flops_per_token(params, m, hi) / flops_per_token(params, m, lo)


def bandwidth_figures(
    weights: GraphWeights, bw: Bandwidth, decode_s_per_token: float | None
) -> dict[str, Any]:
    """The decode floor (seconds per token if decoding only read the weights once at full
    bandwidth) and how far the measured decode is above it."""
    floor = weights.bytes / bw.bytes_per_s
    ratio = decode_s_per_token / floor if decode_s_per_token else None
    return {
        "weight_bytes": weights.bytes,
        "initializer_bytes": weights.total_bytes,
        "weight_params": weights.params,
        "weights_counted_from": weights.source,
        "bandwidth_gb_per_s": bw.bytes_per_s / 1e9,
        "decode_floor_ms": 1e3 * floor,
        "decode_ms_per_token": None if decode_s_per_token is None else 1e3 * decode_s_per_token,
        "decode_over_bandwidth_floor": ratio,
    }


# --- latency vs context, and the runtime's own overhead ---------------------------------------
# Both need a decoder holding C tokens. Running C tokens through the graph costs C tokens of
# prefill per bundle (minutes for 3500 tokens on a busy CPU), and dense attention does the same
# work whatever the values, so the KV memory is written directly with values of the scale real
# keys and values have. Each context is marked; a rep then puts kv_len (and the portable
# decoder's past list, which onnxruntime never writes into) back to the mark.
@runtime_checkable
class FillableKv(Protocol):
    """A decoder whose memory a benchmark can grow without running the graph: the onnxruntime
    decoders and TensorRT's (runtime/trt_decoder.py) all have `fill_kv`."""

    kv_len: int

    def fill_kv(self, end: int, values: Callable[[tuple[int, ...]], np.ndarray]) -> None: ...


@runtime_checkable
class BareStep(Protocol):
    """A decoder that gives its graph alone as a call, inputs bound once (TensorRT's engine)."""

    def bare_step(self, embeds: np.ndarray) -> Callable[[], object]: ...


@runtime_checkable
class HostPast(Protocol):
    """A decoder whose memory is a list of host arrays onnxruntime never writes into."""

    past: list[np.ndarray]


@dataclass
class _Mark:
    kv_len: int
    past: list[np.ndarray] | None


def _mark(dec: Decoder) -> _Mark:
    return _Mark(dec.kv_len, list(dec.past) if isinstance(dec, HostPast) else None)


def _back(dec: Decoder, mark: _Mark) -> None:
    """Put the memory back to `mark`: its length (a decoder with buffers keeps the rows below
    it: every step writes at or past it), and a host past list as it was."""
    dec.kv_len = mark.kv_len
    if mark.past is not None and isinstance(dec, HostPast):
        dec.past = list(mark.past)


def fill(dec: Decoder, context: int, rng: np.random.Generator) -> None:
    """Grow the KV memory to `context` tokens of random keys and values (unit scale)."""
    if context <= dec.kv_len:
        return
    if not isinstance(dec, FillableKv):
        raise TypeError(f"cannot fill {type(dec).__name__}: it has no fill_kv")
    dec.fill_kv(context, rng.standard_normal)


class CoreStep:
    """One step as the core does it: a frame step is the decoder append plus P(not talk) (from
    the logits or the decision head, as StreamCore._append); a reply token is the embedding
    lookup plus the append (StreamCore._greedy needs no decision for it)."""

    def __init__(self, bundle: Bundle, dec: Decoder) -> None:
        self.b, self.dec = bundle, dec
        m = bundle.manifest.model
        self.not_talk, self.head_mode = m.not_talk_id, m.w2t_mode == "head"

    def p_not_talk(self, out: StepOut) -> float:
        if out.p_not_talk is not None:
            return out.p_not_talk
        if self.head_mode and self.b.head is not None:
            p = self.b.head.run(None, {"hidden_states": out.hidden[None, None]})[0]
            return float(p.reshape(-1)[-1])
        return not_talk_probability(out.logits, self.not_talk)

    def frame(self, tokens: np.ndarray) -> float:
        # frame tokens (k, I, H) -> (1, k*I, H), as StreamCore._inputs does without text
        return self.p_not_talk(self.dec.append(tokens.reshape(1, -1, tokens.shape[-1])))

    def token(self, token_id: int) -> np.ndarray:
        return self.dec.append(self.b.embed([token_id])).logits


def bare_run(dec: Decoder, embeds: np.ndarray, vocab: int) -> Callable[[], object]:
    """The graph alone on the same inputs and KV memory, everything bound once beforehand
    (an engine decoder: its `bare_step`, which also leaves the outputs on the device)."""
    s = embeds.shape[1]
    x = np.ascontiguousarray(embeds, np.float32)
    if isinstance(dec, GqaDecoder):
        b = dec.sess.io_binding()
        dec.bind_kv(b)
        keep = [
            ort.OrtValue.ortvalue_from_numpy(x),
            ort.OrtValue.ortvalue_from_numpy(np.ones((1, dec.kv_len + s), np.int64)),
            ort.OrtValue.ortvalue_from_shape_and_type((1, s, vocab), np.float32),
            ort.OrtValue.ortvalue_from_shape_and_type((1, s, x.shape[-1]), np.float32),
        ]
        b.bind_ortvalue_input("inputs_embeds", keep[0])
        b.bind_ortvalue_input("attention_mask", keep[1])
        b.bind_ortvalue_output("logits", keep[2])
        if dec.with_hidden:
            b.bind_ortvalue_output("hidden_states", keep[3])
        sess = dec.sess
        return lambda: (sess.run_with_iobinding(b), keep)
    if isinstance(dec, PortableDecoder):
        feeds = dict(zip(dec.names, dec.past, strict=True))
        feeds["inputs_embeds"] = x
        return lambda: dec.sess.run(None, feeds)
    if isinstance(dec, BareStep):  # a TensorRT engine: the engine's execution alone
        return dec.bare_step(x)
    raise TypeError(f"no bare run for {type(dec).__name__}: give it a bare_step")


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def overhead(ours: list[float], bare: list[float]) -> dict[str, Any]:
    """Our step minus the bare graph run: the median of the paired differences (each pair ran
    back to back, so slow changes of load cancel) with its standard error (on a busy machine it
    can exceed the overhead), and min(ours) - min(bare) (load only ever adds time, so the minima
    are each side's least disturbed run). Target: under 1 ms + 10% of the bare step."""
    diffs = np.subtract(ours, bare)
    paired, g = float(np.median(diffs)), float(np.median(bare))
    # standard error of a median: 1.2533 sigma / sqrt(n), sigma from the MAD (robust to spikes)
    mad = float(np.median(np.abs(diffs - paired)))
    return {
        "overhead_ms": paired,
        "overhead_se_ms": 1.2533 * 1.4826 * mad / math.sqrt(len(diffs)),
        "overhead_ms_min": float(min(ours) - min(bare)),
        "overhead_target_ms": 1.0 + 0.1 * g,
        "within_target": bool(paired < 1.0 + 0.1 * g),
    }


def context_sweep(
    bundle: Bundle, frame_tokens: np.ndarray, sweep: list[int], overhead_at: list[int],
    reps: int, overhead_reps: int | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Latency of a frame step (I tokens) and a decode step (1 token) at each context of `sweep`,
    and the runtime's overhead over the bare pre-bound graph run at each context of
    `overhead_at` (`overhead_reps` pairs: a difference of two noisy times needs more samples).

    The KV memory is filled once, marking each context on the way; then the reps go round all
    contexts in turn (order reversed every round), so a change of machine load spreads over the
    whole curve instead of bending it. A rep may overwrite K/V of positions filled earlier; the
    values do not matter to the timing.
    """
    m = bundle.manifest.model
    s = frame_tokens.shape[0] * frame_tokens.shape[1]
    limit = m.max_seq_len - s - 1
    wanted = sorted(set(sweep) | set(overhead_at))
    skipped = [c for c in wanted if c > limit]
    contexts = [c for c in wanted if c <= limit]
    dec = bundle.new_decoder(max(contexts, default=0) + s + 1)
    step, rng = CoreStep(bundle, dec), np.random.default_rng(seed)
    marks: dict[int, _Mark] = {}
    for c in contexts:
        fill(dec, c, rng)
        marks[c] = _mark(dec)
    token = int(m.eos_id)
    x = {"frame": frame_tokens.reshape(1, -1, frame_tokens.shape[-1]), "decode": bundle.embed([token])}
    ours_fn: dict[str, Callable[[], object]] = {
        "frame": lambda: step.frame(frame_tokens), "decode": lambda: step.token(token)}
    n_ov = max(reps, overhead_reps or 3 * reps)
    tasks = [(c, k, n_ov if c in overhead_at else reps) for c in contexts for k in ("frame", "decode")]
    bare: dict[tuple[int, str], Callable[[], object]] = {}
    for c, k, _ in tasks:
        if c in overhead_at:
            _back(dec, marks[c])
            bare[c, k] = bare_run(dec, x[k], m.vocab_size)
    ours: dict[tuple[int, str], list[float]] = {(c, k): [] for c, k, _ in tasks}
    graph: dict[tuple[int, str], list[float]] = {(c, k): [] for c, k, _ in tasks}
    for r in range(max((n for *_, n in tasks), default=0) + 1):
        for c, k, n in tasks if r % 2 else tasks[::-1]:
            if r > n:
                continue
            _back(dec, marks[c])
            t = _ms(ours_fn[k])
            g = _ms(bare[c, k]) if (c, k) in bare else math.nan
            if r:  # round 0 warms caches and allocators up
                ours[c, k].append(t)
                graph[c, k].append(g)
    points: dict[int, dict[str, Any]] = {c: {} for c in contexts}
    for c, k, _ in tasks:
        fig: dict[str, Any] = {"ours_ms": percentiles(ours[c, k])}
        if (c, k) in bare:
            fig.update(bare_ms=percentiles(graph[c, k]), **overhead(ours[c, k], graph[c, k]))
        points[c][k] = fig
    note = f"contexts {skipped} exceed the bundle's max_seq_len {m.max_seq_len}" if skipped else None
    return {"decoder": type(dec).__name__, "points": points, "skipped": skipped, "note": note,
            "frame_tokens": s}


# --- plain greedy decoding: ours against onnxruntime-genai on the same weights ----------------
DECODE_PROMPT = "List the steps to make a cup of tea, one short sentence each."


def decode_prompt(bundle: Bundle) -> list[int]:
    """A chat prompt in the bundle's own format, ending at the assistant header."""
    from proassist_edge.runtime.prompt import PromptBuilder

    m = bundle.manifest.model
    pb = PromptBuilder(bundle.tokenizer, m.chat_format)
    return [*pb.opening(m.system_prompt), *pb.message("user", DECODE_PROMPT),
            *pb.ids(m.chat_format.assistant_prefix)]


class _OursGreedy:
    """Greedy decoding as runtime.core.greedy_generate does it: embedding lookup, append, argmax."""

    def __init__(self, bundle: Bundle, prompt: list[int], n: int) -> None:
        self.b, self.prompt = bundle, prompt
        self.dec = bundle.new_decoder(len(prompt) + n + 1)
        self.tokens: list[int] = []

    def prepare(self) -> None:
        self.dec.reset()

    def first(self) -> None:
        self.tokens = [int(np.argmax(self.dec.append(self.b.embed(self.prompt)).logits))]

    def next(self) -> None:
        self.tokens.append(int(np.argmax(self.dec.append(self.b.embed(self.tokens[-1:])).logits)))


class _GenaiGreedy:
    """onnxruntime-genai's Generator, greedy, exactly n new tokens. Its thread count is set to
    ours (given, or one per physical core as the runtime uses): left to itself, genai picks its
    own, and a comparison at different thread counts says nothing about the code."""

    def __init__(self, folder: Path, prompt: list[int], n: int, threads: int) -> None:
        import onnxruntime_genai as og

        self.threads = threads or physical_cores()
        _set_genai_threads(folder, self.threads)
        self.og, self.model, self.prompt, self.n = og, og.Model(str(folder)), prompt, n
        self.gen: Any = None

    def prepare(self) -> None:
        params = self.og.GeneratorParams(self.model)
        # min_length keeps eos from ending the run early: both sides decode n tokens
        total = len(self.prompt) + self.n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        self.gen = self.og.Generator(self.model, params)

    def first(self) -> None:
        self.gen.append_tokens(self.prompt)
        self.gen.generate_next_token()  # the prompt's logits are ready: this only picks

    def next(self) -> None:
        self.gen.generate_next_token()

    @property
    def tokens(self) -> list[int]:
        return [int(t) for t in self.gen.get_sequence(0)[len(self.prompt) :]]


def decode_compare(
    bundle: Bundle, prompt: list[int], n: int, reps: int, genai: Path | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Greedy decoding of exactly n tokens after `prompt`, ours and (with `genai`, a model
    folder) onnxruntime-genai's, in turns: whole runs alternate (A B, B A, ...) so both see the
    same machine load. Not token by token: each session's threads spin a while after a run, and
    would then slow the other side's next token. The prefill (prompt and first token) is timed
    apart from the n-1 one-token steps; rep 0 warms up."""
    from proassist_edge.runtime.core import greedy_generate

    sides: dict[str, _OursGreedy | _GenaiGreedy] = {"ours": _OursGreedy(bundle, prompt, n)}
    if genai is not None:
        sides["ort_genai"] = _GenaiGreedy(genai, prompt, n, threads)
    times = {k: {"prefill": [], "token": []} for k in sides}  # type: dict[str, dict[str, list[float]]]
    for r in range(reps + 1):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            side = sides[name]
            side.prepare()
            for k in range(n):
                t = _ms(side.first if k == 0 else side.next)
                if r:
                    times[name]["prefill" if k == 0 else "token"].append(t)
    ours = sides["ours"].tokens
    out = {name: _figures(times[name], n, side.tokens) for name, side in sides.items()}
    mine = sides["ours"]
    assert isinstance(mine, _OursGreedy)
    # on the timed decoder: an engine's device buffers are not allocated a second time
    again = greedy_generate(bundle, prompt, n, eos=-1, decoder=mine.dec)
    out["ours"]["matches_greedy_generate"] = again == ours
    if isinstance(g := sides.get("ort_genai"), _GenaiGreedy):
        out["ort_genai"]["folder"] = str(genai)
        out["ort_genai"]["threads"] = g.threads
        out["ort_genai"]["token_agreement_with_ours"] = agreement(ours, out["ort_genai"]["tokens"])
    return out


def _figures(t: dict[str, list[float]], n: int, tokens: list[int]) -> dict[str, Any]:
    per_token = float(np.median(t["token"])) if t["token"] else math.nan
    return {"prefill_ms": float(np.median(t["prefill"])), "decode_ms_per_token": per_token,
            "decode_ms": percentiles(t["token"]), "tokens_per_s": 1e3 / per_token,
            "new_tokens": n, "tokens": tokens}


def _set_genai_threads(folder: Path, threads: int) -> None:
    import json

    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=4))


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the positions before the first disagreement (greedy paths part for good)."""
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k / max(len(a), len(b), 1)
