"""Decoder backends over a bundle's graphs, each owning the KV memory it needs.

`GqaDecoder` drives the optimized graph (onnxruntime-genai builder, GroupQueryAttention) with one
preallocated max-length buffer per layer, bound as both past input and present output: appending
S tokens costs O(S) and nothing is copied per step. `PortableDecoder` drives the standard-op graph
(the TensorRT candidate) by feeding `present` back as `past` (the graph's own contract).
Both expose the same small interface, used only by the core.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from proassist_edge.errors import BundleError
from proassist_edge.runtime.providers import (
    MISSING_LIBRARY,
    ExecutionProviderError,
    candidates,
    default_ep,
    new_session,
    provider_error,
    session_device,
    session_ep,
)

log = logging.getLogger(__name__)


@dataclass
class StepOut:
    logits: np.ndarray  # (V,) float32, last position; valid until the decoder's next append
    hidden: np.ndarray  # (H,) float32, last position
    p_not_talk: float | None  # when the graph computes it


class Decoder(Protocol):
    kv_len: int
    capacity: int

    def append(self, embeds: np.ndarray) -> StepOut: ...
    def reset(self) -> None: ...
    def keep(self, prefix_len: int, start: int, end: int) -> None: ...


@runtime_checkable
class KvTransfer(Protocol):
    """A decoder whose memory can be read out and put back (the warm start, runtime/warm.py):
    both onnxruntime decoders; TensorRT's keeps its memory on the GPU and has no such path."""

    kv_len: int
    capacity: int
    sess: ort.InferenceSession

    def export_kv(self) -> list[np.ndarray]: ...
    def import_kv(self, kv: Sequence[np.ndarray]) -> None: ...


def check_kv(kv: Sequence[np.ndarray], like: Sequence[np.ndarray], capacity: int) -> int:
    """The length of a memory `kv` to import where buffers of `like`'s type and (1, kv_heads,
    any, head_dim) shape hold `capacity` positions; a BundleError says what differs."""
    if len(kv) != len(like):
        raise BundleError(f"KV of {len(kv)} buffers for a decoder of {len(like)}: it was made "
                          "for another model; compute it again")
    n = kv[0].shape[2] if kv and kv[0].ndim == 4 else 0
    for a, b in zip(kv, like, strict=True):
        want = (1, b.shape[1], n, b.shape[3])
        if a.dtype != b.dtype or a.shape != want:
            raise BundleError(f"KV buffer {a.dtype} {a.shape} where {b.dtype} {want} is due: it "
                              "was made for another model or precision; compute it again")
    if n > capacity:
        raise BundleError(f"KV of {n} positions for a memory of {capacity}: compute it again")
    return n


def physical_cores() -> int:
    """onnxruntime's own default intra-op thread count: one per physical core."""
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return os.cpu_count() or 1


def make_session(
    path: str, threads: int = 0, prefer: str | None = None, spin: bool = True,
    contrib_ops: bool = False,
) -> ort.InferenceSession:
    """A session on execution provider `prefer` (runtime/providers.py: auto, cpu, cuda,
    tensorrt; default $PROASSIST_EDGE_EP, else auto); auto takes the best offered and moves down
    the order when a provider's library does not load. A failure raises ExecutionProviderError
    naming the provider and why.

    `spin=False` for small graphs run just before a big one: onnxruntime's workers otherwise
    spin on the cores for a while after each run, and the decoder's step that follows the vision
    encode then shares the cores with them (measured: the frame append ~1.8x slower on 2 cores).

    The thread count is always set (0 = one per physical core, onnxruntime's own default):
    left at 0, onnxruntime also pins each worker to a core, and a pinned worker cannot move
    off a core that the camera, TTS or any other process is using. Measured on SmolLM2 int4
    on 2 cores: 10.99 ms/token pinned, 10.47 unpinned (onnxruntime-genai sets it too)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    eps = candidates(prefer or default_ep())
    for i, ep in enumerate(eps):
        try:
            return new_session(path, opts, ep, contrib_ops)
        except ExecutionProviderError as e:
            if i == len(eps) - 1 or e.reason != MISSING_LIBRARY:
                raise
            log.warning("%s; --ep auto tries %s next", e, eps[i + 1])
    raise AssertionError("unreachable: candidates() is never empty")


class DeviceKv:
    """`count` KV buffers of `shape`, allocated once by onnxruntime on the session's device
    ("cpu", or "cuda" under the CUDA and TensorRT providers) and bound as both past and present,
    so a step moves no KV bytes between host and device.

    The rare edits (a context strategy's `keep`, the warm start's import and export, a
    benchmark's fill) work on host arrays: on the CPU `numpy()` of an onnxruntime tensor is a
    view of its memory and they edit it in place; on a device each buffer makes a round trip
    (copy down, edit, `update_inplace`). `host_views=False` takes the round trip on the CPU too,
    which is how the device path is tested without a GPU."""

    def __init__(self, count: int, shape: tuple[int, ...], dtype: type, device: str = "cpu",
                 device_id: int = 0, host_views: bool | None = None) -> None:
        self.shape, self.dtype, self.device = shape, np.dtype(dtype), device
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, device_id)
                       for _ in range(count)]
        mapped = device == "cpu" if host_views is None else host_views and device == "cpu"
        self.views: list[np.ndarray] | None = [v.numpy() for v in self.values] if mapped else None
        self.edit(lambda _, a: a.fill(0))  # the stale tail is masked, but never uninitialised memory

    def edit(self, fn: Callable[[int, np.ndarray], object]) -> None:
        """fn(i, a) on every buffer i as a host array `a`, written back where it is a copy."""
        for i, v in enumerate(self.values):
            a = self.views[i] if self.views is not None else v.numpy()
            fn(i, a)
            if self.views is None:
                v.update_inplace(a)

    def read(self, end: int) -> list[np.ndarray]:
        """Host copies of positions [0, end) of every buffer."""
        src = self.views if self.views is not None else (v.numpy() for v in self.values)
        return [np.ascontiguousarray(a[:, :, :end]) for a in src]

    def like(self) -> list[np.ndarray]:
        """Empty host arrays of the buffers' type and (1, kv_heads, 0, head_dim) shape."""
        return [np.empty((*self.shape[:2], 0, self.shape[3]), self.dtype) for _ in self.values]


class GqaDecoder:
    def __init__(
        self,
        session: ort.InferenceSession,
        layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        with_hidden: bool,
        device: str | None = None,
        device_id: int = 0,
        host_views: bool | None = None,
    ) -> None:
        """`device`: where the KV buffers live (default: the session's, runtime/providers.py
        `session_device`); the new embeddings and the logits stay host arrays, which
        onnxruntime copies in and out of the device per step (the only bytes that cross)."""
        self.sess = session
        self.capacity = capacity
        self.ep = session_ep(session)
        self.device = device or session_device(session)
        self.kv_mem = DeviceKv(2 * layers, (1, kv_heads, capacity, head_dim), _kv_dtype(session),
                               self.device, device_id, host_views)
        self.kv_ort = self.kv_mem.values
        self.mask = np.ones((1, capacity), np.int64)
        self.with_hidden = with_hidden
        self.binding = session.io_binding()
        self.bind_kv(self.binding)
        outs = {o.name: o.shape for o in session.get_outputs()}
        ins = {i.name: i.shape for i in session.get_inputs()}
        vocab, hidden = outs.get("logits", [None])[-1], ins.get("inputs_embeds", [None])[-1]
        self.io_dims = (hidden, vocab) if isinstance(vocab, int) and isinstance(hidden, int) else None
        self.buffers: dict[int, _StepBuffers] = {}
        self.bound = -1  # the append length whose buffers are bound (0: onnxruntime allocates)
        one = self._buffers(1)
        self.step_logits = None if one is None else one.logits
        self.kv_len = 0

    def append(self, embeds: np.ndarray) -> StepOut:
        s = embeds.shape[1]
        total = self.kv_len + s
        if total > self.capacity:
            raise BundleError(
                f"KV buffer full ({total} > {self.capacity}): a context strategy must run first"
            )
        b = self.binding
        buf = self._buffers(s)
        if buf is None:
            # outputs allocated by onnxruntime for this run (a binding keeps the last run's
            # outputs bound, so they are unbound again every time)
            self.bound = 0
            b.bind_output("logits")
            if self.with_hidden:
                b.bind_output("hidden_states")
            b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        else:
            if self.bound != s:
                self.bound = s
                buf.bind(b)
            buf.x[...] = embeds
        b.bind_cpu_input("attention_mask", self.mask[:, :total])
        try:
            self.sess.run_with_iobinding(b)
        except Exception as e:  # onnxruntime's own types: name the provider and the reason
            raise provider_error(self.ep, e, f"a decoder step of {s} tokens at {total}") from e
        self.kv_len = total
        if buf is not None:
            logits, hidden = buf.logits, buf.hidden
        else:
            # outputs come in bind order: the shared KV buffers, then logits (and hidden states)
            outs = b.get_outputs()
            logits = outs[len(self.kv_ort)].numpy()
            hidden = outs[len(self.kv_ort) + 1].numpy() if self.with_hidden else None
        return StepOut(
            logits[0, -1].astype(np.float32, copy=False),
            np.empty(0, np.float32) if hidden is None else hidden[0, -1],
            None,
        )

    def _buffers(self, s: int) -> _StepBuffers | None:
        """The bound buffers of an append of s tokens: one-token steps and short appends (a
        frame's I tokens) write into arrays kept for their length, so a step neither allocates
        outputs nor asks for them back. Measured on SmolLM2 int4 decode (2 cores, lockstep):
        reading the outputs back per step (`get_outputs`, an OrtValue per KV buffer too) cost
        ~8% of the step; a fresh (1, 1, V) logits array per token had cost 12% (page faults).
        Longer appends (prompts) let onnxruntime allocate, as their run dwarfs both."""
        if self.io_dims is None or s > IN_PLACE_MAX:
            return None
        if s not in self.buffers:
            for old in [n for n in self.buffers if n != 1]:  # keep one-token and one other length
                del self.buffers[old]
            hidden, vocab = self.io_dims
            self.buffers[s] = _StepBuffers.new(s, hidden, vocab, self.with_hidden)
        return self.buffers[s]

    def reset(self) -> None:
        self.kv_len = 0  # the buffer's stale tail is masked out by attention_mask

    def bind_kv(self, binding: ort.IOBinding) -> None:
        """Bind the KV buffers to `binding` as both past input and present output, as this
        decoder's own binding is (a benchmark binds them to a bare run of the graph)."""
        for i, v in enumerate(self.kv_ort):
            layer, kind = divmod(i, 2)
            name = "key" if kind == 0 else "value"
            binding.bind_ortvalue_input(f"past_key_values.{layer}.{name}", v)
            binding.bind_ortvalue_output(f"present.{layer}.{name}", v)

    def fill_kv(self, end: int, values: Callable[[tuple[int, ...]], np.ndarray]) -> None:
        """Positions [kv_len, end) of every key and value buffer (layer order) set to
        values((1, kv_heads, end - kv_len, head_dim)), and taken into the memory: a context of
        `end` tokens for a benchmark, without running them through the graph."""
        if end > self.capacity:
            raise BundleError(f"KV buffer full ({end} > {self.capacity})")
        start = self.kv_len

        def put(_: int, a: np.ndarray) -> None:
            a[:, :, start:end] = values((*a.shape[:2], end - start, a.shape[3]))

        self.kv_mem.edit(put)
        self.kv_len = end

    def keep(self, prefix_len: int, start: int, end: int) -> None:
        """Keep [0, prefix_len) + [start, end): move the tail down once (O(end - start) on the
        CPU; a round trip of each buffer on a device, a rare event)."""
        n = end - start

        def move(_: int, a: np.ndarray) -> None:
            a[:, :, prefix_len : prefix_len + n] = a[:, :, start:end]  # numpy handles overlap

        self.kv_mem.edit(move)
        self.kv_len = prefix_len + n

    def export_kv(self) -> list[np.ndarray]:
        """Copies of the memory: [0, kv_len) of every key and value buffer (layer order, key
        then value), each (1, kv_heads, kv_len, head_dim) in the graph's KV type."""
        return self.kv_mem.read(self.kv_len)

    def import_kv(self, kv: Sequence[np.ndarray]) -> None:
        """Replace the memory with `kv` (as export_kv gives it), copied into the bound buffers."""
        n = check_kv(kv, self.kv_mem.like(), self.capacity)

        def put(i: int, a: np.ndarray) -> None:
            a[:, :, :n] = kv[i]

        self.kv_mem.edit(put)
        self.kv_len = n


class PortableDecoder:
    def __init__(
        self,
        session: ort.InferenceSession,
        layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
    ) -> None:
        self.sess = session
        self.ep = session_ep(session)
        self.capacity = capacity
        self.layers = layers
        self.empty: np.ndarray = np.zeros((1, kv_heads, 0, head_dim), _kv_dtype(session))
        self.names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        self.reset()

    def reset(self) -> None:
        self.past = [self.empty] * (2 * self.layers)
        self.kv_len = 0

    def append(self, embeds: np.ndarray) -> StepOut:
        total = self.kv_len + embeds.shape[1]
        if total > self.capacity:
            raise BundleError(
                f"KV memory full ({total} > {self.capacity}): a context strategy must run first"
            )
        feeds = dict(zip(self.names, self.past, strict=True))
        feeds["inputs_embeds"] = np.ascontiguousarray(embeds, dtype=np.float32)
        try:
            logits, p, hidden, *present = self.sess.run(None, feeds)
        except Exception as e:  # onnxruntime's own types: name the provider and the reason
            raise provider_error(self.ep, e, f"a decoder step of {embeds.shape[1]} tokens") from e
        self.past = present
        self.kv_len = total
        return StepOut(
            logits[0, -1].astype(np.float32, copy=False), hidden[0, -1], float(p.reshape(-1)[-1])
        )

    def fill_kv(self, end: int, values: Callable[[tuple[int, ...]], np.ndarray]) -> None:
        """As GqaDecoder.fill_kv: values((1, kv_heads, end - kv_len, head_dim)) appended to
        every past key and value (layer order)."""
        n = end - self.kv_len
        self.past = [
            np.concatenate([a, values((*a.shape[:2], n, a.shape[3])).astype(a.dtype)], 2)
            for a in self.past
        ]
        self.kv_len = end

    def keep(self, prefix_len: int, start: int, end: int) -> None:
        self.past = [
            np.concatenate([a[:, :, :prefix_len], a[:, :, start:end]], axis=2) for a in self.past
        ]
        self.kv_len = prefix_len + end - start

    def export_kv(self) -> list[np.ndarray]:
        """As GqaDecoder.export_kv: copies of the past keys and values."""
        return [a.copy() for a in self.past]

    def import_kv(self, kv: Sequence[np.ndarray]) -> None:
        """Replace the memory with `kv` (as export_kv gives it)."""
        self.kv_len = check_kv(kv, self.past, self.capacity)
        self.past = [np.ascontiguousarray(a) for a in kv]


IN_PLACE_MAX = 16  # appends up to this many tokens write into buffers kept per length


@dataclass
class _StepBuffers:
    """An append length's input and outputs, in cache-line aligned arrays shared with the
    OrtValues bound to the graph (rows valid until the decoder's next append)."""

    x: np.ndarray  # (1, s, H) inputs_embeds, copied into
    logits: np.ndarray  # (1, s, V)
    hidden: np.ndarray | None  # (1, s, H) when the graph outputs hidden states
    values: tuple[ort.OrtValue, ...]

    @classmethod
    def new(cls, s: int, hidden: int, vocab: int, with_hidden: bool) -> _StepBuffers:
        x, logits = _aligned_empty((1, s, hidden)), _aligned_empty((1, s, vocab))
        h = _aligned_empty((1, s, hidden)) if with_hidden else None
        values = tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in (x, logits, h) if a is not None)
        return cls(x, logits, h, values)

    def bind(self, b: ort.IOBinding) -> None:
        b.bind_ortvalue_input("inputs_embeds", self.values[0])
        b.bind_ortvalue_output("logits", self.values[1])
        if self.hidden is not None:
            b.bind_ortvalue_output("hidden_states", self.values[2])


def _aligned_empty(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
    """float32 array on a cache-line boundary (numpy only promises 16 bytes), as onnxruntime's
    own allocator gives its outputs: the LM head then writes whole lines."""
    n = int(np.prod(shape)) * 4
    raw = np.empty(n + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + n].view(np.float32).reshape(shape)


def _kv_dtype(session: ort.InferenceSession) -> type:
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            return np.float16 if "float16" in i.type else np.float32
    return np.float32
