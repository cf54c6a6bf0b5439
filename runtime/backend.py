"""Decoder backends over a bundle's graphs, each owning the KV memory it needs.

`GqaDecoder` drives the optimized graph (onnxruntime-genai builder, GroupQueryAttention) with one
preallocated max-length buffer per layer, bound as both past input and present output: appending
S tokens costs O(S) and nothing is copied per step. `PortableDecoder` drives the standard-op graph
(the TensorRT candidate) by feeding `present` back as `past` (the graph's own contract).
Both expose the same small interface, used only by the core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnxruntime as ort

from proassist_edge.errors import BundleError


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


def providers(prefer: str = "auto") -> list[str]:
    """Execution providers to use, best first, from what this onnxruntime build offers."""
    available = ort.get_available_providers()
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    if prefer == "cpu":
        return ["CPUExecutionProvider"]
    # TensorRT takes only the portable graph; the optimized graph runs on CUDA or CPU.
    return [p for p in order[1:] if p in available]


def physical_cores() -> int:
    """onnxruntime's own default intra-op thread count: one per physical core."""
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return os.cpu_count() or 1


def make_session(
    path: str, threads: int = 0, prefer: str = "auto", spin: bool = True
) -> ort.InferenceSession:
    """`spin=False` for small graphs run just before a big one: onnxruntime's workers otherwise
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
    try:
        return ort.InferenceSession(path, opts, providers=providers(prefer))
    except Exception as e:  # onnxruntime raises its own exception types for bad models
        raise BundleError(
            f"cannot load graph {path} ({type(e).__name__}: {e}): re-export it"
        ) from e


class GqaDecoder:
    def __init__(
        self,
        session: ort.InferenceSession,
        layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        with_hidden: bool,
    ) -> None:
        self.sess = session
        self.capacity = capacity
        shape = (1, kv_heads, capacity, head_dim)
        dtype = _kv_dtype(session)
        self.kv: list[np.ndarray] = [np.zeros(shape, dtype) for _ in range(2 * layers)]
        self.kv_ort = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.kv]
        self.mask = np.ones((1, capacity), np.int64)
        self.with_hidden = with_hidden
        # One logits buffer for every one-token step, written in place. A fresh (1, 1, V) output
        # per token cost 12% of SmolLM2's int4 decode time here (page faults on new memory);
        # onnxruntime-genai preallocates too. Its rows are valid until the next append.
        vocab = next((o.shape[-1] for o in session.get_outputs() if o.name == "logits"), None)
        self.step_logits = _aligned_empty((1, 1, vocab)) if isinstance(vocab, int) else None
        self.binding = session.io_binding()
        for i, v in enumerate(self.kv_ort):
            layer, kind = divmod(i, 2)
            name = "key" if kind == 0 else "value"
            self.binding.bind_ortvalue_input(f"past_key_values.{layer}.{name}", v)
            self.binding.bind_ortvalue_output(f"present.{layer}.{name}", v)
        self.kv_len = 0

    def append(self, embeds: np.ndarray) -> StepOut:
        s = embeds.shape[1]
        total = self.kv_len + s
        if total > self.capacity:
            raise BundleError(
                f"KV buffer full ({total} > {self.capacity}): a context strategy must run first"
            )
        b = self.binding
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        b.bind_cpu_input("attention_mask", self.mask[:, :total])
        in_place = self.step_logits if s == 1 else None
        if in_place is not None:
            b.bind_output("logits", "cpu", 0, np.float32, in_place.shape, in_place.ctypes.data)
        else:
            b.bind_output("logits")
        if self.with_hidden:
            b.bind_output("hidden_states")
        self.sess.run_with_iobinding(b)
        outs = b.get_outputs()
        # outputs come in bind order: the shared KV buffers, then logits (and hidden states)
        n = len(self.kv)
        logits = in_place[0, -1] if in_place is not None else outs[n].numpy()[0, -1]
        hidden = outs[n + 1].numpy()[0, -1] if self.with_hidden else np.empty(0, np.float32)
        self.kv_len = total
        return StepOut(logits.astype(np.float32, copy=False), hidden, None)

    def reset(self) -> None:
        self.kv_len = 0  # the buffer's stale tail is masked out by attention_mask

    def keep(self, prefix_len: int, start: int, end: int) -> None:
        """Keep [0, prefix_len) + [start, end): move the tail down once (O(end - start))."""
        n = end - start
        for a in self.kv:
            a[:, :, prefix_len : prefix_len + n] = a[:, :, start:end]  # numpy handles overlap
        self.kv_len = prefix_len + n


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
        logits, p, hidden, *present = self.sess.run(None, feeds)
        self.past = present
        self.kv_len = total
        return StepOut(
            logits[0, -1].astype(np.float32, copy=False), hidden[0, -1], float(p.reshape(-1)[-1])
        )

    def keep(self, prefix_len: int, start: int, end: int) -> None:
        self.past = [
            np.concatenate([a[:, :, :prefix_len], a[:, :, start:end]], axis=2) for a in self.past
        ]
        self.kv_len = prefix_len + end - start


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
