"""Speaker: a thread that speaks utterances so the assistant core never waits for speech.

Queue policy, stated once: at most `capacity` utterances wait; when full, the
oldest waiting one is dropped (and reported). In `interrupt` mode a new reply
cancels the one playing and flushes everything still waiting; sentences of the
same reply (same reply_id, previous one not final) queue behind each other.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from proassist_edge.events import SpeechCutEvent, SpeechDroppedEvent, SpeechErrorEvent, SpeechEvent
from proassist_edge.runtime.messages import Utterance
from proassist_edge.runtime.source_base import EventCallback, emit
from proassist_edge.runtime.speech_base import SpeechSink

log = logging.getLogger(__name__)

SpeakerMode = Literal["queue", "interrupt"]


@dataclass
class SpeakerStats:
    """Utterances spoken, cut (interrupted or flushed), dropped (queue full), failed."""

    spoken: int = 0
    cut: int = 0
    dropped: int = 0
    errors: int = 0


@dataclass
class _Playing:
    utterance: Utterance
    cancel: threading.Event


class Speaker:
    """Speaks `Utterance`s on a background thread through a SpeechSink.

    `say()` returns at once. For each utterance it reports to `on_event` a
    SpeechEvent (text, ttfa_s, duration_s, interrupted, ...) where ttfa_s runs
    from `utt.t_decided` (time.monotonic) to the first audio sample ready or
    playing; an engine failure is reported as a SpeechErrorEvent and the speaker
    carries on with the next utterance.
    """

    def __init__(
        self,
        sink: SpeechSink,
        mode: SpeakerMode = "queue",
        capacity: int = 16,
        on_event: EventCallback | None = None,
        warmup: bool = True,
    ) -> None:
        if mode not in ("queue", "interrupt"):
            raise ValueError(f"mode must be 'queue' or 'interrupt', got {mode!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.sink, self.mode, self.capacity = sink, mode, capacity
        self.on_event = on_event
        self.stats = SpeakerStats()
        self._warmup = warmup
        self._queue: deque[Utterance] = deque()
        self._playing: _Playing | None = None
        self._last: Utterance | None = None  # most recently accepted, to group replies
        self._closing = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> Speaker:
        """Start the speaking thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="speaker", daemon=True)
            self._thread.start()
        return self

    def say(self, utterance: Utterance) -> None:
        """Queue an utterance; never blocks on speech."""
        cut: list[tuple[Utterance, str]] = []
        with self._cv:
            if self._closing:
                cut.append((utterance, "closed"))
            else:
                if self.mode == "interrupt" and self._starts_new_reply(utterance):
                    if self._playing is not None:
                        self._playing.cancel.set()
                        cut.append((self._playing.utterance, "interrupted"))
                    cut.extend((u, "flushed") for u in self._queue)
                    self._queue.clear()
                if len(self._queue) >= self.capacity:
                    cut.append((self._queue.popleft(), "queue_full"))
                self._queue.append(utterance)
                self._last = utterance
                self._cv.notify_all()
        for utt, reason in cut:
            self._report_cut(utt, reason)

    def _starts_new_reply(self, utterance: Utterance) -> bool:
        last = self._last
        return last is None or last.final or last.reply_id != utterance.reply_id

    def _report_cut(self, utterance: Utterance, reason: str) -> None:
        if reason == "queue_full":
            self.stats.dropped += 1
        else:
            self.stats.cut += 1
        level = logging.WARNING if reason == "queue_full" else logging.INFO
        log.log(level, "speech cut (%s): %r", reason, utterance.text)
        kind = SpeechDroppedEvent if reason == "queue_full" else SpeechCutEvent
        u = utterance
        emit(self.on_event, kind(text=u.text, t_frame=u.t_frame, reply_id=u.reply_id, reason=reason))

    def _run(self) -> None:
        if self._warmup:
            try:
                self.sink.warmup()
            except Exception as e:  # noqa: BLE001 - reported; each utterance will retry
                emit(self.on_event, SpeechErrorEvent(stage="warmup", text=None, error=str(e)))
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                playing = _Playing(self._queue.popleft(), threading.Event())
                self._playing = playing
            try:
                self._speak(playing)
            finally:
                with self._cv:
                    self._playing = None
                    self._cv.notify_all()

    def _speak(self, playing: _Playing) -> None:
        utt = playing.utterance
        try:
            result = self.sink.speak(utt.text, utterance=utt, cancel=playing.cancel)
        except Exception as e:  # noqa: BLE001 - one bad utterance must not silence the rest
            self.stats.errors += 1
            log.warning("speech failed for %r: %s", utt.text, e)
            emit(self.on_event, SpeechErrorEvent(
                text=utt.text, t_frame=utt.t_frame, reply_id=utt.reply_id, error=str(e),
                error_type=type(e).__name__,
            ))
            return
        self.stats.spoken += 1
        emit(self.on_event, SpeechEvent(
            text=utt.text, t_frame=utt.t_frame, reply_id=utt.reply_id,
            ttfa_s=result.t_audio_start - utt.t_decided, duration_s=result.duration_s,
            interrupted=result.interrupted or playing.cancel.is_set(), file=result.file,
        ))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or playing; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and self._playing is None, timeout)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread: after speaking what is queued (drain) or cutting it now."""
        cut: list[tuple[Utterance, str]] = []
        with self._cv:
            self._closing = True
            if not drain:
                cut.extend((u, "closed") for u in self._queue)
                self._queue.clear()
                if self._playing is not None:
                    self._playing.cancel.set()
                    cut.append((self._playing.utterance, "closed"))
            self._cv.notify_all()
        for utt, reason in cut:
            self._report_cut(utt, reason)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("speaker thread still busy after %s s", timeout)

    def __enter__(self) -> Speaker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(drain=exc is None)
