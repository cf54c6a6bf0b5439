"""The frame-source interface every camera, file and test pattern implements."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from proassist_edge.errors import FrameError
from proassist_edge.events import Event
from proassist_edge.runtime.messages import Frame

log = logging.getLogger(__name__)

EventCallback = Callable[[Event], None]


def emit(callback: EventCallback | None, event: Event) -> None:
    """Send `event` to an observer; a failing observer is logged, never propagated.

    Observers run inside capture and speech threads: an exception there would
    kill the stage it is only meant to watch.
    """
    if callback is None:
        return
    try:
        callback(event)
    except Exception:  # noqa: BLE001 - see docstring: an observer must not kill a stage
        log.exception("event observer failed on %s", event.type)


@dataclass
class SourceStats:
    """Counters of one source: frames delivered, frames dropped, reads that failed."""

    delivered: int = 0
    dropped: int = 0
    failed: int = 0


def check_pixels(pixels: np.ndarray, what: str) -> np.ndarray:
    """Return `pixels` as a contiguous uint8 (H, W, 3) array or raise FrameError."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        got = getattr(pixels, "dtype", type(pixels).__name__)
        raise FrameError(f"{what} gave pixels of type {got}; frames must be uint8 RGB (H, W, 3)")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise FrameError(f"{what} gave pixels of shape {pixels.shape}; frames must be (H, W, 3)")
    return np.ascontiguousarray(pixels)


class FrameSource(ABC):
    """A stream of RGB frames.

    Use as a context manager and iterate `frames()`. `live` sources (cameras) are
    clocked by the world and pace themselves; the others (file, folder, synthetic)
    can be replayed as fast as the consumer wants, with `Frame.t` the media time.
    Failures raise SourceError and are reported to `on_event` first.
    """

    name: str = "source"
    live: bool = False

    def __init__(self, fps: float, on_event: EventCallback | None = None) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = float(fps)
        self.on_event = on_event
        self.stats = SourceStats()
        # Monotonic time of Frame.t == 0 for live sources (None for replayed media).
        self.t0: float | None = None
        self._opened = False
        # Set by `interrupt()` from another thread to cut retry backoffs and pacing waits.
        self._stop = threading.Event()

    def open(self) -> None:
        """Acquire the device or file. Called by `__enter__`; idempotent."""
        if not self._opened:
            self._open()
            self._opened = True

    def close(self) -> None:
        """Release the device or file; idempotent."""
        if self._opened:
            self._opened = False
            self._close()

    def interrupt(self) -> None:
        """Ask a running `frames()` to stop soon; safe to call from any thread."""
        self._stop.set()

    def _open(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Hook: acquire resources."""

    def _close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Hook: release resources."""

    @abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Yield frames in order until the stream ends; raise SourceError on failure."""

    def __enter__(self) -> FrameSource:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _report(self, event: Event) -> None:
        emit(self.on_event, event)

    def _deliver(self, index: int, t: float, pixels: np.ndarray) -> Frame:
        self.stats.delivered += 1
        return Frame(index=index, t=t, pixels=pixels)


class Pacer:
    """Sleeps until each frame's due time on the monotonic clock.

    Waiting on an Event (not sleep) lets `stop` interrupt a long wait at once.
    """

    def __init__(self, fps: float, stop: threading.Event) -> None:
        self.period = 1.0 / fps
        self.stop = stop
        self.t0: float | None = None

    def start(self) -> float:
        self.t0 = time.monotonic()
        return self.t0

    def wait_until(self, t_rel: float) -> bool:
        """Wait until t0 + t_rel; return False when stopped meanwhile."""
        if self.t0 is None:
            self.start()
        assert self.t0 is not None
        delay = self.t0 + t_rel - time.monotonic()
        if delay > 0:
            return not self.stop.wait(delay)
        return not self.stop.is_set()

    def slots_missed(self, next_slot: int) -> int:
        """How many due slots from `next_slot` on are already in the past."""
        assert self.t0 is not None
        now_slot = int((time.monotonic() - self.t0) / self.period)
        return max(0, now_slot - next_slot)
