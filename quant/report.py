"""What a quantization cost: child bundle vs its fp32 parent on the same streams.

Talk decisions sit on a threshold (proassist-reference.md, Numerics), so the figures are the
decisions and P(not talk) first, logits second, and the reply tokens last.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.cli import human_bytes
from proassist_edge.manifest import Manifest
from proassist_edge.runtime.bundle import Bundle

from .calibration import cosine, replay_pair, stream_messages


@dataclass(frozen=True)
class Targets:
    """What a quantized decoder must keep; a miss triggers the per-layer sensitivity scan."""

    decision_agreement: float = 0.98
    p_not_talk_mae: float = 0.02
    logit_cosine: float = 0.98

    def misses(self, figures: dict[str, Any]) -> list[str]:
        out = []
        if figures["decision_agreement"] < self.decision_agreement:
            out.append(f"decision agreement {figures['decision_agreement']:.3f} < {self.decision_agreement}")
        if figures["p_not_talk_mae"] > self.p_not_talk_mae:
            out.append(f"P(not talk) MAE {figures['p_not_talk_mae']:.4f} > {self.p_not_talk_mae}")
        if figures["logit_cosine"] < self.logit_cosine:
            out.append(f"logit cosine {figures['logit_cosine']:.4f} < {self.logit_cosine}")
        return out


def compare_decoders(
    parent: Bundle, child: Bundle, streams: Sequence[np.ndarray], reply_tokens: int, fps: float,
) -> dict[str, Any]:
    """Both bundles' StreamCore over every stream; figures pooled over all frames.

    Decisions, P(not talk) and reply tokens are end to end (each bundle with its own vision,
    table and replies). The logit figures are the child decoder's on the parent's exact inputs,
    at each decision position, so a reply that drifted does not count as logit error."""
    p_a, p_b, talk_a, talk_b, same_tokens, cos, top1 = [], [], [], [], [], [], []
    for k, frames in enumerate(streams):
        msgs = stream_messages(len(frames), fps, k)
        pairs, tap = replay_pair(parent, child, frames, msgs, reply_tokens, fps)
        for ra, rb in pairs:
            p_a.append(ra.p_not_talk)
            p_b.append(rb.p_not_talk)
            talk_a.append(ra.talk)
            talk_b.append(rb.talk)
            same_tokens.append(ra.token_ids == rb.token_ids)
        cos += tap.cosines
        top1 += tap.top1
    pa, pb = np.asarray(p_a), np.asarray(p_b)
    agree = np.asarray(talk_a) == np.asarray(talk_b)
    return {
        "decision_agreement": float(agree.mean()),
        "decision_flips": int((~agree).sum()),
        "p_not_talk_mae": float(np.abs(pa - pb).mean()),
        "p_not_talk_max_abs": float(np.abs(pa - pb).max()),
        "logit_cosine": float(np.mean(cos)),
        "logit_cosine_min": float(np.min(cos)),
        "top1_match_rate": float(np.mean(top1)),
        "token_match_rate": float(np.mean(same_tokens)),
        "talk_frames_parent": int(np.sum(talk_a)),
        "talk_frames_child": int(np.sum(talk_b)),
        "frames": len(pa),
    }


def compare_vision(
    parent: Bundle, child: Bundle, streams: Sequence[np.ndarray], per_stream: int = 16
) -> dict[str, float]:
    """Frame tokens of both vision graphs on frames spread over the streams."""
    cos, worst, rel = [], 0.0, []
    for s in streams:
        for i in np.linspace(0, len(s) - 1, min(per_stream, len(s))).astype(int):
            a = parent.encode_frames(np.ascontiguousarray(s[i : i + 1]))
            b = child.encode_frames(np.ascontiguousarray(s[i : i + 1]))
            cos.append(cosine(a, b))
            worst = max(worst, float(np.abs(a - b).max()))
            rel.append(float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(a)), 1e-12))
    return {
        "frame_token_cosine": float(np.mean(cos)), "max_abs_diff": worst,
        "relative_error": float(np.mean(rel)),
    }


def graph_sizes(root: Path, manifest: Manifest) -> dict[str, int]:
    """Bytes per graph, its external data files included."""
    return {
        name: sum((root / f).stat().st_size for f in (g.file, *g.data_files))
        for name, g in manifest.graphs.items()
    }


def bundle_size(root: Path, manifest: Manifest) -> int:
    """Every file the manifest lists (graphs, data, embeddings, tokenizer), once each."""
    names = set(manifest.all_files())
    return sum((root / n).stat().st_size for n in names)


def with_graph(bundle: Bundle, name: str, path: Path) -> Bundle:
    """The same opened bundle with graph NAME read from PATH (absolute): for scans that try many
    variants of one graph without writing a bundle per try."""
    g = replace(bundle.manifest.graphs[name], file=str(path.resolve()))
    manifest = replace(bundle.manifest, graphs={**bundle.manifest.graphs, name: g})
    return replace(bundle, manifest=manifest, decoder_name=name)


def paper_metrics(parent: Path, child: Path, data: Path | None) -> dict[str, Any] | str:
    """The paper's metrics for both bundles through bench's pluggable evaluator, if present:
    `proassist_edge.bench.evaluate.evaluate(bundle_path, data_dir) -> dict`."""
    if data is None:
        return "not requested"
    try:
        evaluate = importlib.import_module("proassist_edge.bench.evaluate").evaluate
    except (ImportError, AttributeError) as e:
        return f"eval unavailable ({e})"
    return {"parent": evaluate(parent, data), "child": evaluate(child, data)}


# --- the table at the end ---------------------------------------------------------------------
def report_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Side by side: sizes of parent and child per graph, and each decoder's figures."""
    headers = ["graph", "precision", "fp32 parent", "child", "agreement", "P MAE", "logit cos", "tokens"]
    rows = []
    for name, g in report["graphs"].items():
        d = report["decoders"].get(name)
        v = report.get("vision") if name == "vision" else None
        figures = ["", "", "", ""]
        if d is not None:
            figures = [
                f"{d['decision_agreement']:.3f}", f"{d['p_not_talk_mae']:.2e}",
                f"{d['logit_cosine']:.4f}", f"{d['token_match_rate']:.3f}",
            ]
        elif isinstance(v, dict):  # vision: frame-token cosine in the cosine column
            figures = ["", "", f"{v['frame_token_cosine']:.4f}", ""]
        sizes = [human_bytes(g["parent_size_bytes"]), human_bytes(g["size_bytes"])]
        rows.append([name, g["precision"], *sizes, *figures])
    e = report["embeddings"]
    sizes = [human_bytes(e["parent_size_bytes"]), human_bytes(e["size_bytes"])]
    rows.append(["embeddings", e["dtype"], *sizes, "", "", "", ""])
    sizes = [human_bytes(report["parent_size_bytes"]), human_bytes(report["size_bytes"])]
    rows.append(["bundle", report["precision"], *sizes, "", "", "", ""])
    return headers, rows


def render(report: dict[str, Any]) -> str:
    """A rich table when rich is installed, else plain aligned text."""
    headers, rows = report_rows(report)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        cells = [headers, *rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)
    title = f"{report['precision']} vs fp32 parent ({report['streams']} streams x {report['frames']} frames)"
    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=140).print(table)
    return buf.getvalue()
