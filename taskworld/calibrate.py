"""Choose a shipped model's default talk threshold on the validation split, as the paper does
(its best threshold differs per dataset), and record it in the model's asset json.

    python -m proassist_edge.taskworld.calibrate taskworld-lite --episodes 10 --test-episodes 20

The model is exported (unverified, the default decoder only) to a temporary bundle and swept with
`eval` over the validation split, whose tasks differ from the test split's, with the content
score beside the paper's metrics (`content.py`). `--select f1` (the default): the best F1 wins.
`--select right_step`: the most replies that name the reference's step, counted as F1 counts its
matches (2 x right-step replies / (replies + reference utterances)), so that neither a nearly
silent threshold, whose few replies may all be right, nor a chatty one wins; then the best F1.
A tie goes to the threshold nearest 0.5. The record keeps every threshold's F1 and content
score and the chosen one's. Exports made afterwards carry the threshold as the manifest's
`default_threshold` (the checkpoint config's `default_threshold` key). With `--test-episodes N`,
the test split is then scored at that threshold and recorded in the asset json under `metrics`
(`--episodes 0` scores the test split at the recorded threshold only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SELECT = ("f1", "right_step")


def right_step_f1(figures: dict[str, Any]) -> float:
    """F1 with "names the reference's step" as the match: 2 R / (replies + references)."""
    right = figures.get("content", {}).get("num_right_step", 0)
    total = figures["num_gen"] + figures["num_ref"]
    return 2 * right / total if total else 0.0


def best_threshold(sweep: dict[str, dict[str, Any]], select: str = "f1") -> float:
    """The threshold with the highest F1 (`select` "f1") or right-step F1, then F1 ("right_step");
    ties go to the one nearest 0.5."""
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")

    def key(t: float) -> tuple[float, ...]:
        m = sweep[f"{t:g}"]
        first = (round(right_step_f1(m), 6),) if select == "right_step" else ()
        return (*first, round(m["F1"], 6), -abs(t - 0.5))

    return max((float(t) for t in sweep), key=key)


def content_figures(m: dict[str, Any]) -> dict[str, Any]:
    """The content score of one sweep entry, with the right-step F1 the selection uses."""
    return {**m.get("content", {}), "right_step_f1": round(right_step_f1(m), 4)}


def calibrate(
    name: str, episodes: int, thresholds: tuple[float, ...] = GRID, seed: int = 0,
    test_episodes: int = 0, select: str = "f1", embedder: str | None = None,
) -> dict[str, Any]:
    from proassist_edge.eval.evaluate import evaluate
    from proassist_edge.eval.textsim import make_similarity
    from proassist_edge.export.bundle import ExportOptions, export_bundle
    from proassist_edge.taskworld.content import content_scorer
    from proassist_edge.taskworld.models import asset_paths, shipped_checkpoint
    from proassist_edge.taskworld.splits import generate_split

    ckpt = shipped_checkpoint(name)
    if ckpt is None:
        raise SystemExit(f"{name} is not a shipped model with its assets present")
    meta_path = asset_paths(name)[1]
    meta = json.loads(meta_path.read_text())
    similarity = make_similarity(embedder)
    scorers = {"content": content_scorer}
    embed_opt = f" --embedder {embedder}" if embedder else ""
    options = (f" --select {select}" if select != "f1" else "") + embed_opt
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle(ckpt, bundle, options=ExportOptions(verify=False, variants=("optimized",)))
        if episodes:
            generate_split("val", Path(tmp) / "val", episodes, seed)
            sweep = evaluate(bundle, Path(tmp) / "val", thresholds, similarity, scorers=scorers)["sweep"]
            best = best_threshold(sweep, select)
            meta["proassist"]["default_threshold"] = best
            meta["calibration"] = {
                "command": f"python -m proassist_edge.taskworld.calibrate {name} --episodes {episodes}"
                           + options,
                "split": "val", "episodes": episodes, "seed": seed, "select": select, "chosen": best,
                "F1": {t: round(m["F1"], 4) for t, m in sweep.items()},
                "content": {t: content_figures(m) for t, m in sweep.items()},
                "chosen_content": content_figures(sweep[f"{best:g}"]),
            }
        if test_episodes:
            threshold = meta["proassist"].get("default_threshold", 0.5)
            generate_split("test", Path(tmp) / "test", test_episodes, seed)
            report = evaluate(bundle, Path(tmp) / "test", [threshold], similarity, scorers=scorers)
            keep = ("precision", "recall", "F1", "semantic_score", "time_diff", "num_matched",
                    "num_mismatched", "num_missed", "num_redundant", "num_gen", "num_ref", "window",
                    "embedder", "content")
            meta.setdefault("metrics", {})[f"test-{test_episodes}-bundle"] = {
                "command": f"python -m proassist_edge.taskworld.calibrate {name} --episodes 0 "
                           f"--test-episodes {test_episodes}{embed_opt}",
                "threshold": threshold, **{k: report[k] for k in keep if k in report},
                "per_episode": [{"episode": e["episode"], "F1": round(e["F1"], 4),
                                 **({"right_step_rate": round(e["content"]["right_step_rate"], 4)}
                                    if "content" in e else {})}
                                for e in report["per_episode"]],
            }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    from proassist_edge.eval.score import add_embedder_argument
    from proassist_edge.taskworld.content import content_line

    p = argparse.ArgumentParser(prog="python -m proassist_edge.taskworld.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a shipped model (taskworld-tiny, taskworld-lite)")
    p.add_argument("--episodes", type=int, default=10, help="validation episodes (0: keep the threshold)")
    p.add_argument("--test-episodes", type=int, default=0, help="then score this many test episodes")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(GRID))
    p.add_argument("--seed", type=int, default=0, help="task-world split seed")
    p.add_argument("--select", choices=SELECT, default="f1",
                   help="choose the threshold on the paper's F1 (default) or on the replies that name "
                        "the reference's step (right-step F1, then F1)")
    add_embedder_argument(p)
    args = p.parse_args(argv)
    meta = calibrate(args.name, args.episodes, tuple(args.thresholds), args.seed, args.test_episodes,
                     args.select, args.embedder)
    cal = meta.get("calibration", {})
    for t, f1 in cal.get("F1", {}).items() if args.episodes else ():
        c = cal["content"][t]
        print(f"val threshold {t:>4}: F1 {f1:.3f}, right-step F1 {c['right_step_f1']:.3f}, "
              f"right step {c.get('right_step_rate', 0.0):.3f}"
              + ("  <- default" if float(t) == cal["chosen"] else ""))
    if args.episodes and "right_step_rate" in cal["chosen_content"]:
        print(f"chosen on {cal['select']}: {cal['chosen']:g}; {content_line(cal['chosen_content'])}")
    if args.test_episodes:
        m = meta["metrics"][f"test-{args.test_episodes}-bundle"]
        print(f"test ({args.test_episodes} episodes) at threshold {m['threshold']}: F1 {m['F1']:.3f} "
              f"precision {m['precision']:.3f} recall {m['recall']:.3f} semantic {m['semantic_score']:.3f}")
        if "content" in m:
            print(f"test content: {content_line(m['content'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
