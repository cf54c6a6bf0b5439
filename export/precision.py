"""What `export --precision` makes of each graph, and what its verification must meet.

- fp32: the builder's fp32 optimized decoder, fp32 portable decoder and vision, float32 table.
- fp16 (GPU targets): the builder's fp16 GPU decoder with fp32 edges and attention
  (export/fp16.py), fp16 portable decoder (TensorRT's input) and vision, float16 table.
- int4 (CPU targets): the builder's fp32 decoder quantized to MatMulNBits one weight at a time
  (export/int4.py); a portable decoder only on request (fp32, or fp16); fp32 vision; int8
  table with per-row scales, as `quantize --precision int4` writes it.
- int8: an fp32 bundle in a temporary folder, then `quantize --precision int8` into the output.

`--vision-precision` and `--portable-fp16` override the vision and portable columns. The
verification compares the bundle with the PyTorch model: fp32 logit for logit (Tolerance()'s
defaults), fp16 and int4 on what a user sees (talk decisions, P(not talk), logit direction,
reply tokens) with the thresholds `quantize` holds its children to (quant/report.py TARGETS,
checked equal by tests/test_export_precision.py). The PyTorch side runs in float32 for fp32
bundles and in the checkpoint's own dtype for the others, whose error it is far below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proassist_edge.errors import ExportError
from proassist_edge.export.verify import Tolerance

PRECISIONS = ("fp32", "fp16", "int8", "int4")
GRAPH_PRECISIONS = ("fp32", "fp16")
INF = math.inf
# fp32: logit for logit, and decisions and reply tokens identical over the stream. fp16 and
# int4, on the reference's history (export/shadow.py): decision agreement as quant/report.py
# TARGETS, P(not talk) MAE 0.02 and logit cosine 0.98 as there, and the reference's reply tokens
# chosen again teacher-forced (SmolLM2-135M int4: 0.98; a random fixture's near-tied logits
# flip under any rounding, so its tests relax this one)
TOLERANCES = {
    "fp32": Tolerance(),
    "fp16": Tolerance(logits=INF, vision=2e-2, p_not_talk=INF, decisions=0.0, tokens=0.0,
                      shadow_decisions=0.99, p_not_talk_mae=0.02, logit_cosine=0.98, top1=0.95),
    "int4": Tolerance(logits=INF, vision=2e-2, p_not_talk=INF, decisions=0.0, tokens=0.0,
                      shadow_decisions=0.97, p_not_talk_mae=0.02, logit_cosine=0.98, top1=0.9),
}


@dataclass(frozen=True)
class PrecisionPlan:
    """Each graph's precision for one export (None: the graph is not made)."""

    precision: str
    optimized: str | None
    portable: str | None
    vision: str
    table: str  # the embedding table's dtype
    via_fp32_bundle: bool = False  # int8: an fp32 bundle first, then quantize

    @property
    def reference_dtype(self) -> str:
        """float32 for an exact comparison, else the checkpoint's own ("auto")."""
        return "float32" if self.precision in ("fp32", "int8") else "auto"

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES["fp32" if self.via_fp32_bundle else self.precision]

    def graph_precisions(self) -> dict[str, str]:
        out = {"vision": self.vision}
        if self.optimized:
            out["decoder_gqa"] = self.optimized
        if self.portable:
            out["decoder"] = self.portable
        return out


def default_variants(precision: str) -> tuple[str, ...]:
    """int4 is for CPUs, where the optimized decoder runs: no portable graph unless asked."""
    return ("optimized",) if precision == "int4" else ("portable", "optimized")


def plan_precision(
    precision: str = "fp32",
    variants: tuple[str, ...] | None = None,
    vision_precision: str | None = None,
    portable_fp16: bool = False,
) -> PrecisionPlan:
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if vision_precision is not None and vision_precision not in GRAPH_PRECISIONS:
        raise ExportError(f"vision precision {vision_precision!r}: choose fp32 or fp16")
    chosen = variants or default_variants(precision)
    if bad := set(chosen) - {"portable", "optimized"}:
        raise ExportError(f"decoder variants {sorted(bad)}: choose from portable, optimized")
    if precision == "int8":
        if vision_precision == "fp16" or portable_fp16:
            raise ExportError("int8 goes through quantize, whose int8 graphs come from fp32 ones: "
                              "drop --vision-precision fp16 / --portable-fp16")
        return PrecisionPlan("int8", "fp32" if "optimized" in chosen else None,
                             "fp32" if "portable" in chosen else None, "fp32", "float32", True)
    gpu = precision == "fp16"
    portable = "fp16" if gpu or portable_fp16 else "fp32"
    return PrecisionPlan(
        precision,
        precision if "optimized" in chosen else None,
        portable if "portable" in chosen else None,
        vision_precision or ("fp16" if gpu else "fp32"),
        {"fp32": "float32", "fp16": "float16", "int4": "int8"}[precision],
    )
