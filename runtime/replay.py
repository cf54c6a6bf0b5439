"""Deterministic replay of a recorded episode: every frame in order, one step each, none dropped.

The episode folder's format is described in runtime/episode.py (`load_episode`); what a replay
feeds the core from it is `episode_inputs`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.events import (
    ErrorEvent,
    MessageEvent,
    ReplayStartEvent,
    ReplayStopEvent,
    UtteranceEvent,
)
from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.conversation import MessageSchedule
from proassist_edge.runtime.core import NonFiniteOutputError, StreamCore, settings_from_manifest
from proassist_edge.runtime.episode import episode_inputs, load_episode
from proassist_edge.runtime.events import EventBus, EventLog, Observer, frame_event, reduction_events
from proassist_edge.runtime.messages import FrameResult, TextMessage


def replay_results(
    core: StreamCore, frames: np.ndarray, messages: Sequence[TextMessage], fps: float,
    bus: EventBus | None = None,
) -> Iterator[FrameResult]:
    """One step per frame in order (messages due at or before a frame go with it), with events.

    A frame whose step gave a non-finite output is reported and yields a silent result with
    P(not talk) NaN; the memory is as before that step.
    """
    schedule = MessageSchedule(messages)
    for i in range(len(frames)):
        t = i / fps
        due = schedule.due(t)
        for m in due:
            if bus is not None:
                bus.emit(MessageEvent(role=m.role, content=m.content, t=t))
        t0 = time.perf_counter()
        try:
            r = core.step(frames[i : i + 1], i, t, due)
        except NonFiniteOutputError as e:
            r = FrameResult(i, t, float("nan"), False, context_len=core.kv_len)
            if bus is not None:
                bus.emit(ErrorEvent(kind=type(e).__name__, error=str(e), fatal=False,
                                    skipped=True, index=i, t=t))
                bus.emit(frame_event(r, skipped=True))
            yield r
            continue
        if bus is not None:
            bus.emit(frame_event(r, step_ms=1e3 * (time.perf_counter() - t0)))
            if r.text:
                bus.emit(UtteranceEvent(text=r.text, t_frame=t, t_decided=time.monotonic(),
                                        index=i))
            for event in reduction_events(r):
                bus.emit(event)
        yield r


def replay_episode(
    bundle_path: str | Path,
    episode_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    events_path: str | Path | None = None,
    decoder: str | None = None,
    *,
    console: bool = False,
    observers: Sequence[Observer] = (),
    threads: int = 0,
) -> list[FrameResult]:
    """Replay an episode through a bundle; writes `frame` records (and start/stop, utterance,
    message, context_reset, summary, error) to `events_path` as JSONL. Settings overrides are
    StreamSettings fields (threshold, context_strategy, max_seq_len, max_reply_tokens, ...)."""
    episode = load_episode(episode_dir)
    inputs = episode_inputs(episode)
    bundle = open_bundle(bundle_path, decoder, threads=threads)
    settings = settings_from_manifest(bundle, **dict(overrides or {}))
    system = inputs.system if inputs.has_system else None
    log = EventLog(events_path, console)
    assistant = build_assistant(bundle, settings=settings, system=system,
                                knowledge=inputs.knowledge, events=[log, *observers])
    core, bus = assistant.core, assistant.bus
    t0 = time.monotonic()
    bus.emit(ReplayStartEvent(
        bundle=str(bundle_path), decoder=bundle.decoder_name, episode=str(episode_dir),
        frames=len(episode.frames), fps=episode.fps, settings=asdict(settings),
        system=core.system, knowledge=core.knowledge,
    ))
    reason = "error"
    try:
        results = list(replay_results(core, episode.frames, inputs.messages, episode.fps, bus))
        reason = "end_of_episode"
    finally:
        bus.emit(ReplayStopEvent(reason=reason, frames=len(episode.frames),
                                 wall_s=time.monotonic() - t0, event_write_errors=log.write_errors))
        log.close()
    return results
