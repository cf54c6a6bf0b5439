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
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from proassist_edge.embedding_table import Rows
from proassist_edge.errors import ExportError

ALIGN = 64  # bytes: each tensor starts on a cache line in the data file
INLINE_BYTES = 1024  # smaller tensors stay inside the graph file
HEAD_CHUNK = 8192  # vocabulary rows of the head quantized at a time (64 MB of fp32 at hidden 2048)


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
        return self.put_blocks(name, array.shape, array.dtype, iter([array]))

    def put_blocks(self, name: str, shape: tuple[int, ...], dtype: np.dtype,
                   blocks: Iterator[np.ndarray]) -> TensorProto:
        """A tensor written block by block (its leading rows in order)."""
        pad = -self.offset % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        start = self.offset
        for block in blocks:
            self.f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())  # a bounded copy
            self.offset += block.nbytes
        length = self.offset - start
        if length != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ExportError(f"{name}: {length} bytes written for a {dtype} tensor of {shape}")
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                        dims=shape, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(start)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
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


def nbits_node(x: str, q: str, s: str, out: str, name: str, k: int, n: int, block_size: int,
               accuracy_level: int) -> onnx.NodeProto:
    """MatMulNBits as onnxruntime's quantizer writes it (symmetric: no zero points)."""
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": 4, "block_size": block_size}
    if accuracy_level:  # 0 is the attribute's default, which most EPs expect absent
        attrs["accuracy_level"] = accuracy_level
    return helper.make_node("MatMulNBits", [x, q, s], [out], name=name, domain="com.microsoft", **attrs)


def add_head(g: onnx.GraphProto, writer: DataWriter, head: tuple[Rows, tuple[int, int]],
             block_size: int, accuracy_level: int) -> tuple[TensorProto, TensorProto, onnx.NodeProto]:
    """hidden_states -> logits through the head, 4-bit; `logits` becomes the graph's first output."""
    rows, (vocab, hidden) = head
    blocks = (hidden + block_size - 1) // block_size
    scales = np.zeros((vocab, blocks), np.float32)
    q = writer.put_blocks("lm_head.MatMul.weight_Q4", (vocab, blocks, block_size // 2), np.dtype(np.uint8),
                          head_blocks(rows, vocab, block_size, scales))
    s = writer.put("lm_head.MatMul.weight_scales", scales)
    node = nbits_node("hidden_states", q.name, s.name, "logits", "/lm_head/MatMul_Q4", hidden, vocab,
                      block_size, accuracy_level)
    states = next(o for o in g.output if o.name == "hidden_states")
    dims = [d.dim_param or str(d.dim_value) for d in states.type.tensor_type.shape.dim][:-1]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*dims, vocab])
    g.output.insert(0, logits)
    return q, s, node


def weight_matmuls(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Initializer name -> the MatMul that uses it as its 2-D weight (B)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(shapes.get(n.input[1], [])) == 2:
            out[n.input[1]] = n
    return out


def head_blocks(
    rows: Rows, vocab: int, block_size: int, scales: np.ndarray, chunk: int = HEAD_CHUNK
) -> Iterator[np.ndarray]:
    """The head (hidden x vocab, the table's rows transposed) quantized a block of vocabulary
    columns at a time: each column's blocks depend on that column only. Yields packed rows and
    fills SCALES (vocab, blocks)."""
    for a in range(0, vocab, chunk):
        b = min(a + chunk, vocab)
        packed, s = block_quantize(np.ascontiguousarray(rows(a, b).T), block_size)
        scales[a:b] = s
        yield packed


def quantize_int4_streaming(
    src: Path, dst: Path, block_size: int = 32, accuracy_level: int = 4,
    data_name: str = "model.onnx.data", head: tuple[Rows, tuple[int, int]] | None = None,
) -> tuple[list[str], int]:
    """SRC (float32 weights, external data beside it) -> DST with every constant-weight MatMul
    as 4-bit MatMulNBits, its data in DST's folder as DATA_NAME. With HEAD ((rows, (vocab,
    hidden)) of the LM head's weight), SRC ends at its `hidden_states` output and the head is
    added as one more 4-bit MatMulNBits giving `logits`, quantized a block of rows at a time.
    Returns (data files, nodes quantized)."""
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
            new_nodes[node.name] = nbits_node(node.input[0], q.name, s.name, node.output[0],
                                              f"{node.name}_Q4", k, n, block_size, accuracy_level)
        if head is not None:
            added = add_head(g, writer, head, block_size, accuracy_level)
            kept += added[:2]
            new_nodes["/lm_head/MatMul"] = added[2]
    quantized = len(new_nodes)
    nodes = [new_nodes.pop(n.name, n) for n in g.node] + list(new_nodes.values())  # + the head
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    (dst.parent / data_name).chmod(0o644)
    return [data_name], quantized
