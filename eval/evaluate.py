"""Run a bundle over every episode of a split and score it with the paper's metrics; a
threshold sweep gives the precision/recall curve. The `eval` command that calls it is
`proassist_edge/cli/eval.py`.

Data: a task-world split folder (`index.jsonl` + `episodes/<uid>/frames.npy`,
`conversation.json`), or the ProAssist dataset's released format: a
`processed_data/<dataset>/prepared/<split>.jsonl` file (frames read from the Arrow files it names,
see `proassist_data.py`).

Other per-episode scores ride along through `scorers` (name -> `EpisodeScorer`): each sees the
episode, the generated texts and the paper's matching of that episode, and returns a tally that
adds up over the split (or None where it does not apply), so a part above eval (the task world's
content score) adds its figures without eval importing it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from proassist_edge.chat import LLAMA3, ChatFormat
from proassist_edge.errors import DataError
from proassist_edge.eval.metrics import (
    MatchResult,
    Metrics,
    PairSimilarity,
    Tally,
    aggregate,
    match_utterances,
    metrics_from_tally,
    tally_from_match,
    window_for,
)
from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.bundle import Bundle, open_bundle
from proassist_edge.runtime.conversation import parse_conversation
from proassist_edge.runtime.core import settings_from_manifest
from proassist_edge.runtime.episode import Episode, Turn, read_split


class ScoreTally(Protocol):
    """What a scorer returns for one episode: tallies add up (``a + b``) over a split, and
    ``to_dict`` gives the JSON-ready figures of a tally (one episode's or the pooled split's)."""

    def __add__(self, other: Any, /) -> Any: ...

    def to_dict(self) -> Mapping[str, Any]: ...


# (episode, generated text per frame ("" silent), the paper's matching of that episode) -> its
# tally, or None where the score does not apply to the episode (e.g. not a task-world episode)
EpisodeScorer = Callable[[Episode, Sequence[str], MatchResult], "ScoreTally | None"]


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


def data_name(data: str | Path) -> str:
    """The data's name as the authors' evaluator knows it, which picks the match window
    (``window_for``): ``<dataset>/<split>`` for ``processed_data/<dataset>/prepared/<split>.jsonl``,
    "taskworld" for a task-world split folder."""
    from proassist_edge.eval.proassist_data import split_name

    return split_name(data) if Path(data).suffix == ".jsonl" else "taskworld"


def evaluator_reference(conversation: Sequence[Turn], num_frames: int,
                        chat: ChatFormat = LLAMA3) -> list[str]:
    """Per frame the reference utterance ("" = silent), as the authors' evaluator reads it.

    Their ``StreamProcessor.processed_conv_data_to_stream`` gives a frame a reference only when
    it is the last frame of a frames turn *directly* followed by an assistant turn: the turn in
    the chat format, cleaned as a reply (``ChatFormat.reply_text``; so an empty turn leaves its
    header, a talk). An assistant turn after a user or system turn, a second assistant turn
    in a row, one before any frame or after an empty frames turn is no reference (unlike
    ``Episode.reference``, which keeps them all).
    """
    out = [""] * num_frames
    for turn, nxt in zip(conversation, conversation[1:], strict=False):
        if turn.get("role") != "frames" or nxt.get("role") != "assistant":
            continue
        start, end = int(turn["start"]), int(turn["end"])
        if end > start and 0 < end <= num_frames:
            content = str(nxt.get("content", "")).strip()
            out[end - 1] = chat.reply_text(chat.render("assistant", content))
    return out


def run_episode(bundle: Bundle, ep: Episode, **overrides: Any) -> list[str]:
    """The text the assistant says after each frame ("" when silent)."""
    conv = parse_conversation(ep.conversation, ep.fps)
    settings = settings_from_manifest(bundle, **overrides)
    # a conversation without an opening system turn starts without one, as the authors stream it
    core = build_assistant(bundle, settings=settings, system=conv.system,
                           opening=conv.has_system).core
    return [r.text if r.talk else "" for r in core.replay(ep.frames, conv.messages, ep.fps)]


def evaluate(
    bundle_path: str | Path,
    data_dir: str | Path,
    thresholds: Sequence[float] | None = None,
    similarity: PairSimilarity | None = None,
    window: tuple[float, float] | None = None,
    limit: int | None = None,
    decoder: str | None = None,
    context: str | None = None,
    scorers: Mapping[str, EpisodeScorer] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics per threshold (episodes pooled) and per episode at the first threshold.
    ``settings``: more StreamSettings overrides for every episode (diff_margin, feed_eos, ...).
    ``window`` defaults to the data's, as the authors pick it (``data_name``, ``window_for``).

    ``similarity`` defaults to ``textsim.make_similarity()`` (the paper's all-mpnet-base-v2, or
    MiniLM with a note); the report names it under ``embedder``. Each of ``scorers`` puts its
    pooled figures under its name beside the metrics (top level and per threshold) and its
    episode's figures in ``per_episode``; a scorer that applied to no episode adds nothing.
    """
    from proassist_edge.eval.textsim import describe_similarity, make_similarity

    scorers = dict(scorers or {})
    taken = {"episode", "frames", *metrics_from_tally(Tally()).to_dict()}
    if clash := sorted(taken & set(scorers)):
        raise ValueError(f"scorer names {clash} would overwrite the report's figures: rename them")
    if similarity is None:
        similarity = make_similarity()
    bundle = open_bundle(bundle_path, decoder=decoder)
    thresholds = list(thresholds or [bundle.manifest.model.default_threshold])
    window = window_for(data_name(data_dir)) if window is None else window
    episodes = list(iter_data(data_dir, limit))
    if not episodes:
        raise DataError(f"{data_dir} holds no episodes")
    sweep: dict[str, Any] = {}
    per_episode: list[dict[str, Any]] = []
    bar = tqdm(total=len(thresholds) * len(episodes), desc="eval", unit="episode")
    for k, thr in enumerate(thresholds):
        scores: list[Metrics] = []
        extra: dict[str, list[ScoreTally]] = {name: [] for name in scorers}
        for ep in episodes:
            gen = run_episode(bundle, ep, **{**dict(settings or {}), "threshold": thr,
                                             "context_strategy": context})
            ref = evaluator_reference(ep.conversation, ep.num_frames,
                                      bundle.manifest.model.chat_format)
            match = match_utterances(gen, ref, similarity, fps=ep.fps, window=window)
            m = metrics_from_tally(tally_from_match(match, gen, ref, fps=ep.fps))
            scores.append(m)
            row: dict[str, Any] = {"episode": ep.uid, "frames": ep.num_frames, **m.to_dict()}
            for name, scorer in scorers.items():
                tally = scorer(ep, gen, match)
                if tally is not None:
                    extra[name].append(tally)
                    row[name] = dict(tally.to_dict())
            if k == 0:
                per_episode.append(row)
            bar.update()
        sweep[f"{thr:g}"] = {**aggregate(scores).to_dict(), **pooled(extra)}
    bar.close()
    head = sweep[f"{thresholds[0]:g}"]
    return {
        "bundle": str(bundle_path),
        "data": str(data_dir),
        "episodes": len(episodes),
        "threshold": thresholds[0],
        "dataset": data_name(data_dir),
        "window": list(window),
        "embedder": describe_similarity(similarity),
        **head,
        "sweep": sweep,
        "per_episode": per_episode,
    }


def pooled(tallies: Mapping[str, Sequence[ScoreTally]]) -> dict[str, dict[str, Any]]:
    """Each scorer's tallies added up over the episodes it scored, as figures."""
    return {name: dict(functools.reduce(operator.add, ts).to_dict())
            for name, ts in tallies.items() if ts}


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
