"""`proassist-edge bench BUNDLE --lag DATA`: the lag controller (runtime/lag.py) on task-world
episodes played live at their frame rate (2 fps), under three conditions, one after the other:

- `idle`: nothing else started by us (other users of the machine are measured, not stopped);
- `busy`: another process spins one core (`busy.burn_cores`), the controller off (the loop only
  drops the oldest frames, as before it);
- `busy+control`: the same load with the controller on;
- `busy+control, floor 16`: the same with replies capped down to 16 tokens instead of 32 (which
  cuts task-world instructions: the trade-off the default floor avoids).

For each: the frames that missed the deadline (decided later than the deadline after their
capture, dropped by the source, or skipped at a stride), the decisions taken, the seconds at
each level, and the paper's F1 of what was said against the episodes' references (scored after
every run, so the embedder never competes with a run for the CPU). A deterministic replay of the
same episodes (every frame, no clock) gives the F1 the model has when time costs nothing. The
conditions run in turns, episode by episode, so a drift of the machine's other load spreads over
all of them; each row records the cores other processes used (the burnt core included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.bench.busy import OtherLoad, burn_cores
from proassist_edge.bench.demo import MessageFeed
from proassist_edge.events import Event, LiveFrameEvent
from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.bundle import Bundle, open_bundle
from proassist_edge.runtime.conversation import parse_conversation
from proassist_edge.runtime.core import settings_from_manifest
from proassist_edge.runtime.episode import Episode
from proassist_edge.runtime.lag import LagOptions
from proassist_edge.runtime.loop import LoopOptions, RunSummary
from proassist_edge.runtime.source_base import FrameSource

# (name, cores burnt, lag control, its options)
CONDITIONS: tuple[tuple[str, int, bool, LagOptions], ...] = (
    ("idle", 0, False, LagOptions()),
    ("busy", 1, False, LagOptions()),
    ("busy+control", 1, True, LagOptions()),
    ("busy+control, floor 16", 1, True, LagOptions(min_reply_tokens=16)),
)


@dataclass
class LagBenchOptions:
    bundle: Path
    data: Path
    episodes: int = 2
    threshold: float | None = None  # None: the bundle's
    deadline_ms: float | None = None  # None: the frame period
    threads: int = 0
    embedder: str | None = None
    replay: bool = True


class EpisodeSource(FrameSource):
    """An episode's frames as a camera would give them (paced by the loop in real time)."""

    name = "episode"

    def __init__(self, episode: Episode) -> None:
        super().__init__(episode.fps)
        self.episode = episode

    def frames(self) -> Any:
        for i, pixels in enumerate(self.episode.frames):
            yield self._deliver(i, i / self.fps, np.ascontiguousarray(pixels))


class Said:
    """What the assistant said after each frame ("" silent), from the live frame events."""

    def __init__(self, n: int) -> None:
        self.text = [""] * n

    def on_event(self, event: Event) -> None:
        if isinstance(event, LiveFrameEvent) and event.talk:
            self.text[event.index] = event.text


def live_episode(
    bundle: Bundle, ep: Episode, threshold: float | None, control: bool, lag: LagOptions
) -> tuple[list[str], RunSummary]:
    conv = parse_conversation(ep.conversation, ep.fps)
    settings = settings_from_manifest(bundle, threshold=threshold)
    said = Said(ep.num_frames)
    options = LoopOptions(realtime=True, lag_control=control, lag=lag)
    assistant = build_assistant(bundle, EpisodeSource(ep), None, settings, system=conv.system,
                                events=[said], options=options)
    assistant.bus.add(MessageFeed(assistant, list(conv.messages), ep.fps))
    return said.text, assistant.run()


def replay_episode(bundle: Bundle, ep: Episode, threshold: float | None) -> list[str]:
    from proassist_edge.eval.evaluate import run_episode

    return run_episode(bundle, ep, threshold=threshold)


def _condition_row(
    name: str, runs: list[tuple[list[str], RunSummary]], cores: float | None
) -> dict[str, Any]:
    lags = [s.lag or {} for _, s in runs]
    total = {k: sum(int(lag.get(k, 0)) for lag in lags)
             for k in ("offered", "missed", "late_frames", "skipped", "decisions", "late", "changes")}
    seconds: dict[str, float] = {}
    for lag in lags:
        for level, s in lag.get("seconds", {}).items():
            seconds[level] = seconds.get(level, 0.0) + s
    step_p95 = [s.latency.get("step", {}).get("p95") for _, s in runs]
    return {
        "condition": name, **total, "dropped": sum(s.dropped for _, s in runs),
        "missed_share": total["missed"] / max(1, total["offered"]),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "step_ms_p95": max((p for p in step_p95 if p is not None), default=None),
        "other_processes_cores": cores, "deadline_ms": lags[0].get("deadline_ms") if lags else None,
    }


def run_lag_bench(opts: LagBenchOptions, progress: Any = print) -> dict[str, Any]:
    from proassist_edge.eval.evaluate import evaluator_reference, iter_data
    from proassist_edge.eval.metrics import (
        aggregate,
        match_utterances,
        metrics_from_tally,
        tally_from_match,
    )
    from proassist_edge.eval.textsim import describe_similarity, make_similarity

    t0 = time.time()
    bundle = open_bundle(opts.bundle, threads=opts.threads)
    episodes = list(iter_data(opts.data, opts.episodes))
    runs: dict[str, list[tuple[list[str], RunSummary]]] = {c[0]: [] for c in CONDITIONS}
    busy: dict[str, list[float]] = {c[0]: [] for c in CONDITIONS}
    # the conditions in turns, episode by episode: a shared machine's load drifts in minutes
    for i, ep in enumerate(episodes):
        for name, burn, control, lag in CONDITIONS:
            progress(f"lag bench: episode {i + 1}/{len(episodes)} ({ep.uid}), {name}, live at "
                     f"{ep.fps:g} fps")
            with burn_cores(burn):
                load = OtherLoad()
                runs[name].append(live_episode(bundle, ep, opts.threshold, control,
                                               replace(lag, deadline_ms=opts.deadline_ms)))
                cores = load.cores()
            if cores is not None:
                busy[name].append(cores)
    said = {name: [gen for gen, _ in r] for name, r in runs.items()}
    rows = [_condition_row(name, r, float(np.mean(busy[name])) if busy[name] else None)
            for name, r in runs.items()]
    if opts.replay:
        progress("lag bench: replay (every frame, no clock)")
        said["replay"] = [replay_episode(bundle, ep, opts.threshold) for ep in episodes]
        rows.append({"condition": "replay", "offered": sum(ep.num_frames for ep in episodes),
                     "missed": None, "decisions": sum(ep.num_frames for ep in episodes)})
    progress("lag bench: scoring")
    similarity = make_similarity(opts.embedder)
    for row in rows:
        scores = []
        for ep, gen in zip(episodes, said[row["condition"]], strict=True):
            ref = evaluator_reference(ep.conversation, ep.num_frames)
            match = match_utterances(gen, ref, similarity, fps=ep.fps)
            scores.append(metrics_from_tally(tally_from_match(match, gen, ref, fps=ep.fps)))
        m = aggregate(scores)
        row.update(f1=m.f1, precision=m.precision, recall=m.recall, replies=m.num_gen)
    return {
        "bundle": str(opts.bundle), "data": str(opts.data),
        "episodes": [ep.uid for ep in episodes], "decoder": bundle.decoder_name,
        "threads": opts.threads, "embedder": describe_similarity(similarity),
        "rows": rows, "elapsed_s": round(time.time() - t0, 1),
    }


def lag_table(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    head = ("| condition | other cores busy | frames missing the deadline | decisions (late) | "
            "dropped / skipped | step p95 ms | seconds per level | F1 | replies |")
    lines = [head, "|" + "---|" * 9]
    for r in result["rows"]:
        if r["missed"] is None:
            lines.append(f"| {r['condition']} | | | {r['decisions']} (every frame) | | | | "
                         f"{r['f1']:.3f} | {r['replies']} |")
            continue
        cores = "--" if r["other_processes_cores"] is None else f"{r['other_processes_cores']:.2f}"
        levels = ", ".join(f"{k} {v:g}" for k, v in r["seconds"].items() if v)
        p95 = "--" if r["step_ms_p95"] is None else f"{r['step_ms_p95']:.0f}"
        lines.append(
            f"| {r['condition']} | {cores} | {r['missed']} of {r['offered']} "
            f"({100 * r['missed_share']:.0f}%) | {r['decisions']} ({r['late']}) | "
            f"{r['dropped']} / {r['skipped']} | {p95} | {levels} | {r['f1']:.3f} | {r['replies']} |")
    return "\n".join(lines)
