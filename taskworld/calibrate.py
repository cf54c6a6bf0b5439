"""Choose a shipped model's default talk threshold on the validation split, as the paper does
(its best threshold differs per dataset), and record it in the model's asset json.

    python -m proassist_edge.taskworld.calibrate taskworld-lite --episodes 10 --test-episodes 20

The model is exported (unverified, the default decoder only) to a temporary bundle and swept with
`eval` over the validation split, whose tasks differ from the test split's. The best F1 wins; a
tie goes to the threshold nearest 0.5. Exports made afterwards carry the threshold as the
manifest's `default_threshold` (the checkpoint config's `default_threshold` key). With
`--test-episodes N`, the test split is then scored at that threshold and recorded in the asset
json under `metrics` (`--episodes 0` scores the test split at the recorded threshold only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def best_threshold(sweep: dict[str, dict[str, Any]]) -> float:
    """The threshold with the highest F1; ties go to the one nearest 0.5."""
    return max((float(t) for t in sweep), key=lambda t: (round(sweep[f"{t:g}"]["F1"], 6), -abs(t - 0.5)))


def calibrate(
    name: str, episodes: int, thresholds: tuple[float, ...] = GRID, seed: int = 0,
    test_episodes: int = 0,
) -> dict[str, Any]:
    from proassist_edge.eval.evaluate import evaluate
    from proassist_edge.export.bundle import ExportOptions, export_bundle
    from proassist_edge.taskworld.models import asset_paths, shipped_checkpoint
    from proassist_edge.taskworld.splits import generate_split

    ckpt = shipped_checkpoint(name)
    if ckpt is None:
        raise SystemExit(f"{name} is not a shipped model with its assets present")
    meta_path = asset_paths(name)[1]
    meta = json.loads(meta_path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle(ckpt, bundle, options=ExportOptions(verify=False, variants=("optimized",)))
        if episodes:
            generate_split("val", Path(tmp) / "val", episodes, seed)
            sweep = evaluate(bundle, Path(tmp) / "val", thresholds)["sweep"]
            best = best_threshold(sweep)
            meta["proassist"]["default_threshold"] = best
            meta["calibration"] = {
                "command": f"python -m proassist_edge.taskworld.calibrate {name} --episodes {episodes}",
                "split": "val", "episodes": episodes, "seed": seed, "chosen": best,
                "F1": {t: round(m["F1"], 4) for t, m in sweep.items()},
            }
        if test_episodes:
            threshold = meta["proassist"].get("default_threshold", 0.5)
            generate_split("test", Path(tmp) / "test", test_episodes, seed)
            report = evaluate(bundle, Path(tmp) / "test", [threshold])
            keep = ("precision", "recall", "F1", "semantic_score", "time_diff", "num_matched",
                    "num_mismatched", "num_missed", "num_redundant", "num_gen", "num_ref", "window",
                    "embedder")
            meta.setdefault("metrics", {})[f"test-{test_episodes}-bundle"] = {
                "command": f"python -m proassist_edge.taskworld.calibrate {name} --episodes 0 "
                           f"--test-episodes {test_episodes}",
                "threshold": threshold, **{k: report[k] for k in keep},
                "per_episode": [{"episode": e["episode"], "F1": round(e["F1"], 4)}
                                for e in report["per_episode"]],
            }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proassist_edge.taskworld.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a shipped model (taskworld-tiny, taskworld-lite)")
    p.add_argument("--episodes", type=int, default=10, help="validation episodes (0: keep the threshold)")
    p.add_argument("--test-episodes", type=int, default=0, help="then score this many test episodes")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(GRID))
    p.add_argument("--seed", type=int, default=0, help="task-world split seed")
    args = p.parse_args(argv)
    meta = calibrate(args.name, args.episodes, tuple(args.thresholds), args.seed, args.test_episodes)
    cal = meta.get("calibration", {})
    for t, f1 in cal.get("F1", {}).items() if args.episodes else ():
        print(f"val threshold {t:>4}: F1 {f1:.3f}" + ("  <- default" if float(t) == cal["chosen"] else ""))
    if args.test_episodes:
        m = meta["metrics"][f"test-{args.test_episodes}-bundle"]
        print(f"test ({args.test_episodes} episodes) at threshold {m['threshold']}: F1 {m['F1']:.3f} "
              f"precision {m['precision']:.3f} recall {m['recall']:.3f} semantic {m['semantic_score']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
