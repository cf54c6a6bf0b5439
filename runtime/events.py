"""Events out of the loop: a bus that fans the typed events (proassist_edge/events.py) out to
observers, the JSONL event log, the stage timer and the latency observer that turns stage
timings into p50/p95. What each event holds, and its JSON form, is defined in
proassist_edge/events.py; `stage` events carry timings for observers and are not logged.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from proassist_edge.events import (
    ContextResetEvent,
    ErrorEvent,
    Event,
    FrameEvent,
    FramesDroppedEvent,
    LiveFrameEvent,
    MessageEvent,
    SourceErrorEvent,
    SourceTruncatedEvent,
    SpeechErrorEvent,
    SpeechEvent,
    StageEvent,
    StartEvent,
    StopEvent,
    SummaryEvent,
    UtteranceEvent,
    to_json,
)
from proassist_edge.runtime.backend import StepOut
from proassist_edge.runtime.messages import FrameResult
from proassist_edge.runtime.stages import Stage, StageObserver

log = logging.getLogger(__name__)

TIMING_TYPES = frozenset({StageEvent.type})


class Observer(Protocol):
    def on_event(self, event: Event) -> None: ...


class EventBus:
    """Hands each event to every observer, in the caller's thread.

    Observers lock their own state. A failing observer is logged and skipped: watching a stage
    must never stop it.
    """

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers: list[Observer] = list(observers)

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)

    def emit(self, event: Event) -> None:
        for observer in self.observers:
            try:
                observer.on_event(event)
            except Exception:  # noqa: BLE001 - an observer bug must not kill the loop
                log.exception("observer %r failed on a %s event", observer, event.type)


class EventLog:
    """One JSON line per event (proassist_edge/events.py `to_json`), flushed per line,
    thread-safe; optional console lines.

    A failing file (disk full, a directory as path, a vanished mount) never stops the loop: the
    first error is reported once on stderr, later ones only counted (`write_errors`).
    """

    def __init__(
        self,
        path: str | Path | None,
        console: bool = False,
        *,
        skip: Collection[str] = TIMING_TYPES,
        console_stream: IO[str] | None = None,
        error_stream: IO[str] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.console = console
        self.skip = frozenset(skip)
        self.written = 0
        self.write_errors = 0
        self._out = console_stream
        self._err = error_stream
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if self.path is not None:
            try:
                if not self.path.parent.exists():
                    self.path.parent.mkdir(parents=True)
                self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - kept open
            except OSError as e:
                self._failed(e)

    def on_event(self, event: Event) -> None:
        if event.type in self.skip:
            return
        line = to_json(event) if self._file is not None else ""
        text = format_console(event) if self.console else None
        with self._lock:
            if self._file is not None:
                try:
                    self._file.write(line + "\n")
                    self._file.flush()
                    self.written += 1
                except OSError as e:
                    self._failed(e)
            if text is not None:
                out = self._out or sys.stdout
                print(text, file=out, flush=True)

    def _failed(self, e: OSError) -> None:
        self.write_errors += 1
        if self.write_errors == 1:
            err = self._err or sys.stderr
            print(
                f"warning: cannot write the event log {self.path} ({e}); the assistant keeps "
                "running, later events are not logged",
                file=err, flush=True,
            )

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as e:
                    self._failed(e)
                self._file = None


def _t(value: float | None) -> str:
    return f"[{value:7.1f}s]" if isinstance(value, int | float) else "[   --  ]"


def format_console(event: Event) -> str | None:
    """A short human line for the events worth seeing live; None for the rest."""
    if isinstance(event, UtteranceEvent):
        return f"{_t(event.t_frame)} assistant: {event.text}"
    if isinstance(event, MessageEvent):
        return f"{_t(event.t)} {event.role}: {event.content}"
    if isinstance(event, SummaryEvent):
        return f"{_t(event.t)} (summary) {event.text}"
    if isinstance(event, ContextResetEvent):
        return f"{_t(event.t)} (context reset: {event.strategy})"
    if isinstance(event, FramesDroppedEvent):
        return f"{_t(event.t)} (dropped {event.count} frames, {event.total} in all)"
    if isinstance(event, ErrorEvent):
        return f"{_t(event.t)} error: {event.error}"
    if isinstance(event, SpeechErrorEvent | SourceErrorEvent | SourceTruncatedEvent):
        return f"{_t(None)} {event.type}: {event.error}"
    if isinstance(event, StartEvent):
        return f"started: {event.source} -> {event.sink} (Ctrl-C stops)"
    if isinstance(event, StopEvent):
        return f"stopped: {event.reason}"
    return None


class LatencyObserver:
    """Per-stage durations in ms (the most recent `keep` of each), summarized as p50/p95.

    Stages: `encode`, `append` (frame tokens in, decision out), `decode` (one reply token),
    `ttft` (step start to first reply token), `step` (whole step), `ttfa` (decision to first
    audio, from the speaker).
    """

    def __init__(self, keep: int = 10_000) -> None:
        self._ms: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=keep))
        self._lock = threading.Lock()

    def on_event(self, event: Event) -> None:
        samples: list[tuple[str, float | None]] = []
        if isinstance(event, StageEvent):
            samples.append((event.stage, event.ms))
        elif isinstance(event, FrameEvent):
            samples.append(("step", event.step_ms))
            if isinstance(event, LiveFrameEvent):
                samples.append(("ttft", event.ttft_ms))
        elif isinstance(event, SpeechEvent):
            samples.append(("ttfa", 1e3 * event.ttfa_s))
        with self._lock:
            for stage, ms in samples:
                if isinstance(ms, int | float) and math.isfinite(ms):
                    self._ms[stage].append(float(ms))

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._ms[stage].append(ms)

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {"n", "p50", "p95", "mean"}} in ms."""
        with self._lock:
            data = {k: np.asarray(v, dtype=np.float64) for k, v in self._ms.items() if v}
        return {
            k: {
                "n": float(len(a)),
                "p50": float(np.percentile(a, 50)),
                "p95": float(np.percentile(a, 95)),
                "mean": float(a.mean()),
            }
            for k, a in data.items()
        }


class StageTimer(StageObserver):
    """Times the core's stages from outside them (perf_counter around each) and reports each as
    a `stage` event: encode (frames), the decision append, each reply or summary token
    (`decode`), the summary request (`summary`)."""

    TIMED = frozenset({"encode", "append", "decode", "summary"})

    def __init__(self, emit: Callable[[Event], None]) -> None:
        self.emit = emit
        self.t0 = 0.0

    def stage_started(self, stage: Stage) -> None:
        self.t0 = time.perf_counter()

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        if stage.name not in self.TIMED:
            return
        ms = 1e3 * (time.perf_counter() - self.t0)
        if stage.name == "encode":
            self.emit(StageEvent(stage="encode", ms=ms, frames=stage.tokens))
        else:
            self.emit(StageEvent(stage=stage.name, ms=ms, tokens=stage.tokens))


def _result_fields(r: FrameResult) -> dict[str, Any]:
    return {
        "index": r.index, "t": r.t, "p_not_talk": r.p_not_talk, "talk": r.talk, "text": r.text,
        "token_ids": r.token_ids, "context_len": r.context_len, "reset": r.reset,
        "summary": r.summary,
    }


def frame_event(r: FrameResult, step_ms: float | None = None, skipped: bool = False) -> FrameEvent:
    """The `frame` event of a replayed step."""
    return FrameEvent(**_result_fields(r), step_ms=step_ms, skipped=skipped)


def live_frame_event(
    r: FrameResult, frames: tuple[int, ...], lag_s: float | None, step_ms: float,
    ttft_ms: float | None,
) -> LiveFrameEvent:
    """The `frame` event of a live step."""
    return LiveFrameEvent(
        **_result_fields(r), frames=frames, lag_s=lag_s, step_ms=step_ms, ttft_ms=ttft_ms
    )


def reduction_events(r: FrameResult) -> list[Event]:
    """The context reduction that followed a step, and the summary it made."""
    out: list[Event] = []
    if r.reset is not None:
        out.append(ContextResetEvent(strategy=r.reset, index=r.index, t=r.t,
                                     context_len=r.context_len))
    if r.summary is not None:
        out.append(SummaryEvent(text=r.summary, index=r.index, t=r.t))
    return out
