"""What a quantization cost: child bundle vs its fp32 parent on the same streams.

Talk decisions sit on a threshold (proassist-reference.md, Numerics), so the figures are the
decisions and P(not talk) first, logits second, and the reply tokens last.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.fmt import human_bytes
from proassist_edge.manifest import Manifest
from proassist_edge.quant.calibration import Stream, cosine, replay_pair
from proassist_edge.runtime.bundle import Bundle


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


# the accuracy each precision must keep (decision agreement: int8 0.99, int4 0.97)
TARGETS = {
    "int8": Targets(decision_agreement=0.99),
    "int4": Targets(decision_agreement=0.97),
    "fp16": Targets(decision_agreement=0.99),
}


def compare_decoders(
    parent: Bundle, child: Bundle, streams: Sequence[Stream], reply_tokens: int, fps: float,
) -> dict[str, Any]:
    """Both bundles over every stream; figures pooled over all frames.

    `decision_agreement`, `p_not_talk_mae` and the logit figures are the child's (its vision,
    table and decoder) on the parent's history: at every decision both see the same frames,
    turns and earlier replies, so each figure is the quantization's own error, and one flipped
    decision counts once. The `_free_running` figures and `token_match_rate` are end to end:
    each bundle with its own replies, where one flip changes the context after it."""
    shadow_p, shadow_talk, cos, top1 = [], [], [], []
    free_p, free_talk, same_tokens = [], [], []
    for stream in streams:
        pairs, tap = replay_pair(parent, child, stream, reply_tokens, fps)
        for ra, rb in pairs:
            free_p.append((ra.p_not_talk, rb.p_not_talk))
            free_talk.append((ra.talk, rb.talk))
            same_tokens.append(ra.token_ids == rb.token_ids)
        shadow_p += tap.p
        shadow_talk += tap.talk
        cos += tap.cosines
        top1 += tap.top1
    p, fp = np.asarray(shadow_p), np.asarray(free_p)
    agree, free_agree = np.equal(*np.asarray(shadow_talk).T), np.equal(*np.asarray(free_talk).T)
    return {
        "decision_agreement": float(agree.mean()),
        "decision_flips": int((~agree).sum()),
        "p_not_talk_mae": float(np.abs(p[:, 0] - p[:, 1]).mean()),
        "p_not_talk_max_abs": float(np.abs(p[:, 0] - p[:, 1]).max()),
        "decision_agreement_free_running": float(free_agree.mean()),
        "p_not_talk_mae_free_running": float(np.abs(fp[:, 0] - fp[:, 1]).mean()),
        "logit_cosine": float(np.mean(cos)),
        "logit_cosine_min": float(np.min(cos)),
        "top1_match_rate": float(np.mean(top1)),
        "token_match_rate": float(np.mean(same_tokens)),
        "talk_frames_parent": int(sum(t[0] for t in free_talk)),
        "talk_frames_child": int(sum(t[1] for t in free_talk)),
        "frames": len(free_p),
        "decisions": len(shadow_p),
    }


def compare_vision(
    parent: Bundle, child: Bundle, streams: Sequence[Stream], per_stream: int = 16
) -> dict[str, float]:
    """Frame tokens of both vision graphs on frames spread over the streams."""
    cos, worst, rel = [], 0.0, []
    for s in (st.frames for st in streams):
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


COMPONENTS = ("vision", "embeddings", "decoder")


def with_component(parent: Bundle, child: Bundle, part: str) -> Bundle:
    """The parent with one part of the child swapped in: its vision graph, its embedding table,
    or its current decoder graph. Each part's own cost, measured alone."""
    if part == "vision":
        return replace(parent, vision=child.vision)
    if part == "embeddings":
        emb = dict(child.manifest.embeddings)
        if emb.get("scale"):  # per-row scales beside the child's table
            emb["scale"] = str((child.root / emb["scale"]).resolve())
        manifest = replace(parent.manifest, embeddings=emb)
        return replace(parent, embeddings=child.embeddings, manifest=manifest)
    if part == "decoder":
        g = child.manifest.graphs[child.decoder_name]
        return with_graph(parent, parent.decoder_name, child.root / g.file)
    raise ValueError(f"part {part!r}: choose one of {COMPONENTS}")


def component_costs(
    parent: Bundle, child: Bundle, streams: Sequence[Stream], reply_tokens: int, fps: float,
) -> dict[str, dict[str, Any]]:
    """Figures of the parent with each quantized part of the child alone (parts the child kept
    fp32 are left out): which of vision, embedding table and decoder flips the decisions."""
    m = child.manifest
    precision = {"vision": m.graphs["vision"].precision, "embeddings": m.embeddings.get("dtype"),
                 "decoder": m.graphs[child.decoder_name].precision}
    return {
        part: compare_decoders(parent, with_component(parent, child, part), streams, reply_tokens, fps)
        for part in COMPONENTS if precision[part] not in ("fp32", "float32")
    }


# (bundle, data) -> the paper's metrics (and what else the caller's evaluator adds: the CLI's
# adds the task world's content score on a task-world split)
Evaluator = Callable[[Path, Path], dict[str, Any]]


def paper_metrics(
    parent: Path, child: Path, data: Path | None, evaluator: Evaluator | None
) -> dict[str, Any] | str:
    """The paper's metrics for both bundles on DATA, through the evaluator the caller passed."""
    if data is None:
        return "not requested"
    if evaluator is None:
        return "no evaluator given"
    return {"parent": evaluator(parent, data), "child": evaluator(child, data)}


# --- the table at the end ---------------------------------------------------------------------
def report_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Side by side: sizes of parent and child per graph, and each decoder's figures."""
    headers = ["graph", "precision", "fp32 parent", "child", "agreement", "free-running", "P MAE",
               "logit cos", "tokens"]
    rows = []
    for name, g in report["graphs"].items():
        d = report["decoders"].get(name)
        v = report.get("vision") if name == "vision" else None
        figures = ["", "", "", "", ""]
        if d is not None:
            figures = [
                f"{d['decision_agreement']:.3f}", f"{d['decision_agreement_free_running']:.3f}",
                f"{d['p_not_talk_mae']:.2e}",
                f"{d['logit_cosine']:.4f}", f"{d['token_match_rate']:.3f}",
            ]
        elif isinstance(v, dict):  # vision: frame-token cosine in the cosine column
            figures = ["", "", "", f"{v['frame_token_cosine']:.4f}", ""]
        sizes = [human_bytes(g["parent_size_bytes"]), human_bytes(g["size_bytes"])]
        rows.append([name, g["precision"], *sizes, *figures])
    e = report["embeddings"]
    sizes = [human_bytes(e["parent_size_bytes"]), human_bytes(e["size_bytes"])]
    rows.append(["embeddings", e["dtype"], *sizes, "", "", "", "", ""])
    sizes = [human_bytes(report["parent_size_bytes"]), human_bytes(report["size_bytes"])]
    rows.append(["bundle", report["precision"], *sizes, "", "", "", "", ""])
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
    title = f"{report['precision']} vs fp32 parent ({report['streams']} streams, {report['frames']} frames)"
    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=140).print(table)
    return buf.getvalue()
