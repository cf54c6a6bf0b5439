"""A TensorRT engine and CUDA runtime that run on the CPU, for the tests of TensorRTDecoder.

`OrtEngine` answers the calls TensorRTDecoder makes of an engine and its execution context
(tensor names and dtypes, optimization profiles, input shapes, tensor addresses, output shapes,
execute_async_v3) with the portable decoder graph on an onnxruntime CPU session; `HostCuda`
answers the decoder's CUDA calls (malloc, copies, free) with host byte arrays and counts what is
allocated and freed. The decoder's own code (profiles, chunks, ping-pong buffers, the memory
layout per past length, keep, fill, bare steps, close) then runs as on a GPU; the engine itself
is checked on one by scripts/gpu_check.sh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from proassist_edge.manifest import Manifest
from proassist_edge.runtime.trt_decoder import TensorRTDecoder

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class _Rt:
    """The cuda-python runtime functions TensorRTDecoder calls itself (close, buffer growth)."""

    def __init__(self, cuda: HostCuda) -> None:
        self.cuda = cuda

    def cudaFree(self, ptr: int) -> tuple[int]:  # noqa: N802 - CUDA's name
        if ptr:  # cudaFree(0) does nothing, as CUDA's
            self.cuda.memory.pop(ptr)
            self.cuda.freed += 1
        return (0,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:  # noqa: N802
        self.cuda.streams -= 1
        return (0,)


class HostCuda:
    """TensorRTDecoder's `_Cuda` on host memory: a pointer is a key of `memory`."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.next, self.allocated, self.freed, self.streams = 4096, 0, 0, 1
        self.stream = 1
        self.rt = _Rt(self)

    def check(self, result: tuple[Any, ...]) -> Any:
        return result[1] if len(result) > 1 else None

    def malloc(self, nbytes: int) -> int:
        ptr, self.next = self.next, self.next + max(nbytes, 256) + 4096
        self.memory[ptr] = np.zeros(max(nbytes, 256), np.uint8)
        self.allocated += 1
        return ptr

    def to_device(self, dst: int, arr: np.ndarray) -> None:
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        self.memory[dst][: raw.size] = raw

    def to_host(self, arr: np.ndarray, src: int) -> None:
        arr.view(np.uint8).reshape(-1)[:] = self.memory[src][: arr.nbytes]

    def sync(self) -> None:
        pass

    def array(self, ptr: int, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape)) * dtype.itemsize
        return self.memory[ptr][:n].view(dtype).reshape(shape)


class _Context:
    def __init__(self, engine: OrtEngine) -> None:
        self.e = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.address: dict[str, int] = {}
        self.profile = -1
        self.runs = 0

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.address[name] = ptr
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        s, p = self.shapes["inputs_embeds"][1], self.shapes["past_key_values.0.key"][2]
        if name.startswith("present"):
            heads, dim = self.e.kv_dims
            return (1, heads, p + s, dim)
        return tuple(d if isinstance(d, int) else s for d in self.e.out_shape[name])

    def execute_async_v3(self, stream: int) -> bool:
        """The step: inputs read where their addresses point, in the shapes set; the profile's
        ranges enforced as TensorRT does; outputs written where theirs point."""
        prof = self.e.profiles[self.profile]["shapes"]
        for name, (lo, _, hi) in prof.items():
            shape = self.shapes[name]
            if not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                return False
        cuda, dt = self.e.cuda, self.e.dtypes
        feeds = {n: cuda.array(self.address[n], self.shapes[n], dt[n]).copy() for n in self.e.inputs}
        outs = self.e.sess.run(self.e.outputs, feeds)
        for name, value in zip(self.e.outputs, outs, strict=True):
            cuda.array(self.address[name], value.shape, dt[name])[...] = value
        self.runs += 1
        return True


class OrtEngine:
    """The engine calls TensorRTDecoder makes, answered by the portable graph on the CPU."""

    def __init__(self, graph: Path, profiles: Sequence[Mapping[str, Any]], cuda: HostCuda) -> None:
        self.sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        self.profiles, self.cuda = list(profiles), cuda
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        io = [*self.sess.get_inputs(), *self.sess.get_outputs()]
        self.dtypes = {v.name: np.dtype(_NP[v.type]) for v in io}
        self.out_shape = {o.name: o.shape for o in self.sess.get_outputs()}
        kv = self.sess.get_inputs()[1].shape
        self.kv_dims = (int(kv[1]), int(kv[3]))
        self.contexts: list[_Context] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i: int) -> str:
        return [*self.inputs, *self.outputs][i]

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return self.dtypes[name]

    def create_execution_context(self) -> _Context:
        self.contexts.append(_Context(self))
        return self.contexts[-1]


def engine_factory(root: Path, manifest: Manifest, profiles: Sequence[Mapping[str, Any]],
                   cuda: HostCuda | None = None) -> Any:
    """A Bundle.engine (`capacity -> TensorRTDecoder`) over the bundle's portable graph."""
    cuda = cuda or HostCuda()
    engine = OrtEngine(root / manifest.graphs["decoder"].file, profiles, cuda)
    m = manifest.model
    return lambda capacity: TensorRTDecoder(engine, profiles, m.num_layers, m.num_kv_heads,
                                            m.head_dim, capacity, cuda=cuda, nptype=np.dtype)
