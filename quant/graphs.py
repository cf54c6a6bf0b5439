"""Graph-level conversions, each a thin call into onnxruntime's own quantizers.

Which nodes get quantized is decided here, once, on the parent graph (after folding run-time
weight transposes into constants): the MatMuls (and Conv / Gemm in the vision tower) whose weight
is a constant initializer of rank >= 2. That keeps the
attention products (Q.K^T, softmax.V), and the RoPE path (position * inv_freq is a Mul, the
cos/sin caches of the optimized graph feed GroupQueryAttention) out of every integer format.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from proassist_edge.errors import ProAssistEdgeError

# Graphs past this size must keep their weights in an external data file (protobuf's 2 GiB cap).
EXTERNAL_DATA_BYTES = 1_800_000_000
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
# fp16: ops whose range or accumulation overflows or loses the decision margin in half precision
# (norm statistics, softmax, sigmoid of the decision head), and the attention op of the optimized
# graph, whose cos/sin caches must have the same type as its query (RoPE tables stay fp32).
FP16_BLOCKED_OPS = (
    "Softmax", "Pow", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal", "Cos", "Sin", "Sigmoid",
    "Erf", "LayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "GroupQueryAttention",
    "RotaryEmbedding",
)


class QuantizeError(ProAssistEdgeError):
    """A bundle could not be quantized (output exists, bad option, a quantizer failed)."""


VISION_OPS = ("MatMul", "Gemm", "Conv")  # the vision graph's weight ops (patch conv, projector)


@dataclass(frozen=True)
class WeightNode:
    """A node with a constant weight: what every quantizer here may touch."""

    name: str
    op: str
    module: str  # dotted module path, e.g. "layers.3.mlp.down_proj" or "model.layers.3.attn.qkv_proj"
    layer: int | None  # decoder layer index, None outside the layer stack (lm_head, vision)

    @property
    def group(self) -> str:
        """A keep-fp32 pattern naming this node's block: 'layers.3.' or the module's head."""
        if self.layer is not None:
            return f"layers.{self.layer}."
        return self.module.split(".")[0] or self.name


_LAYER = re.compile(r"layers\.(\d+)\.")


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from: torch.onnx's name scopes, else the node's name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            with contextlib.suppress(ValueError, SyntaxError):
                scopes = [s for s in ast.literal_eval(prop.value) if s]
                if len(scopes) > 1:
                    return str(scopes[-2])
    # onnxruntime-genai names nodes "/model/layers.0/attn/qkv_proj/MatMul"
    return node.name.strip("/").replace("/", ".").rsplit(".", 1)[0]


def weight_nodes(model: onnx.ModelProto, ops: Sequence[str] = ("MatMul",)) -> list[WeightNode]:
    inits = {i.name: len(i.dims) for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in ops and len(n.input) > 1 and inits.get(n.input[1], 0) >= 2:
            mod = module_path(n)
            m = _LAYER.search(mod + ".")
            out.append(WeightNode(n.name, n.op_type, mod, int(m.group(1)) if m else None))
    return out


def scoped(patterns: Iterable[str], graph: str) -> list[str]:
    """Patterns for one graph: "vision:PAT" / "decoder:PAT" apply to that kind only (every
    decoder variant counts as "decoder"), a bare PAT to every graph."""
    kind = "decoder" if graph.startswith("decoder") else graph
    out = []
    for p in patterns:
        scope, sep, rest = p.partition(":")
        if not sep:
            out.append(p)
        elif scope == kind:
            out.append(rest)
    return out


def matches(node: WeightNode | onnx.NodeProto, patterns: Iterable[str]) -> bool:
    """keep-fp32 patterns: a glob or a substring of the node name or of its module path."""
    name = node.name
    mod = node.module if isinstance(node, WeightNode) else module_path(node)
    for p in patterns:
        for s in (name, mod, mod + "."):
            if p in s or fnmatch.fnmatchcase(s, p):
                return True
    return False


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T) with W^T stored: torch.onnx leaves Linear weights
    transposed at run time when its optimizer is off, and onnxruntime's quantizers only take a
    constant B. Exact (a copy in the other order), and node names and metadata are kept."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    folded: dict[str, str] = {}
    for n in g.node:
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2:
            continue
        t = producer.get(n.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = inits[t.input[0]]
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
        if len(w.dims) != 2 or perm != [1, 0]:
            continue
        if t.output[0] not in folded:
            arr = numpy_helper.to_array(w).T.copy()
            g.initializer.append(numpy_helper.from_array(arr, t.output[0] + "_folded"))
            folded[t.output[0]] = t.output[0] + "_folded"
        n.input[1] = folded[t.output[0]]
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for name in folded:
        if name not in used:
            g.node.remove(producer[name])
    used = {i for n in g.node for i in n.input}
    stale = {producer[name].input[0] for name in folded} - used
    for init in [i for i in g.initializer if i.name in stale]:
        g.initializer.remove(init)
    return len(folded)


def prepare(src: Path, dst: Path, external: bool) -> onnx.ModelProto:
    """SRC with constant weights, saved as DST: what every quantizer here reads."""
    model = load(src)
    fold_weight_transposes(model)
    save(model, dst, external)
    return model


def load_structure(path: Path) -> onnx.ModelProto:
    """Nodes and initializer shapes only (weights stay on disk): enough to choose nodes."""
    return onnx.load(str(path), load_external_data=False)


def save(model: onnx.ModelProto, path: Path, external: bool) -> list[str]:
    """Write the graph; with `external`, weights go to PATH.data (returned for the manifest)."""
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=path.name + ".data", size_threshold=1024,
        )
        return [path.name + ".data"]
    onnx.save_model(model, str(path))
    return []


def data_file(path: Path) -> list[str]:
    """onnxruntime's quantizers name external data PATH.data; report it when written."""
    d = path.with_name(path.name + ".data")
    if d.is_file():
        d.chmod(0o644)  # onnx writes it 0600; a bundle is copied between users and machines
        return [d.name]
    return []


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """onnxruntime's quantizers log every node at INFO: keep the progress bar readable."""
    # (their "consider pre-processing" advice goes to the root logger at WARNING: it is about
    # shape inference for CNNs and does not apply to these graphs)
    loggers = [logging.getLogger(n) for n in ("onnxruntime", "onnxruntime.quantization", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


@dataclass(frozen=True)
class Recipe:
    """How one graph is converted. `precision`: "int8" (dynamic, CPU), "int8-qdq" (static QDQ,
    for TensorRT), "int4" (MatMulNBits weight-only) or "fp16"."""

    precision: str
    block_size: int = 32
    accuracy_level: int | None = 4  # 4: int8 compute, the fastest on CPU (the CLI default)
    per_channel: bool = True
    keep_8bit: tuple[str, ...] = ()  # int4: patterns of nodes given 8-bit weight blocks instead


def apply(
    recipe: Recipe, src: Path, dst: Path, nodes: list[str], fp32_nodes: Sequence[str] = (),
    reader: object = None, external: bool = False, ops: Sequence[str] = ("MatMul",),
) -> list[str]:
    """Convert SRC into DST. `nodes`: the weight nodes to quantize (integer formats);
    `fp32_nodes`: exact node names kept fp32 (fp16). Returns the data files written."""
    if recipe.precision == "int8":
        return quantize_dynamic_int8(src, dst, nodes, external, recipe.per_channel)
    if recipe.precision == "int8-qdq":
        return quantize_qdq_int8(src, dst, reader, nodes, external, ops, recipe.per_channel)
    if recipe.precision == "int4":
        return quantize_int4(src, dst, nodes, recipe.block_size, recipe.accuracy_level, external,
                             recipe.keep_8bit)
    if recipe.precision == "fp16":
        return convert_fp16(src, dst, fp32_nodes, external)
    raise QuantizeError(f"unknown precision {recipe.precision!r}: use int8, int8-qdq, int4 or fp16")


def quantize_dynamic_int8(
    src: Path, dst: Path, nodes: list[str], external: bool, per_channel: bool = True
) -> list[str]:
    """Weights int8 (per output channel by default), activations quantized at run time
    (MatMulInteger): the CPU path, no calibration needed. Weights use 7 bits (reduce_range): x86
    CPUs without VNNI multiply u8 x s8 pairs into saturating int16 sums, and full-range
    per-channel weights saturated there (logit error x7 on the tiny fixture, AVX2 machine)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not nodes:  # an empty list means "every node" to onnxruntime
        return save(load(src), dst, external)
    with quiet():
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
            reduce_range=True, nodes_to_quantize=nodes, use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
    return data_file(dst)


def quantize_qdq_int8(
    src: Path, dst: Path, reader: object, nodes: list[str], external: bool,
    ops: Sequence[str] = ("MatMul",), per_channel: bool = True,
) -> list[str]:
    """Static int8 in QDQ form: symmetric activations and symmetric weights (per channel by
    default), which is what TensorRT's explicit-quantization parser expects. 7-bit weights as in
    the dynamic path: onnxruntime's CPU kernels fuse the QDQ pairs into u8 x s8 products that
    saturated with 8-bit weights (vision tokens off by 25% instead of 2.6% on an AVX2 machine);
    with 7 bits one graph gives the same figures on CPU as its float emulation (3.6%)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not nodes:
        return save(load(src), dst, external)
    if reader is None:
        raise QuantizeError("static int8 (QDQ) needs calibration feeds")
    with quiet():
        quantize_static(
            str(src), str(dst), reader,  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ, per_channel=per_channel, op_types_to_quantize=list(ops),
            reduce_range=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes, use_external_data_format=external,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
            },
        )
    return data_file(dst)


def quantize_int4(
    src: Path, dst: Path, nodes: list[str], block_size: int, accuracy_level: int | None,
    external: bool, keep_8bit: Sequence[str] = (),
) -> list[str]:
    """Weight-only 4-bit blocks (MatMulNBits); activations stay float. Nodes matching a
    `keep_8bit` pattern get 8-bit blocks (MatMulNBits bits=8), the way llama.cpp's Q4 mixes keep
    the output head at 6 bits."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if not nodes:  # MatMulNBitsQuantizer treats "no include list" as "every MatMul"
        return save(load(src), dst, external)
    model = load(src)
    wanted = set(nodes)
    eight = {n.name for n in model.graph.node if n.name in wanted and matches(n, keep_8bit)}
    q = None
    for bits, chosen in ((8, [n for n in nodes if n in eight]), (4, [n for n in nodes if n not in eight])):
        if not chosen:
            continue
        # nodes_to_include adds to op_types_to_quantize: exclude every other MatMul explicitly
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(chosen)]
        with quiet():
            q = MatMulNBitsQuantizer(
                model, bits=bits, block_size=block_size, is_symmetric=True,
                accuracy_level=accuracy_level, nodes_to_include=chosen, nodes_to_exclude=others,
                quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
            )
            q.process()
        model = q.model.model
    assert q is not None
    q.model.save_model_to_file(str(dst), use_external_data_format=external)
    return data_file(dst)


def rope_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes computing the rotary tables: everything upstream of Cos/Sin, Cos/Sin, and what
    follows them while it still depends on nothing but the tables (e.g. the attention scale)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    seeds = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    keep: set[str] = set()
    stack = list(seeds)
    while stack:
        n = stack.pop()
        if n.name in keep:
            continue
        keep.add(n.name)
        stack += [producer[i] for i in n.input if i in producer]
    tables = {o for n in model.graph.node if n.name in keep for o in n.output}
    changed = True
    while changed:
        changed = False
        for n in model.graph.node:
            ins = [i for i in n.input if i and i not in inits]
            if n.name not in keep and ins and all(i in tables for i in ins):
                keep.add(n.name)
                tables.update(n.output)
                changed = True
    return keep


def fp16_blocked(model: onnx.ModelProto, extra: Sequence[str]) -> set[str]:
    """Node names to keep fp32: the blocked op types, the RoPE path, EXTRA, and any node
    sandwiched between them (e.g. the `+ eps` between ReduceMean and Sqrt of an RMSNorm, whose
    fp16 variance would overflow on the large activations LLMs have)."""
    g = model.graph
    blocked = rope_nodes(model) | set(extra) | {n.name for n in g.node if n.op_type in FP16_BLOCKED_OPS}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    changed = True
    while changed:
        changed = False
        for n in g.node:
            if n.name in blocked or not n.output:
                continue
            ups = [producer.get(i) for i in n.input if i and i not in inits]
            fed = ups and all(u is not None and (u.name in blocked or u.op_type == "Constant") for u in ups)
            feeds = all(o not in outputs and consumers.get(o) and all(c.name in blocked for c in consumers[o])
                        for o in n.output)
            if fed and feeds and any(u is not None and u.name in blocked for u in ups):
                blocked.add(n.name)
                changed = True
    return blocked


def drop_round_trips(model: onnx.ModelProto, blocked: set[str]) -> int:
    """onnxruntime's converter casts every fp32 output of a blocked node to fp16 and back before
    the next blocked node, so e.g. position * inv_freq would be rounded to fp16 between the Mul
    and the Cos (an error of radians at position 2000). Wire such fp32 -> fp16 -> fp32 pairs
    straight through; drop the casts left unused and the converter's now stale value_info."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    float_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}

    def cast_to(n: onnx.NodeProto | None) -> int | None:
        if n is None or n.op_type != "Cast":
            return None
        return next((a.i for a in n.attribute if a.name == "to"), None)

    fp32_inits = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    rename = {}
    for n in g.node:
        if cast_to(n) == onnx.TensorProto.FLOAT and n.input[0] in fp32_inits:
            rename[n.output[0]] = n.input[0]  # a no-op cast of an fp32 table (inv_freq)
            continue
        up = producer.get(n.input[0]) if n.input else None
        if cast_to(n) == onnx.TensorProto.FLOAT and cast_to(up) == onnx.TensorProto.FLOAT16:
            assert up is not None
            src = up.input[0]
            origin = producer.get(src)
            if src in float_inputs or (origin is not None and origin.name in blocked):
                rename[n.output[0]] = src
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    needed = {o.name for o in g.output}
    removed = 0
    while True:
        used = needed | {i for n in g.node for i in n.input}
        dead = [n for n in g.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    del g.value_info[:]  # re-inferred by onnxruntime at load; stale entries would mislead
    return removed


def convert_fp16(src: Path, dst: Path, fp32_nodes: Sequence[str], external: bool) -> list[str]:
    """fp16 weights and activations with fp32 graph inputs/outputs (keep_io_types); the ops in
    FP16_BLOCKED_OPS, the RoPE path and `fp32_nodes` stay fp32, with fp32 values between them."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = load(src)
    blocked = fp16_blocked(model, fp32_nodes)
    with quiet():
        half = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
            node_block_list=sorted(blocked),
        )
    drop_round_trips(half, blocked)
    return save(half, dst, external)


def nodes_matching(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    """Every node (of any op) a keep-fp32 pattern names: for fp16, where whole blocks stay fp32."""
    return [n.name for n in model.graph.node if patterns and matches(n, patterns)]


def select(nodes: list[WeightNode], keep_fp32: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names to quantize, names kept fp32 by a pattern)."""
    kept = [n.name for n in nodes if matches(n, keep_fp32)]
    return [n.name for n in nodes if n.name not in kept], kept
