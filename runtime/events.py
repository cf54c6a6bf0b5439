"""Events out of the loop: a bus that fans them out to observers, the JSONL event log, and the
latency observer that turns stage timings into p50/p95.

Every event is a flat dict with `type` and `t_wall` (Unix time). Types written by the runtime:
`start`, `stop`, `frame`, `utterance`, `message`, `summary`, `context_reset`, `frames_dropped`,
`error`; forwarded from the device layer: `source_*`, `frame_dropped`, `frame_unreadable`,
`speech`, `speech_error`, `speech_cut`, `speech_dropped`. `stage` events carry timings
(`stage`, `ms`) for observers and are not written to the log.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

Event = dict[str, Any]
TIMING_TYPES = frozenset({"stage"})


class Observer(Protocol):
    def on_event(self, event: Event) -> None: ...


class EventBus:
    """Stamps events and hands them to every observer, in the caller's thread.

    Observers lock their own state. A failing observer is logged and skipped: watching a stage
    must never stop it.
    """

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers: list[Observer] = list(observers)

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)

    def emit(self, type_: str, **fields: Any) -> Event:
        event: Event = {"type": type_, "t_wall": time.time(), **fields}
        self._dispatch(event)
        return event

    def forward(self, event: Event) -> None:
        """Pass on an event made elsewhere (device callbacks), adding `t_wall` if missing."""
        if "t_wall" not in event:
            event = {**event, "t_wall": time.time()}
        self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        for observer in self.observers:
            try:
                observer.on_event(event)
            except Exception:  # noqa: BLE001 - an observer bug must not kill the loop
                log.exception("observer %r failed on a %s event", observer, event.get("type"))


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays to Python, NaN and inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.generic):
        return _clean(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


def to_json(event: Event) -> str:
    try:
        return json.dumps(event, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):  # numpy values, NaN: convert and try again
        return json.dumps(_clean(event), allow_nan=False, ensure_ascii=False)


class EventLog:
    """One JSON line per event, flushed per line, thread-safe; optional console lines.

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
        if event.get("type") in self.skip:
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


def _t(event: Event, key: str = "t") -> str:
    value = event.get(key)
    return f"[{value:7.1f}s]" if isinstance(value, int | float) else "[   --  ]"


def format_console(event: Event) -> str | None:
    """A short human line for the events worth seeing live; None for the rest."""
    kind = event.get("type")
    if kind == "utterance":
        return f"{_t(event, 't_frame')} assistant: {event.get('text', '')}"
    if kind == "message":
        return f"{_t(event)} {event.get('role')}: {event.get('content', '')}"
    if kind == "summary":
        return f"{_t(event)} (summary) {event.get('text', '')}"
    if kind == "context_reset":
        return f"{_t(event)} (context reset: {event.get('strategy')})"
    if kind == "frames_dropped":
        return f"{_t(event)} (dropped {event.get('count')} frames, {event.get('total')} in all)"
    if kind in ("error", "speech_error", "source_error", "source_truncated"):
        return f"{_t(event)} {kind}: {event.get('error')}"
    if kind == "start":
        return f"started: {event.get('source', '')} -> {event.get('sink', '')} (Ctrl-C stops)"
    if kind == "stop":
        return f"stopped: {event.get('reason', '')}"
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
        kind = event.get("type")
        samples: list[tuple[str, Any]] = []
        if kind == "stage":
            samples.append((event["stage"], event.get("ms")))
        elif kind == "frame":
            samples += [("step", event.get("step_ms")), ("ttft", event.get("ttft_ms"))]
        elif kind == "speech":
            ttfa = event.get("ttfa_s")
            samples.append(("ttfa", None if ttfa is None else 1e3 * ttfa))
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
