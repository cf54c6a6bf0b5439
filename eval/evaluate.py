"""`proassist-edge eval`: run a bundle over every episode of a split and score it with the paper's
metrics; a threshold sweep gives the precision/recall curve.

Data: a task-world split folder (`index.jsonl` + `episodes/<uid>/frames.npy`,
`conversation.json`), or the ProAssist dataset's released format: a
`processed_data/<dataset>/prepared/<split>.jsonl` file (frames read from the Arrow files it names,
see `proassist_data.py`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from proassist_edge.errors import DataError
from proassist_edge.eval.metrics import DEFAULT_WINDOW, Metrics, PairSimilarity, aggregate, compute_metrics
from proassist_edge.eval.score import add_embedder_argument, add_window_argument
from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.bundle import Bundle, open_bundle
from proassist_edge.runtime.conversation import parse_conversation
from proassist_edge.runtime.core import settings_from_manifest
from proassist_edge.runtime.episode import Episode, Turn, read_split


def iter_data(data: str | Path, limit: int | None = None) -> Iterator[Episode]:
    data = Path(data)
    if (data / "index.jsonl").is_file():
        for i, ep in enumerate(read_split(data)):
            if limit is not None and i >= limit:
                return
            yield ep
    elif data.suffix == ".jsonl" and data.is_file():
        from proassist_edge.eval.proassist_data import iter_proassist_episodes

        yield from iter_proassist_episodes(data, limit=limit)
    else:
        raise DataError(
            f"{data} is neither a task-world split (no index.jsonl) nor a ProAssist prepared .jsonl: "
            "generate one with `proassist-edge taskworld generate --split test -o DIR`"
        )


def evaluator_reference(conversation: Sequence[Turn], num_frames: int) -> list[str]:
    """Per frame the reference utterance ("" = silent), as the authors' evaluator reads it.

    Their ``StreamProcessor.processed_conv_data_to_stream`` gives a frame a reference only when
    it is the last frame of a frames turn *directly* followed by an assistant turn, and then the
    content stripped. So an assistant turn after a user or system turn, a second assistant turn
    in a row, one before any frame or after an empty frames turn is no reference (unlike
    ``Episode.reference``, which keeps them all).
    """
    out = [""] * num_frames
    for turn, nxt in zip(conversation, conversation[1:], strict=False):
        if turn.get("role") != "frames" or nxt.get("role") != "assistant":
            continue
        start, end = int(turn["start"]), int(turn["end"])
        if end > start and 0 < end <= num_frames:
            out[end - 1] = str(nxt.get("content", "")).strip()
    return out


def run_episode(bundle: Bundle, ep: Episode, **overrides: Any) -> list[str]:
    """The text the assistant says after each frame ("" when silent)."""
    conv = parse_conversation(ep.conversation, ep.fps)
    settings = settings_from_manifest(bundle, **overrides)
    core = build_assistant(bundle, settings=settings, system=conv.system).core
    return [r.text if r.talk else "" for r in core.replay(ep.frames, conv.messages, ep.fps)]


def evaluate(
    bundle_path: str | Path,
    data_dir: str | Path,
    thresholds: Sequence[float] | None = None,
    similarity: PairSimilarity | None = None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    limit: int | None = None,
    decoder: str | None = None,
    context: str | None = None,
) -> dict[str, Any]:
    """Metrics per threshold (episodes pooled) and per episode at the first threshold.

    ``similarity`` defaults to ``textsim.make_similarity()`` (the paper's all-mpnet-base-v2, or
    MiniLM with a note); the report names it under ``embedder``.
    """
    from proassist_edge.eval.textsim import describe_similarity, make_similarity

    if similarity is None:
        similarity = make_similarity()
    bundle = open_bundle(bundle_path, decoder=decoder)
    thresholds = list(thresholds or [bundle.manifest.model.default_threshold])
    episodes = list(iter_data(data_dir, limit))
    if not episodes:
        raise DataError(f"{data_dir} holds no episodes")
    sweep: dict[str, Any] = {}
    per_episode: list[dict[str, Any]] = []
    bar = tqdm(total=len(thresholds) * len(episodes), desc="eval", unit="episode")
    for k, thr in enumerate(thresholds):
        scores: list[Metrics] = []
        for ep in episodes:
            gen = run_episode(bundle, ep, threshold=thr, context_strategy=context)
            ref = evaluator_reference(ep.conversation, ep.num_frames)
            m = compute_metrics(gen, ref, similarity, fps=ep.fps, window=window)
            scores.append(m)
            if k == 0:
                per_episode.append({"episode": ep.uid, "frames": ep.num_frames, **m.to_dict()})
            bar.update()
        sweep[f"{thr:g}"] = aggregate(scores).to_dict()
    bar.close()
    head = sweep[f"{thresholds[0]:g}"]
    return {
        "bundle": str(bundle_path),
        "data": str(data_dir),
        "episodes": len(episodes),
        "threshold": thresholds[0],
        "window": list(window),
        "embedder": describe_similarity(similarity),
        **head,
        "sweep": sweep,
        "per_episode": per_episode,
    }


def plot_sweep(report: dict[str, Any], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = sorted(report["sweep"], key=float)
    p = [report["sweep"][t]["precision"] for t in thr]
    r = [report["sweep"][t]["recall"] for t in thr]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(r, p, marker="o")
    for t, x, y in zip(thr, r, p, strict=True):
        ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1.05),
        ylim=(0, 1.05),
        title=f"{Path(report['bundle']).name}: threshold sweep",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a bundle on a task-world split (paper's metrics)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", required=True, type=Path, help="split folder or ProAssist prepared .jsonl")
    p.add_argument("--threshold", type=float, nargs="+", help="one or more (a sweep)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--plot", type=Path, help="precision/recall PNG (with a sweep)")
    p.add_argument("--limit", type=int, help="first N episodes only")
    p.add_argument("--decoder", help="decoder graph (default: the manifest's)")
    p.add_argument("--context", choices=["drop_all", "drop_middle", "summarize_and_drop"])
    add_window_argument(p)
    add_embedder_argument(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from proassist_edge.eval.score import parse_window
    from proassist_edge.eval.textsim import make_similarity

    report = evaluate(
        args.bundle,
        args.data,
        args.threshold,
        make_similarity(args.embedder),
        DEFAULT_WINDOW if args.window is None else parse_window(args.window),
        args.limit,
        args.decoder,
        args.context,
    )
    from proassist_edge.fmt import table

    rows = [
        (e["episode"], e["frames"], f"{e['F1']:.3f}", f"{e['precision']:.3f}", f"{e['recall']:.3f}")
        for e in report["per_episode"]
    ]
    print(table(rows, ["episode", "frames", "F1", "precision", "recall"]))
    sweep = [
        (t, f"{m['F1']:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['semantic_score']:.3f}")
        for t, m in report["sweep"].items()
    ]
    print(table(sweep, ["threshold", "F1", "precision", "recall", "semantic"]))
    lo, hi = report["window"]
    print(f"F1 {report['F1']:.3f} at threshold {report['threshold']:g} over {report['episodes']} episodes"
          f" (embedder {report['embedder']['name']}, window {lo:g} {hi:g} s)")
    if report["embedder"]["note"]:
        print(f"note: {report['embedder']['note']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_sweep(report, args.plot)
    return 0
