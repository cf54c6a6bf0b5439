"""The bundle's graphs and table written one part of the checkpoint at a time.

Each stage loads only the weights its graph needs, in the precision the graph is made in, and
drops them when the graph is written: the optimized decoder is built by onnxruntime-genai's
builder in a child process from the merged LLM folder (nothing of the LLM is held here), the
vision graph from the tower and projector, the portable decoder from the LLM, and the embedding
table is copied row block by row block from the weight files. The peak is then the largest part,
not the whole model (export/resources.py estimates it before the export starts).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from proassist_edge.embedding_table import write_table
from proassist_edge.errors import ExportError
from proassist_edge.export import resources
from proassist_edge.export.checkpoint import (
    EMBED_KEY,
    CheckpointInfo,
    LoadedCheckpoint,
    PlainLLM,
    build_model,
    load_plain_llm,
    load_vision,
    multimodal_modules,
    tensor_rows,
)
from proassist_edge.export.onnx_export import (
    BuilderOptions,
    GraphSpec,
    build_optimized_decoder,
    export_head,
    export_portable_decoder,
    export_vision,
)
from proassist_edge.export.precision import PrecisionPlan
from proassist_edge.manifest import GraphEntry, sha256_file
from proassist_edge.progress import Stages

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Written:
    """The graphs written, (name, note) of each optional decoder left out, and facts learnt on
    the way (the tower's input size)."""

    graphs: dict[str, GraphEntry]
    left_out: list[tuple[str, str]]
    image_size: int


def entry(root: Path, file: str, spec: GraphSpec, precision: str, variant: str = "",
          data: list[str] | None = None) -> GraphEntry:
    return GraphEntry(file, precision, spec.inputs, spec.outputs, sha256_file(root / file),
                      variant, data or [])


def _free() -> None:
    resources.release()  # the weights of a stage go before the next stage loads its own


def say(note: str) -> None:
    tqdm.write(f"note: {note}", file=sys.stderr)


def write_graphs(
    info: CheckpointInfo, plain: PlainLLM, root: Path, work: Path, plan: PrecisionPlan,
    opset: int, steps: Stages, builder: BuilderOptions, optional_failed: Any,
) -> Written:
    """Every graph of PLAN into ROOT. `optional_failed(name, error)` returns the note of an
    optimized decoder that could not be built while a portable one carries the bundle, or
    raises."""
    graphs: dict[str, GraphEntry] = {}
    left_out: list[tuple[str, str]] = []
    if plan.optimized:  # first: the builder runs in a child process while nothing is loaded here
        steps.stage(f"optimized decoder, {plan.optimized} (onnxruntime-genai builder)")
        try:
            file, data, spec = build_optimized_decoder(plain.folder, root, builder, work)
        except ExportError as e:
            if not plan.portable:  # nothing else carries the export
                raise
            left_out.append(("decoder_gqa", optional_failed("decoder_gqa", e)))
        else:
            graphs["decoder_gqa"] = entry(root, file, spec, plan.optimized, "optimized", data)
            if plan.optimized == "fp16":
                try:
                    graphs[CUDA_DECODER] = cuda_decoder(root, file, spec, data)
                except Exception as e:  # onnx's own errors, OSError
                    failed = ExportError(f"deriving the CUDA decoder failed: {type(e).__name__}: {e}")
                    left_out.append((CUDA_DECODER, optional_failed(CUDA_DECODER, failed)))
        steps.update()
    steps.stage(f"vision graph, {plan.vision}")
    dtype = DTYPES[plan.vision]
    vision = load_vision(info.config, info.vision_dir, dtype)
    heads = multimodal_modules(info, plain, dtype)
    spec, data = export_vision(vision, heads.mm_projector, root / "vision.onnx", opset)
    graphs["vision"] = entry(root, "vision.onnx", spec, plan.vision, data=data)
    image_size = vision.image_size
    del vision
    _free()
    steps.update()
    if info.config.use_binary_decision_head:
        steps.stage("head graph")
        head = multimodal_modules(info, plain, torch.float32).binary_decision_head
        graphs["head"] = entry(root, "head.onnx", export_head(head, plain.hidden, root / "head.onnx", opset),
                               "fp32")
    steps.update()
    if plan.portable:
        steps.stage(f"portable decoder, {plan.portable}")
        llm = load_plain_llm(info, plain, DTYPES[plan.portable])
        spec, data = export_portable_decoder(llm, getattr(llm, "binary_decision_head", None),
                                             info.not_talk_id, root / "decoder.onnx", opset)
        del llm
        _free()
        graphs["decoder"] = entry(root, "decoder.onnx", spec, plan.portable, "portable", data)
        steps.update()
    order = ("vision", "head", "decoder", "decoder_gqa", CUDA_DECODER)  # the manifest's order
    return Written({k: graphs[k] for k in order if k in graphs}, left_out, image_size)


def cuda_decoder(root: Path, gqa_file: str, spec: GraphSpec, data: list[str]) -> GraphEntry:
    """fp16 exports: the CUDA EP's decoder beside decoder_gqa, on the same weights
    (export/fp16.py write_cuda_decoder)."""
    from proassist_edge.export.fp16 import CUDA_FILE, write_cuda_decoder

    write_cuda_decoder(root / gqa_file, root / CUDA_FILE)
    return entry(root, CUDA_FILE, spec, "fp16", "optimized", data)


# --- which decoder each execution provider runs (manifest.ep_decoders) ---------------------------
CUDA_DECODER = "decoder_cuda"  # fp16 attention: the CUDA EP's graph, not a CPU candidate


def cpu_decoders(graphs: dict[str, GraphEntry]) -> list[str]:
    """The decoders the export's default is chosen from (timed on the CPU): all but the
    CUDA EP's graph."""
    return [k for k in graphs if k.startswith("decoder") and k != CUDA_DECODER]


def ep_decoders(graphs: dict[str, GraphEntry]) -> dict[str, str]:
    """The decoder per GPU execution provider; "cpu" runs the default decoder, which export
    chose by timing on the CPU, so it needs no entry.
    - cuda: `decoder_cuda` (fp16 attention) where the export made one: the CUDA EP has no
      float32 GroupQueryAttention kernel, so no other optimized graph is a CUDA graph;
    - tensorrt: the portable decoder where it is fp16 (standard ops: TensorRT does not parse
      onnxruntime's contrib ops, so a GroupQueryAttention graph would skip it)."""
    out = {}
    if CUDA_DECODER in graphs:
        out["cuda"] = CUDA_DECODER
    portable = [k for k, g in graphs.items()
                if k.startswith("decoder") and g.variant == "portable" and g.precision == "fp16"]
    if portable:
        out["tensorrt"] = portable[0]
    return out


def write_embeddings(plain: PlainLLM, root: Path, dtype: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The embedding table in DTYPE: (manifest.embeddings, files -> sha256)."""
    rows, shape = tensor_rows(plain.folder, EMBED_KEY)
    meta, files, _ = write_table(rows, shape, root, dtype)
    return meta, files


def load_reference(info: CheckpointInfo, plain: PlainLLM, dtype: str) -> LoadedCheckpoint:
    """The PyTorch model verification compares with: float32, or the checkpoint's dtype
    ("auto")."""
    llm = load_plain_llm(info, plain, torch.float32 if dtype == "float32" else "auto")
    vision_dtype = next(llm.model.parameters()).dtype
    return build_model(info, llm, load_vision(info.config, info.vision_dir, vision_dtype))
