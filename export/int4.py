"""Weight-only int4 (MatMulNBits) of a graph whose weights live in an external data file, one
weight at a time.

onnxruntime-genai's builder quantizes to int4 by serializing the whole float32 model into memory
first (`to_nbits`: 4 bytes per parameter, 32 GB for an 8B model) and onnxruntime's
MatMulNBitsQuantizer also takes a loaded model. Here the float32 graph the builder wrote is read
one tensor at a time from its data file (memory-mapped) and the int4 graph's data is written as
it goes, so the peak is one float32 weight (the head: vocab x hidden) on top of the graph's
structure. Each weight goes through onnxruntime's own block quantizer (the kernel
`quantize --precision int4` uses), with the same attributes: symmetric blocks of `block_size`,
fp32 scales, QOperator MatMulNBits with `accuracy_level`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from proassist_edge.errors import ExportError

ALIGN = 64  # bytes: each tensor starts on a cache line in the data file
INLINE_BYTES = 1024  # smaller tensors stay inside the graph file


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def read_tensor(t: TensorProto, base: Path) -> np.ndarray:
    """One initializer's values; an external one is memory-mapped, not read whole."""
    if t.data_location != TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(t)
    info = _external(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    offset = int(info.get("offset", 0))
    shape = tuple(int(d) for d in t.dims)
    return np.memmap(base / info["location"], dtype=dtype, mode="r", offset=offset, shape=shape)


class DataWriter:
    """Appends tensors to one external data file and points their protos at it."""

    def __init__(self, f: BinaryIO, location: str) -> None:
        self.f, self.location, self.offset = f, location, 0

    def put(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_BYTES:
            return onnx.numpy_helper.from_array(array, name)
        pad = -self.offset % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        self.f.write(array.tobytes())  # one tensor at a time: the copy is bounded
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                        dims=array.shape, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(self.offset)),
                     ("length", str(array.nbytes))):
            t.external_data.add(key=k, value=v)
        self.offset += array.nbytes
        return t


def block_quantize(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 (N, blocks, block_size / 2), fp32 scales (N, blocks)) of W (K, N)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w.shape
    blocks = (k + block_size - 1) // block_size
    w = np.ascontiguousarray(w, dtype=np.float32)
    if blocks * block_size != k:
        w = np.pad(w, ((0, blocks * block_size - k), (0, 0)))
    packed = np.zeros((n, blocks, block_size // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block_size, n, k, True)
    return packed, scales


def weight_matmuls(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Initializer name -> the MatMul that uses it as its 2-D weight (B)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(shapes.get(n.input[1], [])) == 2:
            out[n.input[1]] = n
    return out


def quantize_int4_streaming(
    src: Path, dst: Path, block_size: int = 32, accuracy_level: int = 4,
    data_name: str = "model.onnx.data", progress: Iterator[None] | None = None,
) -> tuple[list[str], int]:
    """SRC (float32 weights, external data beside it) -> DST with every constant-weight MatMul
    as 4-bit MatMulNBits, its data in DST's folder as DATA_NAME. Returns (data files, nodes
    quantized)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"int4 block size {block_size}: use a power of two >= 16")
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    targets = weight_matmuls(model)
    by_name = {t.name: t for t in g.initializer}
    kept: list[TensorProto] = []
    new_nodes: dict[str, onnx.NodeProto] = {}
    with open(dst.parent / data_name, "wb") as f:
        writer = DataWriter(f, data_name)
        for name, t in by_name.items():
            values = read_tensor(t, src.parent)
            node = targets.get(name)
            if node is None or values.dtype != np.float32:
                kept.append(writer.put(name, np.asarray(values)))
                continue
            k, n = values.shape
            packed, scales = block_quantize(values, block_size)
            del values  # unmaps the float32 weight
            q, s = writer.put(f"{name}_Q4", packed), writer.put(f"{name}_scales", scales)
            kept += [q, s]
            attrs = {"K": k, "N": n, "bits": 4, "block_size": block_size}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            new_nodes[node.name] = helper.make_node(
                "MatMulNBits", [node.input[0], q.name, s.name], list(node.output),
                name=f"{node.name}_Q4", domain="com.microsoft", **attrs,
            )
            if progress is not None:
                next(progress, None)
    nodes = [new_nodes.get(n.name, n) for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    (dst.parent / data_name).chmod(0o644)
    return [data_name], len(new_nodes)
