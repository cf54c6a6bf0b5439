"""Graph export: vision and portable decoder through torch.onnx (dynamo), and the optimized
decoder through onnxruntime-genai's model builder. Export specs (names, dynamic axes) are data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from proassist_edge.errors import ExportError
from proassist_edge.export.graphs import PortableDecoderModule, VisionGraph
from proassist_edge.export.model import VisionTower


@dataclass(frozen=True)
class GraphSpec:
    inputs: list[str]
    outputs: list[str]


def vision_spec() -> GraphSpec:
    return GraphSpec(["frames"], ["frame_tokens"])


def kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def portable_spec(layers: int) -> GraphSpec:
    return GraphSpec(
        ["inputs_embeds", *kv_names("past_key_values", layers)],
        ["logits", "p_not_talk", "hidden_states", *kv_names("present", layers)],
    )


def _quiet_export(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    spec: GraphSpec,
    dynamic: dict | tuple,
    opset: int,
    optimize: bool = True,
    external: bool = False,
) -> None:
    try:
        prog = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=spec.inputs,
            output_names=spec.outputs,
            dynamic_shapes=dynamic,
            external_data=external,
            verbose=False,
            optimize=optimize,
        )
        if prog is None:
            raise ExportError("torch.onnx.export returned no program")
        prog.save(str(path), external_data=external)
        if not optimize:
            cast_like_to_cast(path)
    except ExportError:
        raise
    except Exception as e:  # torch.export raises many types; surface them as one typed error
        raise ExportError(f"ONNX export of {path.name} failed: {type(e).__name__}: {e}") from e


def cast_like_to_cast(path: Path) -> int:
    """CastLike nodes whose target's type the graph records become Cast: onnxruntime has no CPU
    kernel for CastLike to fold constants with, and warns at every load otherwise (torch's
    exporter writes them for Python scalars; its optimizer, not run here, would fold them).
    Only the graph's structure is read and rewritten; external weights stay where they are."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    done = 0
    for node in g.node:
        if node.op_type == "CastLike" and types.get(node.input[1]):
            to = types[node.input[1]]
            del node.attribute[:]
            node.op_type = "Cast"
            node.input[:] = [node.input[0]]
            node.attribute.append(onnx.helper.make_attribute("to", to))
            done += 1
    if done:
        onnx.save(model, str(path))
    return done


EXTERNAL_BYTES = 1_500_000_000  # graphs past this keep their weights in FILE.data (protobuf caps at 2 GiB)


def _param_bytes(*modules: torch.nn.Module | None) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def _data_files(path: Path) -> list[str]:
    """torch.onnx writes a large graph's weights to PATH.data: the manifest lists it."""
    data = path.with_name(path.name + ".data")
    if data.is_file():
        data.chmod(0o644)  # written 0600: a bundle is read by whoever runs it
        return [data.name]
    return []


def export_vision(
    vision: VisionTower, projector: torch.nn.Module, path: Path, opset: int = 18
) -> tuple[GraphSpec, list[str]]:
    """Frames of any count and size: resizing to the tower's input is inside the graph. The
    graph computes in the modules' dtype (fp32 or fp16) with float32 frame tokens out."""
    spec = vision_spec()
    graph = VisionGraph(vision, projector).eval()
    frames = torch.randint(0, 256, (2, 48, 40, 3), dtype=torch.uint8)
    n = torch.export.Dim("num_frames", min=1, max=1024)
    h = torch.export.Dim("height", min=8, max=4096)
    w = torch.export.Dim("width", min=8, max=4096)
    big = _param_bytes(vision, projector) > EXTERNAL_BYTES
    with torch.no_grad():
        # not through onnxscript's optimizer: it keeps the last graph it rewrote, with constants
        # derived from the weights (the so400m tower's 1.7 GB stayed resident through the rest
        # of the export); onnxruntime optimizes the graph at load
        _quiet_export(graph, (frames,), path, spec, ({0: n, 1: h, 2: w},), opset, optimize=False,
                      external=big)
    return spec, _data_files(path)


def export_portable_decoder(
    llm: torch.nn.Module, head: torch.nn.Module | None, not_talk_id: int, path: Path, opset: int = 18
) -> tuple[GraphSpec, list[str]]:
    """The standard-op decoder in the LLM's dtype (fp32, or fp16 for TensorRT on a GPU), with
    float32 inputs_embeds in and float32 logits, P(not talk) and hidden state out."""
    dec = PortableDecoderModule(llm, head, not_talk_id).eval()
    c: Any = llm.config
    layers, kvh, hd = c.num_hidden_layers, c.num_key_value_heads, dec.head_dim
    spec = portable_spec(layers)
    dtype = next(llm.parameters()).dtype
    embeds = torch.randn(1, 3, int(c.hidden_size))
    past = tuple(torch.randn(1, int(kvh), 5, hd, dtype=dtype) for _ in range(2 * layers))
    s = torch.export.Dim("sequence_length", min=1, max=8192)
    p = torch.export.Dim("past_sequence_length", min=0, max=131072)
    dynamic = ({1: s}, tuple({2: p} for _ in range(2 * layers)))
    big = _param_bytes(llm, head) > EXTERNAL_BYTES
    with torch.no_grad():
        # onnxscript's rewriter takes minutes on deep decoders; onnxruntime optimizes at load.
        _quiet_export(dec, (embeds, *past), path, spec, dynamic, opset, optimize=False, external=big)
    return spec, _data_files(path)


class HeadGraph(torch.nn.Module):
    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(hidden).squeeze(-1).float())


def export_head(head: torch.nn.Module, hidden: int, path: Path, opset: int = 18) -> GraphSpec:
    """The binary decision head alone: hidden (1, S, H) -> P(not talk) (1, S), in float32."""
    spec = GraphSpec(["hidden_states"], ["p_not_talk"])
    s = torch.export.Dim("sequence_length", min=1, max=8192)
    x = torch.randn(1, 3, hidden)
    with torch.no_grad():
        _quiet_export(HeadGraph(head).float().eval(), (x,), path, spec, ({1: s},), opset)
    return spec


OPTIMIZED_FILES = ("decoder_gqa.onnx", "model.onnx.data")
OPTIMIZED_PRECISIONS = ("fp32", "fp16", "int4")


@dataclass(frozen=True)
class BuilderOptions:
    """The optimized decoder's precision; int4's MatMulNBits blocks and accuracy level (4, int8
    dot products, as `quantize --precision int4` uses by default)."""

    precision: str = "fp32"
    block_size: int = 32
    accuracy_level: int = 4


def build_optimized_decoder(
    llm_dir: Path, out_dir: Path, options: BuilderOptions | None = None, work: Path | None = None
) -> tuple[str, list[str], GraphSpec]:
    """Run onnxruntime-genai's builder (GroupQueryAttention, shared KV buffer, each MLP's gate
    and up projections fused into one MatMul) on LLM_DIR, a plain Hugging Face LLM folder in its
    own dtype. fp32 is the builder's graph; int4 is quantized from it one weight at a time
    (export/int4.py); fp16 is the builder's GPU graph with float32 edges and attention
    (export/fp16.py). Scratch files go to WORK (default: beside OUT_DIR).

    Returns (graph file, extra data files, spec) relative to out_dir. Any failure is an
    ExportError and leaves none of its files in out_dir, so a caller can go on without it.
    """
    opts = options or BuilderOptions()
    if opts.precision not in OPTIMIZED_PRECISIONS:
        raise ExportError(f"optimized decoder precision {opts.precision!r}: choose one of "
                          f"{', '.join(OPTIMIZED_PRECISIONS)}")
    try:
        return _build_optimized(llm_dir, out_dir, opts, work or out_dir.parent)
    except ExportError:
        _remove_optimized(out_dir)
        raise
    except Exception as e:  # saving, loading, editing raise many types (OSError, onnx's own, ...)
        _remove_optimized(out_dir)
        raise ExportError(f"building the optimized decoder failed: {type(e).__name__}: {e}") from e


def _remove_optimized(out_dir: Path) -> None:
    for name in OPTIMIZED_FILES:
        (out_dir / name).unlink(missing_ok=True)


def run_builder(llm_dir: Path, build: Path, precision: str, head: bool = True) -> None:
    """The builder as a subprocess: its memory is returned when it exits. Without `head` the
    graph ends at the final norm's hidden states (int4 adds the head itself: the builder's
    float32 copy of a 128k-row head, transposed, took 2.3 GB of its 6.3 GB peak on the 1B
    shape, against 4.0 GB without it)."""
    # fp16 graphs exist for GPUs only (the builder's fp16 + cpu makes another graph family)
    ep = "cuda" if precision == "fp16" else "cpu"
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-m", str(llm_dir), "-i", str(llm_dir), "-o", str(build), "-p", precision, "-e", ep,
        "-c", str(build / "cache"),
        "--extra_options", "exclude_embeds=true", "fuse_mlp_gate_up=true",
        "include_hidden_states=true" if head else "exclude_lm_head=true",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (build / "model.onnx").is_file():
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise ExportError(f"onnxruntime-genai's builder failed (exit {proc.returncode}):\n{tail}")


def _build_optimized(
    llm_dir: Path, out_dir: Path, opts: BuilderOptions, work: Path
) -> tuple[str, list[str], GraphSpec]:
    with tempfile.TemporaryDirectory(prefix=".builder.", dir=work) as tmp:
        build = Path(tmp) / "build"
        run_builder(llm_dir, build, "fp16" if opts.precision == "fp16" else "fp32",
                    head=opts.precision != "int4")
        cfg = json.loads((build / "genai_config.json").read_text())["model"]["decoder"]
        layers = int(cfg["num_hidden_layers"])
        graph_file, data = out_dir / OPTIMIZED_FILES[0], out_dir / OPTIMIZED_FILES[1]
        data.unlink(missing_ok=True)
        if opts.precision == "int4":
            from proassist_edge.export.checkpoint import head_rows
            from proassist_edge.export.int4 import quantize_int4_streaming

            files, _ = quantize_int4_streaming(build / "model.onnx", graph_file, opts.block_size,
                                               opts.accuracy_level, data.name, head_rows(llm_dir))
        else:
            graph = onnx.load(str(build / "model.onnx"), load_external_data=False)
            if opts.precision == "fp16":
                from proassist_edge.export.fp16 import fp32_edges_and_attention

                fp32_edges_and_attention(graph, llm_dir)
            onnx.save(graph, str(graph_file))  # the weights stay where they are: moved below
            files = []
            if (build / "model.onnx.data").is_file():  # the graph names it model.onnx.data
                shutil.move(str(build / "model.onnx.data"), str(data))
                files = [data.name]
        if data.is_file():  # written 0600: a bundle must be readable like its graphs
            data.chmod(0o644)
    spec = GraphSpec(
        ["inputs_embeds", "attention_mask", *kv_names("past_key_values", layers)],
        ["logits", "hidden_states", *kv_names("present", layers)],
    )
    return graph_file.name, files, spec
