"""The live assistant: source thread -> core thread -> speaker thread, events to observers.

```
ThreadedSource (keeps newest) --frames--> core thread --Utterance--> Speaker (FIFO or interrupt)
                                              |
                                              +--events--> EventBus -> EventLog, LatencyObserver
```
Queue policies: the source keeps at most `source_capacity` frames and drops the oldest when
full (counted, `frames_dropped` events); in real time the core appends every frame that arrived
while it was busy in one step, otherwise one frame per step; injected text messages wait (at most
`max_pending_messages`, more are refused and reported) until the next step; the speaker drops
its oldest waiting utterance when full (device Speaker). Only the core thread touches the KV
memory.

In real time a lag controller (runtime/lag.py) measures every step against the deadline; with
`lag_control` it also degrades (reply cap, every k-th frame, a cheaper decoder) when the core
falls behind and recovers with hysteresis. At a stride of k the core holds at most k frames
itself before stepping them (or, in drop mode, only the newest of them: the rest are counted as
`skipped` in the run summary's `lag`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import numpy as np

from proassist_edge.errors import FrameError, SourceError
from proassist_edge.events import (
    DroppedMessage,
    ErrorEvent,
    FramesDroppedEvent,
    MessageEvent,
    StartEvent,
    StopEvent,
    UtteranceEvent,
)
from proassist_edge.runtime.core import NonFiniteOutputError, StreamCore
from proassist_edge.runtime.events import (
    EventBus,
    LatencyObserver,
    live_frame_event,
    reduction_events,
)
from proassist_edge.runtime.grabber import ThreadedSource
from proassist_edge.runtime.lag import LagOptions, LiveLag
from proassist_edge.runtime.messages import Frame, TextMessage, Utterance
from proassist_edge.runtime.source_base import FrameSource
from proassist_edge.runtime.speaker import Speaker, SpeakerMode
from proassist_edge.runtime.speech_base import SpeechSink
from proassist_edge.runtime.stream_text import SentenceSplitter

log = logging.getLogger(__name__)

ROLES = ("user", "system")


@dataclass(frozen=True)
class LoopOptions:
    realtime: bool = True  # pace replayed media like a camera (and drop when late)
    max_seconds: float | None = None  # stop after this much stream time
    speech_mode: SpeakerMode = "queue"
    source_capacity: int = 4
    speaker_capacity: int = 16
    max_pending_messages: int = 32
    drain_timeout_s: float = 10.0  # how long the speaker may finish speaking at the end
    wait_s: float = 0.25  # longest wait for a frame before the core looks at the stop flag
    min_sentence_chars: int = 8
    lag_control: bool = False  # degrade when behind (real time only); off: the lag is only measured
    lag: LagOptions = field(default_factory=LagOptions)


@dataclass
class RunSummary:
    """What one run did; `exit_code` is 0 unless a fatal error ended it."""

    frames: int = 0  # frames appended to the memory
    steps: int = 0
    dropped: int = 0  # frames the source dropped because the core was busy
    skipped: int = 0  # frames skipped after a non-finite output or a bad frame
    utterances: int = 0  # pieces sent to the speaker
    replies: int = 0
    spoken: int = 0
    speech_errors: int = 0
    stream_s: float = 0.0  # stream time of the last frame appended
    wall_s: float = 0.0
    reason: str = ""
    error: str | None = None
    event_write_errors: int = 0
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    lag: dict[str, Any] | None = None  # real time: deadline misses, seconds at each level

    @property
    def exit_code(self) -> int:
        return 1 if self.error is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_message_line(line: str) -> tuple[str, str] | None:
    """`user: ...` / `system: ...` -> (role, content); a plain line is a user message."""
    text = line.strip()
    if not text:
        return None
    head, sep, rest = text.partition(":")
    if sep and head.strip().lower() in ROLES:
        rest = rest.strip()
        return (head.strip().lower(), rest) if rest else None
    return "user", text


class _Reply:
    """Turns the reply tokens of one step into sentence pieces sent to the speaker."""

    def __init__(self, owner: Assistant, index: int, t_frame: float, reply_id: int) -> None:
        self.owner, self.index, self.t_frame, self.reply_id = owner, index, t_frame, reply_id
        self.ids: list[int] = []
        self.splitter = SentenceSplitter(owner.options.min_sentence_chars)
        self.t_first: float | None = None
        self.pieces = 0

    def on_token(self, token: int) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.ids.append(token)
        for piece in self.splitter.update(self.owner.core.pb.reply_text(self.ids)):
            self._say(piece, final=False)

    def finish(self, text: str) -> None:
        rest = self.splitter.finish(text)
        if rest:
            self._say(rest, final=True)

    def _say(self, text: str, final: bool) -> None:
        utt = Utterance(text, self.t_frame, time.monotonic(), final, self.reply_id)
        self.pieces += 1
        self.owner.say(utt, self.index)


class Assistant:
    """Runs a StreamCore on a live FrameSource and speaks through a SpeechSink; built by
    runtime/assistant.py `build_assistant` (without a source it only holds the core and bus).

    `run()` blocks until the stream ends, `stop()` is called (any thread; signal handlers), a
    `max_seconds` limit passes, or a fatal error happens; it always shuts the threads down,
    drains the speaker for at most `drain_timeout_s`, emits `stop` and returns a RunSummary.
    """

    def __init__(
        self,
        core: StreamCore,
        source: FrameSource | None,
        sink: SpeechSink | None,
        bus: EventBus,
        options: LoopOptions | None = None,
        latency: LatencyObserver | None = None,
    ) -> None:
        self.core, self.source, self.sink, self.bus = core, source, sink, bus
        self.options = options or LoopOptions()
        self.latency = latency
        self.summary = RunSummary()
        self._stop = threading.Event()
        self._messages: list[tuple[str, str]] = []
        self._msg_lock = threading.Lock()
        self._fatal: BaseException | None = None
        self._grabber: ThreadedSource | None = None
        self._speaker: Speaker | None = None
        self._core_thread: threading.Thread | None = None
        self._reported_drops = 0
        self._readers: list[IO[str]] = []
        self._started = threading.Event()
        self._lag: LiveLag | None = None  # real time only

    # --- inputs from other threads ------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to end after the current step; safe from any thread or signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def inject(self, role: str, content: str) -> None:
        """Queue a user or system message for the next step (thread-safe)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        with self._msg_lock:
            full = len(self._messages) >= self.options.max_pending_messages
            if not full:
                self._messages.append((role, content))
        if full:
            self.bus.emit(ErrorEvent(kind="message_dropped", error="too many pending messages",
                                     fatal=False, role=role, content=content))
            return
        self.bus.emit(MessageEvent(role=role, content=content, t=self.summary.stream_s))

    def read_messages(self, stream: IO[str]) -> None:
        """Inject one message per line of `stream` (`user: ...`, `system: ...`, plain = user)
        from a daemon thread, until EOF; it starts with the run (at once if already running)."""
        with self._msg_lock:
            running = self._started.is_set()
            if not running:
                self._readers.append(stream)
        if running:
            self._start_reader(stream)

    def _start_reader(self, stream: IO[str]) -> None:
        def reader() -> None:
            for line in stream:
                if self._stop.is_set():
                    return
                parsed = parse_message_line(line)
                if parsed is not None:
                    self.inject(*parsed)

        threading.Thread(target=reader, name="messages", daemon=True).start()

    def _take_messages(self, t: float) -> list[TextMessage]:
        with self._msg_lock:
            taken, self._messages = self._messages, []
        return [TextMessage(role, content, t) for role, content in taken]  # type: ignore[arg-type]

    # --- output -------------------------------------------------------------------------------
    def say(self, utt: Utterance, index: int) -> None:
        self.summary.utterances += 1
        self.bus.emit(UtteranceEvent(
            text=utt.text, t_frame=utt.t_frame, t_decided=utt.t_decided, reply_id=utt.reply_id,
            final=utt.final, index=index,
        ))
        if self._speaker is not None:
            self._speaker.say(utt)

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        if self.source is None:
            raise ValueError("this assistant has no source: step assistant.core instead")
        o = self.options
        t0 = time.monotonic()
        grabber = ThreadedSource(self.source, o.source_capacity, o.realtime, self.bus.emit)
        self._grabber = grabber
        if grabber.realtime:
            self._lag = LiveLag(self.core, self.source.fps, o.lag, o.lag_control, self.bus.emit)
        if self.sink is not None:
            self._speaker = Speaker(self.sink, o.speech_mode, o.speaker_capacity, self.bus.emit)
        self.bus.emit(StartEvent(
            source=self.source.name, sink=getattr(self.sink, "name", "none"),
            realtime=grabber.realtime, settings=asdict(self.core.s), system=self.core.system,
            knowledge=self.core.knowledge,
        ))
        try:
            grabber.start()  # opening errors (no camera, missing file) raise here
            if self._speaker is not None:
                self._speaker.start()
            with self._msg_lock:
                self._started.set()
                readers, self._readers = self._readers, []
            for stream in readers:
                self._start_reader(stream)
            self._core_thread = threading.Thread(target=self._core_main, name="core", daemon=True)
            self._core_thread.start()
            self._core_thread.join()
        except BaseException as e:  # noqa: BLE001 - recorded, cleaned up, then re-raised
            self._fatal = self._fatal or e
        finally:
            self._shutdown(t0)
        if self._fatal is not None:
            raise self._fatal
        return self.summary

    def _core_main(self) -> None:
        try:
            self.summary.reason = self._loop()
        except BaseException as e:  # noqa: BLE001 - handed to run() in the main thread
            self._fatal = e
            self.summary.reason = "error"
            self.summary.error = f"{type(e).__name__}: {e}"
            self.bus.emit(ErrorEvent(kind=type(e).__name__, error=str(e), fatal=True))

    def _loop(self) -> str:
        assert self._grabber is not None
        grabber, limit = self._grabber, self.options.max_seconds
        while not self._stop.is_set():
            try:
                batch = self._next_frames(grabber)
            except TimeoutError:
                continue
            except SourceError as e:
                self.bus.emit(ErrorEvent(kind="source", error=str(e), fatal=False))
                return "source_error"
            self._report_drops()
            if not batch:
                return "end_of_stream"
            if limit is not None:
                due = [f for f in batch if f.t < limit]
                if due:
                    self._process(due)
                if len(due) < len(batch):
                    return "max_seconds"
            else:
                self._process(batch)
        return "stopped"

    def _next_frames(self, grabber: ThreadedSource) -> list[Frame]:
        # Live: every frame that arrived while the core was busy, in one step. Not real time
        # (files, synthetic): one frame per step, nothing dropped, the same steps every run.
        if grabber.realtime and self._lag is not None:  # at the lag controller's stride
            return self._lag.next_frames(grabber, self.options.wait_s)
        if grabber.realtime:
            return grabber.get_batch(timeout=self.options.wait_s)
        frame = grabber.get(timeout=self.options.wait_s)
        return [] if frame is None else [frame]

    def _report_drops(self) -> None:
        assert self._grabber is not None
        total = self._grabber.stats.dropped
        if total > self._reported_drops:
            t = self.summary.stream_s
            self.bus.emit(FramesDroppedEvent(count=total - self._reported_drops, total=total, t=t))
            self._reported_drops = total
        self.summary.dropped = total

    def _process(self, batch: list[Frame]) -> None:
        # Frames of one step must share a size (a camera may switch resolution between them).
        run: list[Frame] = []
        for frame in batch:
            if run and frame.pixels.shape != run[0].pixels.shape:
                self._step(run)
                run = []
            run.append(frame)
        if run:
            self._step(run)

    def _step(self, frames: list[Frame]) -> None:
        assert self._grabber is not None
        last = frames[-1]
        lag = self._grabber.lag_s(last)
        messages = self._take_messages(last.t)
        reply = _Reply(self, last.index, last.t, self.summary.replies + 1)
        if self._lag is not None:
            self._lag.before_step(last.t)
        t0 = time.perf_counter()
        try:
            pixels = np.stack([f.pixels for f in frames])
            r = self.core.step(pixels, last.index, last.t, messages, on_token=reply.on_token)
        except (NonFiniteOutputError, FrameError) as e:
            self.summary.skipped += len(frames)
            self.bus.emit(ErrorEvent(
                kind=type(e).__name__, error=str(e), fatal=False, skipped=True, index=last.index,
                t=last.t, frames=tuple(f.index for f in frames),
                dropped_messages=tuple(DroppedMessage(m.role, m.content) for m in messages),
            ))
            return
        step_ms = 1e3 * (time.perf_counter() - t0)
        reply.finish(r.text)
        if reply.pieces:
            self.summary.replies += 1
        self.summary.frames += len(frames)
        self.summary.steps += 1
        self.summary.stream_s = last.t
        ttft = None if reply.t_first is None else 1e3 * (reply.t_first - t0)
        self.bus.emit(live_frame_event(r, tuple(f.index for f in frames), lag, step_ms, ttft))
        for event in reduction_events(r):
            self.bus.emit(event)
        if self._lag is not None:
            self._lag.after_step(frames, lag, t0, step_ms, len(r.token_ids), self._grabber.stats.dropped)

    def _shutdown(self, t0: float) -> None:
        o = self.options
        self._stop.set()
        if self._core_thread is not None and self._core_thread.is_alive():
            # interrupted in the main thread: let the core finish its step before closing
            self._core_thread.join(o.drain_timeout_s)
        if self._grabber is not None:
            self._grabber.close()
            self._report_drops()
        if self._speaker is not None:
            self._speaker.close(drain=True, timeout=o.drain_timeout_s)
            self.summary.spoken = self._speaker.stats.spoken
            self.summary.speech_errors = self._speaker.stats.errors
        self.summary.wall_s = time.monotonic() - t0
        if self._fatal is not None and self.summary.error is None:
            self.summary.error = f"{type(self._fatal).__name__}: {self._fatal}"
            self.summary.reason = self.summary.reason or "error"
        if self.latency is not None:
            self.summary.latency = self.latency.summary()
        if self._lag is not None:
            self.summary.lag = self._lag.close(self.summary.dropped)
        self.bus.emit(StopEvent(**self.summary.to_dict()))


def format_summary(s: RunSummary) -> str:
    """The one-screen summary printed at the end of a run."""
    lat = s.latency

    def ms(stage: str) -> str:
        d = lat.get(stage)
        if d is None:
            return "--"
        return f"p50 {d['p50']:.1f} ms, p95 {d['p95']:.1f} ms (n={d['n']:.0f})"

    fps = s.frames / s.wall_s if s.wall_s > 0 else 0.0
    lines = [
        f"ended: {s.reason}" + (f" ({s.error})" if s.error else ""),
        f"frames processed  {s.frames} in {s.steps} steps "
        f"({fps:.2f} frames/s over {s.wall_s:.1f} s)",
        f"frames dropped    {s.dropped}   skipped: {s.skipped}",
        f"stream time       {s.stream_s:.1f} s",
        f"utterances        {s.utterances} in {s.replies} replies; spoken {s.spoken}, "
        f"speech errors {s.speech_errors}",
        f"step latency      {ms('step')}",
        f"  encode          {ms('encode')}",
        f"  append+decide   {ms('append')}",
        f"  decode/token    {ms('decode')}",
        f"  first token     {ms('ttft')}",
        f"time to 1st audio {ms('ttfa')}",
    ]
    if s.lag is not None:
        lines += lag_lines(s.lag)
    if s.event_write_errors:
        lines.append(f"event log         {s.event_write_errors} write errors (events lost)")
    return "\n".join(lines)


def lag_lines(lag: dict[str, Any]) -> list[str]:
    """The run summary's lines on the deadline and the controller's levels."""
    p95 = lag["age_ms_p95"]
    levels = ", ".join(f"{k} {v:.1f} s" for k, v in lag["seconds"].items())
    return [
        f"deadline          {lag['deadline_ms']:.0f} ms: {lag['missed']} of {lag['offered']} frames "
        f"missed it ({lag['late_frames']} late, {lag['skipped']} skipped, the rest dropped); "
        f"{lag['late']} of {lag['decisions']} decisions late ({lag['late_source']} the source's)"
        + ("" if p95 is None else f", decision age p95 {p95:.0f} ms"),
        f"lag control       {'on' if lag['control'] else 'off'}: {levels}; {lag['changes']} "
        + ("change" if lag["changes"] == 1 else "changes"),
    ]
