"""Every event the assistant reports: one frozen dataclass per kind, serialized here and nowhere
else (`to_record`, `to_json`).

Producers build an event and hand it to a callback or the runtime's EventBus; observers receive
the typed event and match on its class. The JSONL event log writes `to_json(event)`: the
record is flat, `{"type": KIND, "version": EVENT_VERSION, "t_wall": ..., <fields>}`, with NaN and
inf written as null.

Versioning: every record carries `"version"` (this schema is version 1), not only `start`: a log
is often filtered (`grep '"type": "frame"'`) or cut, and each line then still says how to read
it. A change that renames, removes or retypes a field raises the version; a new event kind or a
new optional field does not.

Kinds written by the stream (runtime): `start`, `stop`, `frame`, `utterance`, `message`,
`summary`, `context_reset`, `frames_dropped`, `error`, and by its lag controller `lag_level` and
`decoder_switch`; by the source threads: `source_end`, `source_error`, `source_truncated`,
`frame_dropped`, `frame_unreadable`, `camera_read_failed`, `camera_reconnected`; by the speaker
thread: `speech`, `speech_error`, `speech_cut`, `speech_dropped`. `stage` events carry timings
for observers and are not written to the log.

Variants of one kind (a live run's `start` and a replay's) are two classes with one `type`.
A field made with `optional()` is left out of the record while it holds its default, so a
variant without it writes exactly the keys it always wrote.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np

EVENT_VERSION = 1


def optional(default: Any = None) -> Any:
    """A field left out of the record while it holds `default`."""
    return field(default=default, metadata={"omit_default": True})


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event: its kind (`type`) and when it was made (Unix time)."""

    type: ClassVar[str] = ""
    t_wall: float = field(default_factory=time.time)


# --- the stream ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StartEvent(Event):
    """A live run began (the settings are the StreamSettings fields)."""

    type: ClassVar[str] = "start"
    source: str
    sink: str
    realtime: bool
    settings: Mapping[str, Any]
    system: str
    knowledge: str


@dataclass(frozen=True, kw_only=True)
class ReplayStartEvent(Event):
    """A deterministic replay of a recorded episode began."""

    type: ClassVar[str] = "start"
    mode: str = "replay"
    bundle: str
    decoder: str
    episode: str
    frames: int
    fps: float
    settings: Mapping[str, Any]
    system: str
    knowledge: str


@dataclass(frozen=True, kw_only=True)
class StopEvent(Event):
    """A live run ended: the run's summary (runtime/loop.py RunSummary) and its latency."""

    type: ClassVar[str] = "stop"
    frames: int
    steps: int
    dropped: int
    skipped: int
    utterances: int
    replies: int
    spoken: int
    speech_errors: int
    stream_s: float
    wall_s: float
    reason: str
    error: str | None
    event_write_errors: int
    latency: Mapping[str, Mapping[str, float]]
    lag: Mapping[str, Any] | None = optional()  # runtime/lag.py LagController.summary()


@dataclass(frozen=True, kw_only=True)
class ReplayStopEvent(Event):
    type: ClassVar[str] = "stop"
    reason: str
    frames: int
    wall_s: float
    event_write_errors: int


@dataclass(frozen=True, kw_only=True)
class FrameEvent(Event):
    """One frame step's result (runtime/messages.py FrameResult). A replay adds the step's
    time, or `skipped` when the step was rolled back."""

    type: ClassVar[str] = "frame"
    index: int
    t: float
    p_not_talk: float
    talk: bool
    text: str
    token_ids: tuple[int, ...]
    context_len: int
    reset: str | None
    summary: str | None
    step_ms: float | None = optional()
    skipped: bool = optional(False)


@dataclass(frozen=True, kw_only=True)
class LiveFrameEvent(FrameEvent):
    """A live step: the frames it took in, the lag of the last behind the camera (None when not
    paced in real time) and the time from the step's start to the first reply token."""

    frames: tuple[int, ...]
    lag_s: float | None
    ttft_ms: float | None


@dataclass(frozen=True, kw_only=True)
class StageEvent(Event):
    """The duration of one stage of a step (runtime/stages.py): `tokens` appended, or `frames`
    encoded. Not written to the log."""

    type: ClassVar[str] = "stage"
    stage: str
    ms: float
    tokens: int | None = optional()
    frames: int | None = optional()


@dataclass(frozen=True, kw_only=True)
class UtteranceEvent(Event):
    """A piece of a reply handed to speech (a live run: with its reply and whether it ends it)."""

    type: ClassVar[str] = "utterance"
    text: str
    t_frame: float
    t_decided: float
    reply_id: int | None = optional()
    final: bool | None = optional()
    index: int


@dataclass(frozen=True, kw_only=True)
class MessageEvent(Event):
    type: ClassVar[str] = "message"
    role: str
    content: str
    t: float


@dataclass(frozen=True, kw_only=True)
class ContextResetEvent(Event):
    type: ClassVar[str] = "context_reset"
    strategy: str
    index: int
    t: float
    context_len: int


@dataclass(frozen=True, kw_only=True)
class SummaryEvent(Event):
    type: ClassVar[str] = "summary"
    text: str
    index: int
    t: float


@dataclass(frozen=True, kw_only=True)
class FramesDroppedEvent(Event):
    """Frames the source dropped since the last report (`total` in the run)."""

    type: ClassVar[str] = "frames_dropped"
    count: int
    total: int
    t: float


@dataclass(frozen=True, kw_only=True)
class LagLevelEvent(Event):
    """The lag controller (runtime/lag.py) changed its level: it degraded because the core fell
    behind the camera, or recovered because it had room again; `reason` gives the measurements
    that decided it. What the next steps run: `reply_cap` (None: the stream's own), every
    `stride`-th frame (`frame_mode` "append" or "drop"), `decoder` (None: the bundle's own).
    `hold_s` is the calm time the next recovery needs."""

    type: ClassVar[str] = "lag_level"
    level: int
    name: str
    previous: str
    reason: str
    t: float
    age_ms: float
    step_ms: float
    budget_ms: float
    deadline_ms: float
    reply_cap: int | None
    stride: int
    frame_mode: str
    decoder: str | None
    hold_s: float


@dataclass(frozen=True, kw_only=True)
class DecoderSwitchEvent(Event):
    """The core now runs on another decoder graph of its bundle (`reason`: why now is safe)."""

    type: ClassVar[str] = "decoder_switch"
    decoder: str
    previous: str
    reason: str
    t: float


@dataclass(frozen=True)
class DroppedMessage:
    role: str
    content: str


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(Event):
    """Something failed. `kind` names it (an exception type, "source", "message_dropped");
    a skipped step says which frame(s) and which messages were lost with it."""

    type: ClassVar[str] = "error"
    kind: str
    error: str
    fatal: bool
    skipped: bool = optional(False)
    index: int | None = optional()
    t: float | None = optional()
    frames: tuple[int, ...] | None = optional()
    dropped_messages: tuple[DroppedMessage, ...] | None = optional()
    role: str | None = optional()
    content: str | None = optional()


# --- the source thread --------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SourceEndEvent(Event):
    type: ClassVar[str] = "source_end"
    source: str
    delivered: int


@dataclass(frozen=True, kw_only=True)
class SourceErrorEvent(Event):
    type: ClassVar[str] = "source_error"
    source: str
    error: str
    delivered: int | None = optional()


@dataclass(frozen=True, kw_only=True)
class SourceTruncatedEvent(Event):
    type: ClassVar[str] = "source_truncated"
    source: str
    error: str
    delivered: int


@dataclass(frozen=True, kw_only=True)
class FrameDroppedEvent(Event):
    """The source queue dropped its oldest frame (`dropped_total` so far)."""

    type: ClassVar[str] = "frame_dropped"
    source: str
    index: int
    dropped_total: int


@dataclass(frozen=True, kw_only=True)
class FrameUnreadableEvent(Event):
    type: ClassVar[str] = "frame_unreadable"
    source: str
    path: str


@dataclass(frozen=True, kw_only=True)
class CameraReadFailedEvent(Event):
    type: ClassVar[str] = "camera_read_failed"
    source: str
    attempt: int
    retry_in_s: float


@dataclass(frozen=True, kw_only=True)
class CameraReconnectedEvent(Event):
    type: ClassVar[str] = "camera_reconnected"
    source: str
    attempt: int


# --- the speaker thread -------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SpeechEvent(Event):
    """An utterance spoken: `ttfa_s` from its decision to the first audio sample."""

    type: ClassVar[str] = "speech"
    text: str
    t_frame: float
    reply_id: int
    ttfa_s: float
    duration_s: float
    interrupted: bool
    file: str | None


@dataclass(frozen=True, kw_only=True)
class _UtteranceLost(Event):
    text: str
    t_frame: float
    reply_id: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class SpeechCutEvent(_UtteranceLost):
    """An utterance interrupted, flushed or closed before it was spoken (`reason`)."""

    type: ClassVar[str] = "speech_cut"


@dataclass(frozen=True, kw_only=True)
class SpeechDroppedEvent(_UtteranceLost):
    """An utterance dropped because the speaker's queue was full (`reason` "queue_full")."""

    type: ClassVar[str] = "speech_dropped"


@dataclass(frozen=True, kw_only=True)
class SpeechErrorEvent(Event):
    """The voice failed on an utterance, or at warm-up (`stage` "warmup", no text)."""

    type: ClassVar[str] = "speech_error"
    stage: str | None = optional()
    text: str | None
    t_frame: float | None = optional()
    reply_id: int | None = optional()
    error: str
    error_type: str | None = optional()


# --- serialization: the one place ---------------------------------------------------------------
def _value(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        return {f.name: _value(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, tuple):
        return [_value(v) for v in x]
    return x


def to_record(event: Event) -> dict[str, Any]:
    """The event as the flat dict the log writes: type, version, t_wall, then its fields."""
    record: dict[str, Any] = {"type": event.type, "version": EVENT_VERSION}
    for f in fields(event):
        value = getattr(event, f.name)
        if f.metadata.get("omit_default") and value == f.default:
            continue
        record[f.name] = _value(value)
    return record


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays to Python, NaN and inf to None."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray | np.generic):
        return _clean(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


def to_json(event: Event) -> str:
    """One JSON line (no newline) for the event."""
    record = to_record(event)
    try:
        return json.dumps(record, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):  # numpy values, NaN: convert and try again
        return json.dumps(_clean(record), allow_nan=False, ensure_ascii=False)
