"""Per-layer sensitivity: which decoder blocks cost the most when quantized.

Each try quantizes one block's weight MatMuls alone ("only"), or everything but one block
("exclude"), and replays the same streams through the parent and the try. The costliest blocks
come back as keep-fp32 patterns ("layers.3.", "lm_head") for `quantize_bundle(keep_fp32=...)`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from proassist_edge.manifest import load_manifest
from proassist_edge.runtime.bundle import open_bundle

from . import graphs as G
from .calibration import FeedReader, frame_streams, record_feeds
from .graphs import QuantizeError, Recipe, WeightNode
from .report import compare_decoders, with_graph

SCAN_PRECISIONS = ("int8", "int8-qdq", "int4", "fp16")


def damage(f: dict[str, Any]) -> float:
    """One number to rank by: flipped decisions first (each counts fully), then the P(not talk)
    error, then logit direction."""
    return (1.0 - f["decision_agreement"]) + f["p_not_talk_mae"] + (1.0 - f["logit_cosine"])


def groups_of(nodes: list[WeightNode]) -> dict[str, list[WeightNode]]:
    out: dict[str, list[WeightNode]] = {}
    for n in nodes:
        out.setdefault(n.group, []).append(n)
    return out


def layer_sensitivity(
    parent: str | Path, precision: str, decoder: str | None = None, mode: str = "only",
    streams: int = 2, frames: int = 60, reply_tokens: int = 8, calibration: str | None = None,
    block_size: int = 32, accuracy_level: int | None = None, per_channel: bool = True,
    keep_fp32: Sequence[str] = (), top: int = 3, threads: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Quantize one block of DECODER at a time (mode "only") or all but one ("exclude") with
    PRECISION ("int8", "int8-qdq", "int4", "fp16") and rank blocks by what they cost.

    For fp16 the block selection applies to the weight MatMuls; other ops follow the graph-wide
    fp16 rules. Returns {"groups": [...ranked...], "costliest": [patterns], ...}."""
    if precision not in SCAN_PRECISIONS:
        raise QuantizeError(f"precision {precision!r}: choose one of {SCAN_PRECISIONS}")
    if mode not in ("only", "exclude"):
        raise QuantizeError(f"mode {mode!r}: choose 'only' or 'exclude'")
    parent = Path(parent)
    pm = load_manifest(parent, verify=True)
    name = decoder or pm.default_decoder
    base = open_bundle(parent, decoder=name, verify=False, threads=threads)
    entry = pm.graphs[name]
    work = tempfile.TemporaryDirectory(prefix="pae-sens-")
    src = Path(work.name) / entry.file
    model = G.prepare(parent / entry.file, src, bool(entry.data_files))
    patterns = G.scoped(keep_fp32, name)
    nodes, kept = G.select(G.weight_nodes(model), patterns)
    pinned = G.nodes_matching(model, patterns)  # fp16: whole blocks named by a pattern
    # blocks whose every node a pattern keeps fp32 have nothing to try
    groups = {g: names for g, ms in groups_of(G.weight_nodes(model)).items()
              if (names := [n.name for n in ms if n.name in nodes])}
    synthetic = calibration is None or str(calibration) == "synthetic"
    test = frame_streams(calibration, streams, frames, offset=0 if synthetic else streams)
    feeds: list[dict[str, Any]] = []
    if precision == "int8-qdq":
        if entry.variant != "portable":
            raise QuantizeError(f"static QDQ needs the portable decoder, {name!r} is {entry.variant}")
        cal = frame_streams(calibration, streams, frames, offset=100 if synthetic else 0)
        feeds = [s.feeds for s in record_feeds(base, cal, reply_tokens, pm.model.fps, 48, 16).samples()]
    recipe = Recipe(precision, block_size, accuracy_level, per_channel)
    fps = pm.model.fps
    bar = tqdm(total=len(groups) + (mode == "exclude"), desc=f"sensitivity {precision}", disable=not progress)
    with work as d:
        tries = 0

        def run(quantized: list[str]) -> dict[str, Any]:
            nonlocal tries
            tries += 1
            dst = Path(d) / f"try{tries}.onnx"
            fp32 = sorted(set(pinned) | (set(nodes) - set(quantized)))
            G.apply(recipe, src, dst, quantized, fp32, FeedReader(feeds), bool(entry.data_files))
            figures = compare_decoders(base, with_graph(base, name, dst), test, reply_tokens, fps)
            bar.update()
            return figures

        baseline = run(nodes) if mode == "exclude" else None
        ranked = []
        for group, members in groups.items():
            bar.set_postfix_str(group)
            chosen = members if mode == "only" else [n for n in nodes if n not in members]
            f = run(chosen)
            cost = damage(f) if baseline is None else damage(baseline) - damage(f)
            ranked.append({"group": group, "nodes": len(members), "cost": cost, **f})
        bar.close()
    ranked.sort(key=lambda r: r["cost"], reverse=True)
    return {
        "decoder": name, "precision": precision, "mode": mode, "streams": streams,
        "frames": frames, "baseline": baseline, "kept_fp32": kept, "groups": ranked,
        "costliest": [r["group"] for r in ranked[:top] if r["cost"] > 0],
        "cost": "(1 - decision agreement) + P(not talk) MAE + (1 - logit cosine)"
        + ("" if mode == "only" else ", recovered by keeping the block fp32"),
    }


def suggest(result: dict[str, Any]) -> str:
    """A command-line hint from a scan."""
    pats = " ".join(result["costliest"])
    return f"--keep-fp32 {pats}" if pats else "no block stands out: try a higher precision"

