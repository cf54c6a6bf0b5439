"""The runtime's TensorRT backend: a serialized engine of the portable decoder behind the same
`Decoder` interface as the onnxruntime sessions (append / reset / keep).

`engine_decoder_factory` is what `open_bundle` calls: it reads the manifest's `engines` entry
(written by `build-engine`), refuses an engine built for another device or TensorRT version
(EngineMismatchError) and needs `tensorrt` and `cuda-python` (MissingDependencyError); the
caller falls back to onnxruntime on either, with the message. The past/present KV stays on the
GPU in two ping-pong buffers per tensor sized for the bundle's capacity: a step copies only
the new embeddings in and the last position's outputs out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from proassist_edge.errors import BundleError, MissingDependencyError
from proassist_edge.manifest import Manifest
from proassist_edge.runtime.backend import StepOut
from proassist_edge.runtime.engine import (
    INPUTS_EMBEDS,
    check_engine_compat,
    import_tensorrt,
    past_key_value_names,
)

OUTPUTS = ("logits", "p_not_talk", "hidden_states")  # the portable graph's, besides present KV


def choose_profile(profiles: Sequence[Mapping[str, Any]], new: int, past: int) -> int:
    """Index of the first profile whose ranges hold `new` embeddings over `past` cached ones."""
    for i, prof in enumerate(profiles):
        shapes = prof["shapes"]
        (lo, _, hi) = shapes[INPUTS_EMBEDS]
        kv = next((v for k, v in shapes.items() if k.startswith("past_key_values")), None)
        if lo[1] <= new <= hi[1] and (kv is None or kv[0][2] <= past <= kv[2][2]):
            return i
    raise BundleError(
        f"no TensorRT profile takes {new} new tokens over {past} cached ones: rebuild the engine "
        "with `proassist-edge build-engine` after changing max_seq_len or the step size"
    )


def max_step(profiles: Sequence[Mapping[str, Any]], past: int) -> int:
    """The most new tokens one step can take over `past` cached ones (the largest
    inputs_embeds length among the profiles whose KV range holds `past`); 0 when none does."""
    best = 0
    for prof in profiles:
        shapes = prof["shapes"]
        kv = next((v for k, v in shapes.items() if k.startswith("past_key_values")), None)
        if kv is None or kv[0][2] <= past <= kv[2][2]:
            best = max(best, int(shapes[INPUTS_EMBEDS][2][1]))
    return best


def append_in_chunks(step: Callable[[np.ndarray], StepOut], embeds: np.ndarray, past: int,
                     limit: Callable[[int], int]) -> StepOut:
    """Append (1, S, H) `embeds` over `past` cached tokens through `step`, in chunks of at most
    limit(past so far) tokens: the opening prompt with the task knowledge, a summary request or
    a long user turn can exceed the engine's frame profile. Causal attention makes the last
    chunk's outputs those of one append (up to float rounding; tests/test_trt_chunks.py)."""
    done, total, out = 0, embeds.shape[1], None
    while done < total:
        n = min(total - done, limit(past + done))
        if n < 1:
            raise BundleError(f"no TensorRT profile takes a step over {past + done} cached tokens: "
                              "rebuild the engine with `proassist-edge build-engine`")
        out = step(embeds[:, done : done + n])
        done += n
    if out is None:
        raise BundleError("an append of no tokens")
    return out


class ChunkedDecoder:
    """Any decoder whose appends are cut into chunks of at most `max_new` tokens: the CPU
    stand-in for an engine's profile limit (tests), and a guard for graphs with a fixed step."""

    def __init__(self, inner: Any, max_new: int) -> None:
        self.inner, self.max_new = inner, max_new

    @property
    def kv_len(self) -> int:
        return int(self.inner.kv_len)

    @kv_len.setter
    def kv_len(self, n: int) -> None:  # a benchmark puts the memory back to a mark
        self.inner.kv_len = n

    @property
    def capacity(self) -> int:
        return int(self.inner.capacity)

    def append(self, embeds: np.ndarray) -> StepOut:
        return append_in_chunks(self.inner.append, embeds, self.inner.kv_len, lambda _: self.max_new)

    def reset(self) -> None:
        self.inner.reset()

    def keep(self, prefix_len: int, start: int, end: int) -> None:
        self.inner.keep(prefix_len, start, end)

    @property
    def past(self) -> list[np.ndarray]:
        """The inner decoder's past list, where it keeps its memory in one (PortableDecoder)."""
        return cast(list[np.ndarray], self.inner.past)

    @past.setter
    def past(self, past: list[np.ndarray]) -> None:
        self.inner.past = past

    def fill_kv(self, end: int, values: Callable[[tuple[int, ...]], np.ndarray]) -> None:
        self.inner.fill_kv(end, values)

    def bare_step(self, embeds: np.ndarray) -> Callable[[], object]:
        """The inner graph alone on `embeds` over the memory as it is now (inputs built once)."""
        if embeds.shape[1] > self.max_new:
            raise BundleError(f"a bare step of {embeds.shape[1]} tokens exceeds the profile's "
                              f"{self.max_new}")
        if hasattr(self.inner, "bare_step"):
            return cast(Callable[[], object], self.inner.bare_step(embeds))
        feeds = dict(zip(self.inner.names, self.inner.past, strict=True))  # a PortableDecoder
        feeds[INPUTS_EMBEDS] = np.ascontiguousarray(embeds, np.float32)
        sess = self.inner.sess
        return lambda: sess.run(None, feeds)


def repack_kv(kv: np.ndarray, prefix_len: int, start: int, end: int) -> np.ndarray:
    """(1, heads, past, dim) -> the prefix and [start, end) rows, packed (context strategies)."""
    return np.ascontiguousarray(np.concatenate([kv[:, :, :prefix_len], kv[:, :, start:end]], axis=2))


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise MissingDependencyError(
                "cuda-python", "Running TensorRT engines",
                "pip install cuda-python (the major version of the device's CUDA)",
            ) from e
    return cudart


class _Cuda:
    """The few CUDA runtime calls the decoder needs, with errors raised."""

    def __init__(self) -> None:
        self.rt = _cudart()
        self.stream = self.check(self.rt.cudaStreamCreate())

    def check(self, result: tuple[Any, ...]) -> Any:
        err, *rest = result
        if int(err) != 0:
            raise BundleError(f"CUDA call failed: {self.rt.cudaGetErrorName(err)[1]}")
        return rest[0] if rest else None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 256))))

    def to_device(self, dst: int, arr: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes, kind, self.stream))

    def to_host(self, arr: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes, kind, self.stream))

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream))


class TensorRTDecoder:
    """The portable decoder's engine. Inputs: inputs_embeds (1, S, H) and past KV (1, h, P, d);
    outputs: logits, p_not_talk, hidden_states and present KV (1, h, P + S, d)."""

    def __init__(self, engine: Any, profiles: Sequence[Mapping[str, Any]], layers: int,
                 kv_heads: int, head_dim: int, capacity: int, cuda: Any = None,
                 nptype: Callable[[Any], Any] | None = None) -> None:
        """`cuda` (the CUDA runtime calls, `_Cuda`) and `nptype` (TensorRT's dtype -> numpy)
        default to the real ones; the CPU tests pass host-memory stand-ins."""
        nptype = nptype or import_tensorrt().nptype
        self.cuda = cuda or _Cuda()
        self.closed = False
        self.engine, self.profiles, self.capacity = engine, list(profiles), capacity
        self.ctx = engine.create_execution_context()
        self.names = past_key_value_names(layers)
        self.kv_shape = (1, kv_heads, capacity, head_dim)
        self.dtype = {n: np.dtype(nptype(engine.get_tensor_dtype(n)))
                      for n in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))}
        kv_bytes = int(np.prod(self.kv_shape)) * self.dtype[self.names[0]].itemsize
        self.kv: list[list[int]] = []  # ping-pong: the present of one step is the next's past
        self.out: dict[str, tuple[int, int]] = {}  # output name -> (device pointer, bytes)
        self.embeds = (0, 0)
        try:  # a failed allocation (out of memory) frees what was taken before it
            for _ in self.names:
                self.kv.append([self.cuda.malloc(kv_bytes), self.cuda.malloc(kv_bytes)])
        except BaseException:
            self.close()
            raise
        self.side = 0
        self.profile = -1
        self.reset()

    def reset(self) -> None:
        self.kv_len = 0

    def close(self) -> None:
        """Free the device buffers (every KV ping-pong pair, the inputs and outputs) and the
        stream; the decoder is unusable afterwards. Also on `with` exit and garbage collection."""
        if getattr(self, "closed", True):  # closed, or __init__ failed before the buffers
            return
        self.closed, cuda = True, self.cuda
        pointers = [p for pair in self.kv for p in pair] + [self.embeds[0]]
        pointers += [ptr for ptr, _ in self.out.values()]
        self.kv, self.out, self.embeds = [], {}, (0, 0)
        for ptr in pointers:
            if ptr:
                cuda.rt.cudaFree(ptr)
        cuda.rt.cudaStreamDestroy(cuda.stream)

    def __enter__(self) -> TensorRTDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone already
            pass

    def _buffer(self, nbytes: int, current: tuple[int, int]) -> tuple[int, int]:
        if nbytes <= current[1]:
            return current
        self.cuda.check(self.cuda.rt.cudaFree(current[0]))
        return self.cuda.malloc(nbytes), nbytes

    def append(self, embeds: np.ndarray) -> StepOut:
        """Append (1, S, H) embeddings: in chunks that fit the engine's profiles where S is
        longer than its frame profile allows (the first prompt, a summary request)."""
        if self.kv_len + embeds.shape[1] > self.capacity:
            raise BundleError(f"KV memory full ({self.kv_len + embeds.shape[1]} > {self.capacity}): "
                              "a context strategy must run first")
        if self.closed:
            raise BundleError("this TensorRT decoder was closed: make a new one (Bundle.new_decoder)")
        return append_in_chunks(self._step, embeds, self.kv_len, lambda p: max_step(self.profiles, p))

    def _bind(self, embeds: np.ndarray) -> None:
        """The step's profile, its embeddings copied to the device, every shape and address
        set: past KV from this side of the ping-pong pair, present to the other."""
        new, past = embeds.shape[1], self.kv_len
        profile = choose_profile(self.profiles, new, past)
        if profile != self.profile:
            self.ctx.set_optimization_profile_async(profile, self.cuda.stream)
            self.profile = profile
        x = np.ascontiguousarray(embeds, dtype=self.dtype[INPUTS_EMBEDS])
        self.embeds = self._buffer(x.nbytes, self.embeds)
        self.cuda.to_device(self.embeds[0], x)
        self.ctx.set_input_shape(INPUTS_EMBEDS, x.shape)
        self.ctx.set_tensor_address(INPUTS_EMBEDS, self.embeds[0])
        for i, name in enumerate(self.names):
            self.ctx.set_input_shape(name, (*self.kv_shape[:2], past, self.kv_shape[3]))
            self.ctx.set_tensor_address(name, self.kv[i][self.side])
            self.ctx.set_tensor_address(name.replace("past_key_values", "present"), self.kv[i][1 - self.side])
        for name in OUTPUTS:
            nbytes = int(np.prod(self.ctx.get_tensor_shape(name))) * self.dtype[name].itemsize
            self.out[name] = self._buffer(nbytes, self.out.get(name, (0, 0)))
            self.ctx.set_tensor_address(name, self.out[name][0])

    def _execute(self) -> None:
        if not self.ctx.execute_async_v3(self.cuda.stream):
            raise BundleError("TensorRT failed to run the decoder step; see its log")

    def _step(self, embeds: np.ndarray) -> StepOut:
        self._bind(embeds)
        self._execute()
        host = {}
        for name in OUTPUTS:
            shape = tuple(self.ctx.get_tensor_shape(name))
            host[name] = np.empty(shape, self.dtype[name])
            self.cuda.to_host(host[name], self.out[name][0])
        self.cuda.sync()
        self.side, self.kv_len = 1 - self.side, self.kv_len + embeds.shape[1]
        logits, hidden = host["logits"].reshape(-1, host["logits"].shape[-1]), host["hidden_states"]
        return StepOut(logits[-1].astype(np.float32), hidden.reshape(-1, hidden.shape[-1])[-1],
                       float(host["p_not_talk"].reshape(-1)[-1]))

    def bare_step(self, embeds: np.ndarray) -> Callable[[], object]:
        """The engine alone (a benchmark's bare run): `embeds` over the memory as it is now,
        everything bound and copied to the device once; a call executes and waits, and neither
        reads the outputs back nor moves the memory on. Any append binds again."""
        if self.closed:
            raise BundleError("this TensorRT decoder was closed: make a new one (Bundle.new_decoder)")
        self._bind(embeds)

        def run() -> None:
            self._execute()
            self.cuda.sync()

        return run

    def _read(self, i: int) -> np.ndarray:
        """Host copy of buffer i's memory, (1, kv_heads, kv_len, head_dim)."""
        kv = np.empty((*self.kv_shape[:2], self.kv_len, self.kv_shape[3]), self.dtype[self.names[i]])
        self.cuda.to_host(kv, self.kv[i][self.side])
        self.cuda.sync()
        return kv

    def _write(self, i: int, kv: np.ndarray) -> None:
        self.cuda.to_device(self.kv[i][self.side], np.ascontiguousarray(kv, self.dtype[self.names[i]]))
        self.cuda.sync()

    def fill_kv(self, end: int, values: Callable[[tuple[int, ...]], np.ndarray]) -> None:
        """As the onnxruntime decoders' fill_kv: values((1, kv_heads, end - kv_len, head_dim))
        appended to every past key and value (layer order), by a round trip through the host
        (a benchmark's setup, never a step)."""
        if end > self.capacity:
            raise BundleError(f"KV memory full ({end} > {self.capacity})")
        n = end - self.kv_len
        for i in range(len(self.names)):
            old = self._read(i)
            self._write(i, np.concatenate([old, values((*old.shape[:2], n, old.shape[3]))], axis=2))
        self.kv_len = end

    def keep(self, prefix_len: int, start: int, end: int) -> None:
        """Context strategies: a rare event, so the KV makes a round trip through the host."""
        for i in range(len(self.names)):
            self._write(i, repack_kv(self._read(i), prefix_len, start, end))
        self.kv_len = prefix_len + end - start


def engine_decoder_factory(root: Path, manifest: Manifest) -> Callable[[int], TensorRTDecoder]:
    """A `capacity -> Decoder` factory for the bundle's engine. Raises EngineMismatchError for an
    engine built elsewhere and MissingDependencyError without tensorrt / cuda-python."""
    meta = next(iter(manifest.engines.values()))
    check_engine_compat(meta)
    return engine_file_factory(root / meta["file"], meta["profiles"], manifest)


def engine_file_factory(path: Path, profiles: Sequence[Mapping[str, Any]],
                        manifest: Manifest) -> Callable[[int], TensorRTDecoder]:
    """The factory of the engine at `path` (build-engine checks one before recording it)."""
    trt = import_tensorrt()
    _cudart()
    if not path.is_file():
        raise BundleError(f"{path} is listed in the manifest but missing: run build-engine again")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BundleError(f"TensorRT could not load {path}: rebuild it with build-engine")
    m = manifest.model
    return lambda capacity: TensorRTDecoder(engine, profiles, m.num_layers, m.num_kv_heads,
                                            m.head_dim, capacity)
