"""The builder's fp16 decoder, edited to the bundle's contract without reading its weights.

onnxruntime-genai's builder makes fp16 decoders for GPUs only (`-p fp16 -e cuda`): fp16
inputs, outputs, KV cache and GroupQueryAttention, whose rotary cos/sin tables then are fp16 as
well. Two edits of the graph's structure (the weights stay in their data file, untouched):

- float32 at the edges, as every bundle graph (`quantize --precision fp16` keeps its I/O types
  the same way): `inputs_embeds` is cast to fp16 inside, `logits` and `hidden_states` back;
- attention in float32: each GroupQueryAttention gets its packed q/k/v cast up and its output
  cast down, float32 past/present KV, and cos/sin tables computed in float32 from the LLM's
  rotary frequencies (proassist-reference.md, Numerics: RoPE tables stay fp32 in every
  precision; the tables equal the builder's float32 ones).

That graph (`decoder_gqa`) is the one verified and run on the CPU. onnxruntime's CUDA
GroupQueryAttention has kernels for fp16 and bf16 only, so on the CUDA EP its float32 attention
would run on the CPU, with the KV memory copied across each step. `write_cuda_decoder` derives
the CUDA EP's graph (`decoder_cuda`) from it: the same weights (the same data file, nothing
copied), float32 edges, and attention as the builder made it for `cuda`: fp16 q/k/v, fp16 KV
memory, and the float32 cos/sin tables rounded to fp16 (the kernel takes them in its own type;
RoPE's angles are still computed in float32). onnxruntime 1.32's CPU provider has an fp16
GroupQueryAttention kernel, so export verifies this graph on the CPU EP too (verify.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
IO_CAST = ("logits", "hidden_states")


def rope_tables(llm_dir: Path, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (length, head_dim / 2) in float32, as the builder's float32 graph has them:
    position x inverse frequency in float32, scaled by the rope type's attention factor."""
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(AutoConfig.from_pretrained(str(llm_dir)))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), rot.inv_freq.float())
    scale = float(rot.attention_scaling)
    return (freqs.cos() * scale).numpy(), (freqs.sin() * scale).numpy()


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new


def _set_type(values: list[onnx.ValueInfoProto], names: set[str], elem: int) -> None:
    for v in values:
        if v.name in names:
            v.type.tensor_type.elem_type = elem


def fp32_edges_and_attention(model: onnx.ModelProto, llm_dir: Path) -> int:
    """Edit MODEL in place (see the module docstring); returns the attention nodes kept fp32."""
    g = model.graph
    added: list[onnx.NodeProto] = []
    # inputs_embeds: float32 in, fp16 inside
    _rename_uses(g, "inputs_embeds", "inputs_embeds_fp16")
    added.append(helper.make_node("Cast", ["inputs_embeds"], ["inputs_embeds_fp16"],
                                  name="/model/inputs_embeds/Cast", to=FLOAT16))
    _set_type(list(g.input), {"inputs_embeds"}, FLOAT)
    # logits, hidden states: fp16 inside, float32 out
    for name in IO_CAST:
        if not any(o.name == name for o in g.output):
            continue
        for n in g.node:
            n.output[:] = [f"{name}_fp16" if o == name else o for o in n.output]
        _rename_uses(g, name, f"{name}_fp16")
        added.append(helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"/model/{name}/Cast",
                                      to=FLOAT))
    _set_type(list(g.output), set(IO_CAST), FLOAT)
    # attention in float32
    kv: set[str] = set()
    count = 0
    tables: set[str] = set()
    for n in g.node:
        if n.op_type != "GroupQueryAttention":
            continue
        count += 1
        packed = n.input[0]
        added.append(helper.make_node("Cast", [packed], [f"{packed}_fp32"], name=f"{n.name}/q/Cast",
                                      to=FLOAT))
        n.input[0] = f"{packed}_fp32"
        for i in (1, 2):  # separate key/value inputs, when the graph has them
            if n.input[i]:
                added.append(helper.make_node("Cast", [n.input[i]], [f"{n.input[i]}_fp32"],
                                              name=f"{n.name}/kv{i}/Cast", to=FLOAT))
                n.input[i] = f"{n.input[i]}_fp32"
        kv.update(x for x in (n.input[3], n.input[4], n.output[1], n.output[2]) if x)
        tables.update(x for x in n.input[7:9] if x)
        out = n.output[0]
        n.output[0] = f"{out}_fp32"
        added.append(helper.make_node("Cast", [n.output[0]], [out], name=f"{n.name}/out/Cast",
                                      to=FLOAT16))
    _set_type(list(g.input) + list(g.output), kv, FLOAT)
    for t in list(g.initializer):
        if t.name in tables:
            length = int(t.dims[0])
            g.initializer.remove(t)
    if tables:
        cos, sin = rope_tables(llm_dir, length)
        names = sorted(tables)  # cos_cache, sin_cache
        for name in names:
            g.initializer.append(onnx.numpy_helper.from_array(cos if "cos" in name else sin, name))
    g.node.extend(added)
    del g.value_info[:]  # stale types of edited values; onnxruntime infers them again
    _toposort(g)
    return count


def _toposort(g: onnx.GraphProto) -> None:
    """Nodes in dependency order (the casts were appended at the end)."""
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(x in ready for x in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


CUDA_FILE = "decoder_cuda.onnx"


def fp16_attention(model: onnx.ModelProto) -> int:
    """Undo the attention half of `fp32_edges_and_attention` on MODEL, in place: the casts
    around each GroupQueryAttention go, KV inputs and outputs become fp16, the rotary tables
    fp16. The float32 edges stay. Returns the attention nodes changed."""
    g = model.graph
    casts = {n.name: n for n in g.node if n.op_type == "Cast"}
    drop: list[onnx.NodeProto] = []
    kv: set[str] = set()
    tables: set[str] = set()
    count = 0
    for n in g.node:
        if n.op_type != "GroupQueryAttention":
            continue
        count += 1
        for i, key in ((0, "q"), (1, "kv1"), (2, "kv2")):
            c = casts.get(f"{n.name}/{key}/Cast")
            if c is not None:
                n.input[i] = c.input[0]
                drop.append(c)
        out = casts.get(f"{n.name}/out/Cast")
        if out is None:
            raise ValueError(f"{n.name} has no float32 attention to undo: not an edited fp16 graph")
        n.output[0] = out.output[0]
        drop.append(out)
        kv.update(x for x in (n.input[3], n.input[4], n.output[1], n.output[2]) if x)
        tables.update(x for x in n.input[7:9] if x)
    for c in drop:
        g.node.remove(c)
    _set_type(list(g.input) + list(g.output), kv, FLOAT16)
    for t in list(g.initializer):
        if t.name in tables:
            half = onnx.numpy_helper.to_array(t).astype(np.float16)
            g.initializer.remove(t)
            g.initializer.append(onnx.numpy_helper.from_array(half, t.name))
    del g.value_info[:]
    return count


def write_cuda_decoder(gqa: Path, out: Path) -> int:
    """The CUDA EP's decoder at OUT from the edited fp16 graph GQA (see the module docstring);
    its weights stay in GQA's data file, beside both. Returns the attention nodes in fp16."""
    model = onnx.load(str(gqa), load_external_data=False)
    count = fp16_attention(model)
    if not count:
        raise ValueError(f"{gqa.name} has no GroupQueryAttention: not the builder's graph")
    onnx.save(model, str(out))
    return count
