"""`proassist-edge eval`: parse, call `evaluate` with the task world's content score, print.

The composition lives here because eval may not import the task world: the content score
(`taskworld/content.py`) rides along as one of `evaluate`'s scorers and applies only to
task-world episodes (a ProAssist split gets the paper's metrics alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from proassist_edge.cli.run import (
    add_ep_argument,
    add_talk_rule_arguments,
    add_warm_argument,
    apply_ep,
    talk_rule_overrides,
)
from proassist_edge.eval.evaluate import EpisodeScorer, evaluate, plot_sweep
from proassist_edge.eval.score import add_embedder_argument, add_window_argument, parse_window
from proassist_edge.fmt import table


def task_scorers() -> dict[str, EpisodeScorer]:
    """The scorers every `eval` (and `quantize --eval`) runs beside the paper's metrics."""
    from proassist_edge.taskworld.content import content_scorer

    return {"content": content_scorer}


def evaluate_with_content(bundle: Path, data: Path, **options: Any) -> dict[str, Any]:
    """`evaluate` with `task_scorers()`: the evaluator `quantize --eval` passes to quant."""
    return evaluate(bundle, data, scorers=task_scorers(), **options)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a bundle on a task-world split (paper's metrics)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", required=True, type=Path, help="split folder or ProAssist prepared .jsonl")
    add_talk_rule_arguments(p, "one or more (a sweep)", many=True)
    add_warm_argument(p)
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--plot", type=Path, help="precision/recall PNG (with a sweep)")
    p.add_argument("--limit", type=int, help="first N episodes only")
    p.add_argument("--decoder", help="decoder graph (default: the manifest's)")
    add_ep_argument(p)
    p.add_argument("--context", choices=["drop_all", "drop_middle", "summarize_and_drop"])
    add_window_argument(p, "the data's, as the authors' evaluator picks it by name (ego4d/... "
                        "-4 8.5, a task-world split -1 3, ...)")
    add_embedder_argument(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from proassist_edge.eval.textsim import make_similarity

    settings = {**talk_rule_overrides(args), "warm": args.warm or None}
    apply_ep(args)
    report = evaluate(
        args.bundle,
        args.data,
        args.threshold,
        make_similarity(args.embedder),
        None if args.window is None else parse_window(args.window),
        args.limit,
        args.decoder,
        args.context,
        scorers=task_scorers(),
        settings=settings,
    )
    report["settings"] = {k: v for k, v in settings.items() if v is not None}
    print(render_report(report))
    if args.diff_margin is not None:
        print(f"talk rule: diff, margin {args.diff_margin:g} (talk when P(not talk) fell by more, "
              "else when P <= 0.5; no threshold is used)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_sweep(report, args.plot)
    return 0


def render_report(report: dict[str, Any]) -> str:
    """Per episode, per threshold, and the headline: F1 with the content score beside it."""
    from proassist_edge.taskworld.content import content_line

    content = "content" in report

    def figures(m: dict[str, Any]) -> list[str]:
        row = [f"{m['F1']:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}"]
        if content:  # an episode of a mixed folder may have no content block
            c = m.get("content")
            row += [f"{c['right_step_rate']:.3f}", f"{c['hallucination_rate']:.3f}"] if c else ["", ""]
        return row

    more = ["right step", "hallucinated"] if content else []
    episodes = [(e["episode"], e["frames"], *figures(e)) for e in report["per_episode"]]
    sweep = [(t, *figures(m), f"{m['semantic_score']:.3f}") for t, m in report["sweep"].items()]
    lo, hi = report["window"]
    lines = [
        table(episodes, ["episode", "frames", "F1", "precision", "recall", *more]),
        table(sweep, ["threshold", "F1", "precision", "recall", *more, "semantic"]),
        f"F1 {report['F1']:.3f} at threshold {report['threshold']:g} over {report['episodes']} episodes"
        f" (embedder {report['embedder']['name']}, window {lo:g} {hi:g} s for {report['dataset']})",
    ]
    if content:
        lines.append(f"content: {content_line(report['content'])}")
    if report["embedder"]["note"]:
        lines.append(f"note: {report['embedder']['note']}")
    return "\n".join(lines)
