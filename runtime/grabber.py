"""ThreadedSource: runs a FrameSource in its own thread behind a small bounded queue.

Drop policy, stated once: in real-time mode (always for live cameras) the
camera never waits for the model, so a full queue drops its *oldest* frame and
counts it (keep-newest). In replay mode (`realtime=False`, files and synthetic
only) the grabber blocks instead, so no frame is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType

from proassist_edge.errors import SourceError
from proassist_edge.events import FrameDroppedEvent, SourceErrorEvent
from proassist_edge.runtime.messages import Frame
from proassist_edge.runtime.source_base import EventCallback, FrameSource, Pacer, SourceStats, emit

log = logging.getLogger(__name__)


class ThreadedSource:
    """Capture in a background thread; the consumer calls `get()`.

    `get()` returns the next Frame, None once the stream has ended, and raises
    the source's SourceError after the frames that came before the failure.
    With `realtime=True` replayed media is paced by `Frame.t` on the monotonic
    clock, like a camera; live sources pace themselves and always drop.
    """

    def __init__(
        self,
        source: FrameSource,
        capacity: int = 4,
        realtime: bool = True,
        on_event: EventCallback | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.source = source
        self.capacity = capacity
        self.realtime = realtime or source.live
        self.on_event = on_event
        self.dropped = 0
        self.delivered = 0
        self._buffer: deque[Frame] = deque()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._done = False
        self._error: SourceError | None = None
        self._pacer: Pacer | None = None
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def stats(self) -> SourceStats:
        """Frames handed to the consumer, frames dropped (queue + source), failed reads."""
        s = self.source.stats
        return SourceStats(self.delivered, self.dropped + s.dropped, s.failed)

    @property
    def clock_origin(self) -> float | None:
        """`time.monotonic()` value of Frame.t == 0, or None in replay mode."""
        if self.source.live:
            return self.source.t0
        return self._pacer.t0 if self._pacer is not None else None

    def lag_s(self, frame: Frame) -> float | None:
        """Seconds between the frame's capture (or due) time and now."""
        origin = self.clock_origin
        return None if origin is None else time.monotonic() - (origin + frame.t)

    def start(self) -> ThreadedSource:
        """Open the source here (so opening errors raise at once) and start capturing."""
        if self._thread is None:
            self.source.open()
            self._thread = threading.Thread(
                target=self._run, name=f"grab-{self.source.name}", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        if self.realtime and not self.source.live:
            self._pacer = Pacer(self.source.fps, self._stop)
        frames = self.source.frames()
        try:
            for frame in frames:
                if self._pacer is not None:
                    if self._pacer.t0 is None:
                        self._pacer.start()  # Frame.t == 0 is "now": the first frame is due
                    if not self._pacer.wait_until(frame.t):
                        break
                if self._stop.is_set() or not self._put(frame):
                    break
        except SourceError as e:
            self._finish(e)
        except Exception as e:  # noqa: BLE001 - any source bug must reach the consumer
            log.exception("source %s crashed", self.source.name)
            error = SourceError(f"{self.source.name} failed: {type(e).__name__}: {e}")
            error.__cause__ = e
            emit(self.on_event, SourceErrorEvent(source=self.name, error=str(e)))
            self._finish(error)
        finally:
            close = getattr(frames, "close", None)  # generators: run their cleanup here
            if close is not None:
                close()
            self.source.close()
            self._finish(None)

    def _finish(self, error: SourceError | None) -> None:
        with self._cv:
            if error is not None and self._error is None:
                self._error = error
            self._done = True
            self._cv.notify_all()

    def _put(self, frame: Frame) -> bool:
        """Queue one frame by the drop policy; False when closing."""
        dropped: Frame | None = None
        with self._cv:
            if not self.realtime:
                while len(self._buffer) >= self.capacity and not self._stop.is_set():
                    self._cv.wait()
                if self._stop.is_set():
                    return False
            elif len(self._buffer) >= self.capacity:
                dropped = self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(frame)
            self._cv.notify_all()
        if dropped is not None:
            event = FrameDroppedEvent(source=self.name, index=dropped.index, dropped_total=self.dropped)
            emit(self.on_event, event)
        return True

    def get(self, timeout: float | None = None) -> Frame | None:
        """Next frame; None at end of stream; raises SourceError, or TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._buffer and not self._done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no frame from {self.name} within {timeout} s")
                self._cv.wait(remaining)
            if self._buffer:
                self.delivered += 1
                frame = self._buffer.popleft()
                self._cv.notify_all()  # a blocked replay producer may continue
                return frame
            if self._error is not None:
                raise self._error
            return None

    def get_batch(self, timeout: float | None = None) -> list[Frame]:
        """Wait for one frame, then take every frame already queued; [] at end of stream.

        This is how the core appends frames that arrived while it was busy.
        """
        first = self.get(timeout)
        if first is None:
            return []
        batch = [first]
        with self._cv:
            while self._buffer:
                batch.append(self._buffer.popleft())
            self.delivered += len(batch) - 1
            self._cv.notify_all()
        return batch

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.get()) is not None:
            yield frame

    def close(self, timeout: float = 5.0) -> None:
        """Stop capturing and release the source; returns within about `timeout`."""
        self._stop.set()
        self.source.interrupt()
        with self._cv:
            self._cv.notify_all()
        if self._thread is None:
            self.source.close()
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            # A driver stuck inside a read: the daemon thread is abandoned, not waited on.
            log.warning("capture thread of %s did not stop within %.1f s", self.name, timeout)

    def __enter__(self) -> ThreadedSource:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


FrameGrabber = ThreadedSource
