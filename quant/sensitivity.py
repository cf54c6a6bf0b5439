"""Sensitivity: which parts (vision graph, embedding table, decoder) and which decoder blocks
cost the most when quantized.

Each try quantizes one block's weight MatMuls alone ("only"), or everything but one block
("exclude"), and replays the same streams through the parent and the try. The costliest blocks
come back as keep-fp32 patterns ("layers.3.", "lm_head") for `quantize_bundle(keep_fp32=...)`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from proassist_edge.manifest import load_manifest
from proassist_edge.quant import graphs as G
from proassist_edge.quant.calibration import (
    FeedReader,
    Stream,
    frame_streams,
    plain_streams,
    record_feeds,
    vision_feeds,
)
from proassist_edge.quant.graphs import QuantizeError, Recipe, WeightNode
from proassist_edge.quant.report import Targets, compare_decoders, component_costs, with_graph
from proassist_edge.runtime.backend import make_session
from proassist_edge.runtime.bundle import Bundle, open_bundle

SCAN_PRECISIONS = ("int8", "int8-qdq", "int4", "fp16")


COST = "(1 - decision agreement) + P(not talk) MAE + (1 - logit cosine)"


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
    block_size: int = 32, accuracy_level: int | None = 4, per_channel: bool = True,
    keep_fp32: Sequence[str] = (), top: int = 3, threads: int = 0, progress: bool = True,
    test: list[Stream] | None = None, keep_8bit: Sequence[str] = (),
) -> dict[str, Any]:
    """Quantize one block of a graph at a time (mode "only") or all but one ("exclude") with
    PRECISION ("int8", "int8-qdq", "int4", "fp16") and rank blocks by what they cost.

    DECODER names the graph: a decoder variant (default: the bundle's) or "vision" (its blocks
    come back scoped, "vision:projector", so that a pattern never reaches the decoder's layers).
    For fp16 the block selection applies to the weight MatMuls; other ops follow the graph-wide
    fp16 rules. Compared on TEST (default: `streams` held-out calibration streams).
    Returns {"groups": [...ranked...], "costliest": [patterns], ...}."""
    if precision not in SCAN_PRECISIONS:
        raise QuantizeError(f"precision {precision!r}: choose one of {SCAN_PRECISIONS}")
    if mode not in ("only", "exclude"):
        raise QuantizeError(f"mode {mode!r}: choose 'only' or 'exclude'")
    parent = Path(parent)
    pm = load_manifest(parent, verify=True)
    name = decoder or pm.default_decoder
    vision = name == "vision"
    base = open_bundle(parent, decoder=None if vision else name, verify=False, threads=threads)
    entry = pm.graphs[name]
    ops = G.VISION_OPS if vision else ("MatMul",)
    work = tempfile.TemporaryDirectory(prefix="pae-sens-")
    src = Path(work.name) / entry.file
    model = G.prepare(parent / entry.file, src, bool(entry.data_files))
    patterns = G.scoped(keep_fp32, name)
    nodes, kept = G.select(G.weight_nodes(model, ops), patterns)
    pinned = G.nodes_matching(model, patterns)  # fp16: whole blocks named by a pattern
    # blocks whose every node a pattern keeps fp32 have nothing to try
    groups = {g: names for g, ms in groups_of(G.weight_nodes(model, ops)).items()
              if (names := [n.name for n in ms if n.name in nodes])}
    synthetic = calibration is None or str(calibration) == "synthetic"
    if test is None:
        test = plain_streams(frame_streams(calibration, streams, frames, offset=0 if synthetic else streams),
                             pm.model.fps)
    feeds: list[dict[str, Any]] = []
    if precision == "int8-qdq":
        cal = frame_streams(calibration, streams, frames, offset=100 if synthetic else 0)
        feeds = qdq_feeds(base, name, entry.variant, cal, reply_tokens, pm.model.fps)
    recipe = Recipe(precision, block_size, accuracy_level, per_channel, tuple(keep_8bit))
    fps = pm.model.fps
    bar = tqdm(total=len(groups) + (mode == "exclude"), desc=f"sensitivity {name} {precision}",
               disable=not progress)
    with work as d:
        tries = 0

        def run(quantized: list[str]) -> dict[str, Any]:
            nonlocal tries
            tries += 1
            dst = Path(d) / f"try{tries}.onnx"
            fp32 = sorted(set(pinned) | (set(nodes) - set(quantized)))
            G.apply(recipe, src, dst, quantized, fp32, FeedReader(feeds), bool(entry.data_files), ops)
            trial = (replace(base, vision=make_session(str(dst), threads, spin=False)) if vision
                     else with_graph(base, name, dst))
            figures = compare_decoders(base, trial, test, reply_tokens, fps)
            bar.update()
            return figures

        baseline, ranked = rank_groups(run, groups, nodes, mode, "vision:" if vision else "", bar)
        bar.close()
    return {
        "graph": name, "precision": precision, "mode": mode, "streams": len(test),
        "frames": sum(len(t.frames) for t in test), "baseline": baseline, "kept_fp32": kept, "groups": ranked,
        "costliest": [r["group"] for r in ranked[:top] if r["cost"] > 0],
        "cost": COST + ("" if mode == "only" else ", recovered by keeping the block fp32"),
    }


def qdq_feeds(
    base: Bundle, name: str, variant: str, cal: list[np.ndarray], reply_tokens: int, fps: float,
) -> list[dict[str, Any]]:
    """Calibration feeds for static QDQ of graph NAME: frames for the vision graph, recorded
    StreamCore feeds for the portable decoder."""
    if name == "vision":
        return vision_feeds(cal)
    if variant != "portable":
        raise QuantizeError(f"static QDQ needs the portable decoder, {name!r} is {variant}")
    return [s.feeds for s in record_feeds(base, cal, reply_tokens, fps, 48, 16).samples()]


def rank_groups(
    run: Callable[[list[str]], dict[str, Any]], groups: dict[str, list[str]], nodes: list[str],
    mode: str, scope: str, bar: tqdm,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Try each block ("only": it alone quantized; "exclude": all but it), costliest first."""
    baseline = run(nodes) if mode == "exclude" else None
    ranked = []
    for group, members in groups.items():
        bar.set_postfix_str(group)
        chosen = members if mode == "only" else [n for n in nodes if n not in members]
        f = run(chosen)
        cost = damage(f) if baseline is None else damage(baseline) - damage(f)
        ranked.append({"group": scope + group, "nodes": len(members), "cost": cost, **f})
    ranked.sort(key=lambda r: r["cost"], reverse=True)
    return baseline, ranked


def explain_misses(
    report: dict[str, Any], targets: Targets, parent: Path, base: Bundle, child: Bundle,
    sources: dict[str, str], test: list[Stream], scan: bool, *, recipes: dict[str, Recipe | None],
    calibration: str | None, reply_tokens: int, keep_fp32: Sequence[str], threads: int,
) -> None:
    """Name the misses; with `scan`, find what cost the most in the decoder that missed worst.

    First by part: the parent with the child's vision graph alone, its embedding table alone
    and its decoder alone, on the same streams. Then, for each part that misses a target alone
    (else the costliest), by block (`layer_sensitivity` of the vision graph or the decoder). The
    findings come back as the options that keep them at a higher precision (`suggested_options`):
    `--keep-fp32` with the costliest blocks, `--embeddings float16` for the table."""
    misses = {n: m for n, d in report["decoders"].items() if (m := targets.misses(d))}
    report.update(targets=asdict(targets), targets_met=not misses, misses=misses)
    if not misses or not scan:
        return
    worst = max(misses, key=lambda n: damage(report["decoders"][n]))
    fps = base.manifest.model.fps
    parts = component_costs(replace(base, decoder_name=sources[worst]),
                            replace(child, decoder_name=worst), test, reply_tokens, fps)
    ranked = sorted(parts, key=lambda k: damage(parts[k]), reverse=True)
    report["components"] = {
        "graph": worst, "ranked": ranked,
        "cost": "each part of the child alone in the fp32 parent: " + COST,
        **{k: {"cost": damage(f), "misses": targets.misses(f), **f} for k, f in parts.items()},
    }
    costly = [k for k in ranked if targets.misses(parts[k])] or ranked[:1]
    options, keep, scans = [], [], {}
    for part in costly:
        if part == "embeddings":
            options.append("--embeddings float16")
            continue
        recipe = recipes.get("vision" if part == "vision" else worst)
        if recipe is None:
            continue
        graph = "vision" if part == "vision" else sources[worst]
        scans[part] = result = layer_sensitivity(
            parent, recipe.precision, decoder=graph, calibration=calibration,
            block_size=recipe.block_size, accuracy_level=recipe.accuracy_level,
            per_channel=recipe.per_channel, keep_fp32=keep_fp32, keep_8bit=recipe.keep_8bit,
            progress=False, threads=threads, test=test[:4], reply_tokens=reply_tokens,
        )
        keep += result["costliest"]
        if part == "vision" and not result["costliest"]:
            options.append("--skip vision")
    if keep:
        options.append("--keep-fp32 " + " ".join(keep))
    report["sensitivity"] = scans
    report["suggested_keep_fp32"] = keep
    report["suggested_options"] = options
