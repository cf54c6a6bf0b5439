"""The decoder's weight matmuls alone, timed in turns with whole decode steps.

A decode step is the weight matmuls, then attention, norms and activations, then the loop around
the graph. The bandwidth floor (bandwidth.py) bounds only the first: the weights must be read.
Cutting the weight matmuls out of the decoder graph into a graph of their own (the same
initializers, attributes and kernels, one-token inputs, every matmul fed at once) and timing it
beside decode steps says where the distance to the floor is: when the matmul kernels alone are
far from it, they are compute-bound on this CPU, and no change to the graph or the loop can
bring the step under them.

A weight matmul is a MatMulNBits node, a MatMul with a 2-D initializer (or its Transpose, as
torch's exporter writes the portable graph) as B, or an int8
MatMulInteger with its DynamicQuantizeLinear of the activation, the scale Mul and the
Cast/Mul that turn its int32 output back to float (the chain onnxruntime fuses at load).
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from proassist_edge.bench.bandwidth import CoreStep, _back, _mark, _ms, fill
from proassist_edge.runtime.backend import make_session
from proassist_edge.runtime.bundle import Bundle


def _chain(node: Any, inits: dict[str, Any], producer: dict[str, Any],
           consumers: dict[str, list[Any]]) -> tuple[list[Any], str, int, str] | None:
    """(nodes, activation input, K, float output) of one weight matmul, or None."""
    import onnx

    if node.op_type == "MatMulNBits":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return [node], node.input[0], int(attrs["K"]), node.output[0]
    if node.op_type == "MatMul":  # B a 2-D initializer, or one transposed (torch's export)
        b, t = node.input[1], producer.get(node.input[1])
        if b in inits and len(inits[b].dims) == 2:
            return [node], node.input[0], int(inits[b].dims[0]), node.output[0]
        w = inits.get(t.input[0]) if t is not None and t.op_type == "Transpose" else None
        if w is not None and len(w.dims) == 2:
            return [t, node], node.input[0], int(w.dims[1]), node.output[0]
        return None
    if node.op_type != "MatMulInteger" or node.input[1] not in inits:
        return None
    dims = list(inits[node.input[1]].dims)
    if len(dims) != 2:
        return None
    quant = producer.get(node.input[0])
    if quant is None or quant.op_type != "DynamicQuantizeLinear":
        return None
    nodes = [quant, *(c for o in quant.output for c in consumers[o] if c is not node), node]
    out = node.output[0]
    while len(nxt := consumers[out]) == 1 and nxt[0].op_type in ("Cast", "Mul"):
        nodes.append(nxt[0])
        out = nxt[0].output[0]
    made = {o for n in nodes for o in n.output}
    if any(i and i not in made and i not in inits and i != quant.input[0]
           for n in nodes for i in n.input):
        return None  # the pattern reads something else of the graph: not a plain weight matmul
    return nodes, quant.input[0], int(dims[0]), out


def _float_type(chain: list[Any], inits: dict[str, Any]) -> int | None:
    """The ONNX float type of the first float initializer a weight matmul reads (its weight, or
    MatMulNBits' scales): the type its activation input must have."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for n in chain:
        for i in n.input[1:]:
            if i in inits and inits[i].data_type in floats:
                return int(inits[i].data_type)
    return None


def weight_only_model(path: Path) -> tuple[Any, Counter[str], int] | None:
    """The decoder's weight matmuls as a graph of their own, with its op-type counts and the
    number of weight matmuls; None when the graph has none this module recognizes."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))  # with external data: the new graph carries the weights
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    elem = next((i.type.tensor_type.elem_type for i in g.input if i.name == "inputs_embeds"),
                onnx.TensorProto.FLOAT)
    nodes: list[Any] = []
    inputs: dict[tuple[int, int], Any] = {}
    outputs: list[Any] = []
    used: set[str] = set()
    taken: set[int] = set()
    for node in g.node:
        if (c := _chain(node, inits, producer, consumers)) is None:
            continue
        chain, x, k, out = c
        # the weights' float type: an fp16 graph with float32 edges computes its matmuls in fp16
        t = _float_type(chain, inits) or elem
        name = f"x{k}_{t}"
        inputs.setdefault((k, t), helper.make_tensor_value_info(name, t, [1, 1, k]))
        for n in chain:
            if id(n) in taken:  # a weight's Transpose shared by two matmuls: copied once
                continue
            taken.add(id(n))
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.input[:] = [name if i == x else i for i in n.input]
            nodes.append(copy)
            used.update(i for i in n.input if i in inits)
        outputs.append(helper.make_tensor_value_info(out, t, None))
    if not outputs:
        return None
    weights = [inits[n] for n in inits if n in used]
    graph = helper.make_graph(nodes, "weight_matmuls", list(inputs.values()), outputs, weights)
    cut = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return cut, Counter(n.op_type for n in nodes), len(outputs)


def time_weight_matmuls(
    decoder_path: Path, step: Callable[[], object], threads: int, reps: int = 8, runs: int = 12
) -> dict[str, Any]:
    """Median ms of the weight-matmul graph and of `step` (one decode step), `runs` of each in
    turns, `reps` rounds after a warm-up round; their ratio is taken round by round."""
    try:
        import onnx
    except ImportError:  # a runtime-only install: the bench still runs without this figure
        return {"weight_matmuls_ms": None, "note": "onnx is not installed (pip install onnx)"}
    cut = weight_only_model(decoder_path)
    if cut is None:
        return {"weight_matmuls_ms": None, "note": "no weight matmul recognized in the graph"}
    model, ops, count = cut
    with tempfile.TemporaryDirectory(prefix="proassist-weights-") as tmp:
        path = Path(tmp) / "weights.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="weights.onnx.data")
        del model
        sess = make_session(str(path), threads, prefer="cpu")
        # inputs and outputs bound once, as the decoder's are: a fresh output per run (the LM
        # head's is a vocabulary of floats) would add page faults the decode step never pays
        feeds = {i.name: np.full(i.shape, 0.5, np.float16 if "float16" in i.type else np.float32)
                 for i in sess.get_inputs()}
        binding = sess.io_binding()
        for name, x in feeds.items():
            binding.bind_cpu_input(name, x)
        names = [o.name for o in sess.get_outputs()]
        keep = [ort.OrtValue.ortvalue_from_numpy(np.empty_like(y))  # referenced: kept alive
                for y in sess.run(names, feeds)]
        for name, value in zip(names, keep, strict=True):
            binding.bind_ortvalue_output(name, value)
        kern, steps = _in_turns(lambda: sess.run_with_iobinding(binding), step, reps, runs)
    return {
        "weight_matmuls_ms": float(np.median(kern)),
        "decode_step_ms": float(np.median(steps)),
        "weight_matmuls_share": float(np.median(np.divide(kern, steps))),
        "weight_matmuls": count,
        "op_types": dict(ops),
    }


def _in_turns(
    a: Callable[[], object], b: Callable[[], object], reps: int, runs: int
) -> tuple[list[float], list[float]]:
    """Per round the median ms of `runs` calls of a, then of b; round 0 warms up."""
    ta, tb = [], []
    for r in range(reps + 1):
        ma = float(np.median([_ms(a) for _ in range(runs)]))
        mb = float(np.median([_ms(b) for _ in range(runs)]))
        if r:
            ta.append(ma)
            tb.append(mb)
    return ta, tb


def decode_step_at(b: Bundle, context: int) -> Callable[[], object]:
    """One decode step as the core runs it (embedding lookup and append) at `context` tokens
    of KV memory, put back to that context before every call."""
    dec = b.new_decoder(context + 2)
    fill(dec, context, np.random.default_rng(0))
    mark, step, token = _mark(dec), CoreStep(b, dec), int(b.manifest.model.eos_id)

    def run() -> object:
        _back(dec, mark)
        return step.token(token)

    return run

