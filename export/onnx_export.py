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
from transformers import LlamaForCausalLM

from proassist_edge.errors import ExportError
from proassist_edge.export.fuse import fuse_gate_up
from proassist_edge.export.graphs import PortableDecoderModule, VisionGraph
from proassist_edge.export.model import ProAssistModel


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
            external_data=False,
            verbose=False,
            optimize=optimize,
        )
        if prog is None:
            raise ExportError("torch.onnx.export returned no program")
        prog.save(str(path))
    except ExportError:
        raise
    except Exception as e:  # torch.export raises many types; surface them as one typed error
        raise ExportError(f"ONNX export of {path.name} failed: {type(e).__name__}: {e}") from e


def export_vision(model: ProAssistModel, path: Path, opset: int = 18) -> GraphSpec:
    """Frames of any count and size: resizing to the tower's input is inside the graph."""
    spec = vision_spec()
    graph = VisionGraph(model).eval()
    frames = torch.randint(0, 256, (2, 48, 40, 3), dtype=torch.uint8)
    n = torch.export.Dim("num_frames", min=1, max=1024)
    h = torch.export.Dim("height", min=8, max=4096)
    w = torch.export.Dim("width", min=8, max=4096)
    with torch.no_grad():
        _quiet_export(graph, (frames,), path, spec, ({0: n, 1: h, 2: w},), opset)
    return spec


def export_portable_decoder(model: ProAssistModel, path: Path, opset: int = 18) -> GraphSpec:
    dec = PortableDecoderModule(model).eval()
    c: Any = model.llm.config
    layers, kvh, hd = c.num_hidden_layers, c.num_key_value_heads, dec.head_dim
    spec = portable_spec(layers)
    embeds = torch.randn(1, 3, int(c.hidden_size))
    past = tuple(torch.randn(1, int(kvh), 5, hd) for _ in range(2 * layers))
    s = torch.export.Dim("sequence_length", min=1, max=8192)
    p = torch.export.Dim("past_sequence_length", min=0, max=131072)
    dynamic = ({1: s}, tuple({2: p} for _ in range(2 * layers)))
    with torch.no_grad():
        # onnxscript's rewriter takes minutes on deep decoders; onnxruntime optimizes at load.
        _quiet_export(dec, (embeds, *past), path, spec, dynamic, opset, optimize=False)
    return spec


class HeadGraph(torch.nn.Module):
    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(hidden).squeeze(-1).float())


def export_head(model: ProAssistModel, path: Path, opset: int = 18) -> GraphSpec:
    """The binary decision head alone: hidden (1, S, H) -> P(not talk) (1, S)."""
    assert model.decision_head is not None
    spec = GraphSpec(["hidden_states"], ["p_not_talk"])
    s = torch.export.Dim("sequence_length", min=1, max=8192)
    x = torch.randn(1, 3, model.llm.config.hidden_size)
    with torch.no_grad():
        _quiet_export(HeadGraph(model.decision_head).eval(), (x,), path, spec, ({1: s},), opset)
    return spec


def save_plain_llm(model: ProAssistModel, tokenizer_json: Path, out: Path) -> None:
    """The merged LLM alone, as a plain Hugging Face folder (what the builder reads)."""
    llm = model.llm
    clean = LlamaForCausalLM(llm.config)
    skip = ("mm_projector", "binary_decision_head")
    state = {k: v for k, v in llm.state_dict().items() if not k.startswith(skip)}
    clean.load_state_dict(state, strict=True)
    clean.save_pretrained(str(out))
    shutil.copy(tokenizer_json, out / "tokenizer.json")


OPTIMIZED_FILES = ("decoder_gqa.onnx", "model.onnx.data")


def build_optimized_decoder(
    model: ProAssistModel, tokenizer_json: Path, out_dir: Path, precision: str = "fp32"
) -> tuple[str, list[str], GraphSpec]:
    """Run onnxruntime-genai's builder (GroupQueryAttention, shared KV buffer) on the merged LLM.

    Returns (graph file, extra data files, spec) relative to out_dir. Any failure is an
    ExportError and leaves none of its files in out_dir, so a caller can go on without it.
    """
    try:
        return _build_optimized(model, tokenizer_json, out_dir, precision)
    except ExportError:
        _remove_optimized(out_dir)
        raise
    except Exception as e:  # saving, loading, fusing raise many types (OSError, onnx's own, ...)
        _remove_optimized(out_dir)
        raise ExportError(f"building the optimized decoder failed: {type(e).__name__}: {e}") from e


def _remove_optimized(out_dir: Path) -> None:
    for name in OPTIMIZED_FILES:
        (out_dir / name).unlink(missing_ok=True)


def _build_optimized(
    model: ProAssistModel, tokenizer_json: Path, out_dir: Path, precision: str
) -> tuple[str, list[str], GraphSpec]:
    with tempfile.TemporaryDirectory() as tmp:
        llm_dir, build = Path(tmp) / "llm", Path(tmp) / "build"
        save_plain_llm(model, tokenizer_json, llm_dir)
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-m",
            str(llm_dir),
            "-i",
            str(llm_dir),
            "-o",
            str(build),
            "-p",
            precision,
            "-e",
            "cpu",
            "--extra_options",
            "exclude_embeds=true",
            "include_hidden_states=true",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (build / "model.onnx").is_file():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise ExportError(
                f"onnxruntime-genai's builder failed (exit {proc.returncode}):\n{tail}"
            )
        cfg = json.loads((build / "genai_config.json").read_text())["model"]["decoder"]
        layers = int(cfg["num_hidden_layers"])
        graph = onnx.load(str(build / "model.onnx"))  # external data too: fusing reads weights
        fuse_gate_up(graph)
        external = (build / "model.onnx.data").is_file()
        (out_dir / "model.onnx.data").unlink(missing_ok=True)  # onnx appends to an existing file
        # the same data file name as the builder's (the manifest lists it)
        onnx.save(graph, str(out_dir / "decoder_gqa.onnx"), save_as_external_data=external,
                  location="model.onnx.data")
        data = []
        if external:  # onnx writes its data file 0600: a bundle must be readable like its graphs
            (out_dir / "model.onnx.data").chmod(0o644)
            data.append("model.onnx.data")
    spec = GraphSpec(
        ["inputs_embeds", "attention_mask", *kv_names("past_key_values", layers)],
        ["logits", "hidden_states", *kv_names("present", layers)],
    )
    return "decoder_gqa.onnx", data, spec
