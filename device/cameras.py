"""Live cameras: V4L2 (and anything else OpenCV opens) and the Raspberry Pi camera.

Both pace themselves to the target fps on the monotonic clock and stamp each
frame with its capture time, seconds after `t0` (a `time.monotonic()` value).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from proassist_edge.errors import MissingDependencyError, SourceError
from proassist_edge.events import (
    CameraReadFailedEvent,
    CameraReconnectedEvent,
    SourceEndEvent,
    SourceErrorEvent,
)
from proassist_edge.runtime.messages import Frame
from proassist_edge.runtime.source_base import EventCallback, FrameSource, Pacer

CaptureFactory = Callable[[int | str], Any]


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise MissingDependencyError(
            "opencv-python-headless",
            "The V4L2 camera source",
            "Install it with `pip install opencv-python-headless`.",
        ) from e
    return cv2


class CameraSource(FrameSource):
    """A V4L2 / USB camera via `cv2.VideoCapture`, delivered as RGB at `fps`.

    When reads fail (cable pulled, driver reset) it releases the device, waits
    `backoff_s * 2**k` (capped at `max_backoff_s`) and reopens, up to
    `max_retries` consecutive failures; then it raises SourceError. Each failure
    and reconnect is reported to `on_event`. `size` is (height, width), a request
    the driver may round. `capture_factory` replaces `cv2.VideoCapture` (tests).
    """

    live = True

    def __init__(
        self,
        device: int | str = 0,
        fps: float = 2.0,
        size: tuple[int, int] | None = None,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        capture_factory: CaptureFactory | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        super().__init__(fps, on_event)
        self.device = device
        self.name = f"camera:{device}"
        self.size = size
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._factory = capture_factory
        self._cap: Any = None

    def _connect(self) -> Any:
        """A configured capture, or None when the device does not open."""
        if self._factory is None:
            cv2 = _import_cv2()
            cap = cv2.VideoCapture(self.device)
        else:
            cap = self._factory(self.device)
        if not cap.isOpened():
            cap.release()
            return None
        if self._factory is None:
            cv2 = _import_cv2()
            # One buffered frame: reading at 2 fps from a 30 fps camera must not
            # return frames that waited in the driver queue.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if self.size is not None:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[0])
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[1])
        return cap

    def _open(self) -> None:
        self._stop.clear()
        self._cap = self._connect()
        if self._cap is None:
            self.stats.failed += 1
            message = (
                f"camera {self.device!r} could not be opened: check `ls /dev/video*` and "
                "`v4l2-ctl --list-devices`, or use --source file:PATH / synthetic"
            )
            self._report(SourceErrorEvent(source=self.name, error=message))
            raise SourceError(message)

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _to_rgb(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.shape[2] == 4:
            image = image[:, :, :3]
        return np.ascontiguousarray(image[:, :, ::-1])  # OpenCV gives BGR

    def _read(self) -> np.ndarray | None:
        """One RGB frame, reconnecting on failure; None when interrupted."""
        failures = 0
        while not self._stop.is_set():
            if self._cap is not None:
                ok, image = self._cap.read()
                if ok and image is not None:
                    return self._to_rgb(image)
            self.stats.failed += 1
            failures += 1
            if failures > self.max_retries:
                message = (
                    f"camera {self.device!r} stopped delivering frames; gave up after "
                    f"{self.max_retries} reconnect attempts (check the cable and "
                    "`v4l2-ctl --list-devices`)"
                )
                self._report(SourceErrorEvent(
                    source=self.name, error=message, delivered=self.stats.delivered
                ))
                raise SourceError(message)
            delay = min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)
            self._report(CameraReadFailedEvent(source=self.name, attempt=failures, retry_in_s=delay))
            if self._cap is not None:
                self._cap.release()
                self._cap = None
            if self._stop.wait(delay):
                return None
            self._cap = self._connect()
            if self._cap is not None:
                self._report(CameraReconnectedEvent(source=self.name, attempt=failures))
        return None

    def frames(self) -> Iterator[Frame]:
        self.open()
        pacer = Pacer(self.fps, self._stop)
        self.t0 = pacer.start()
        slot = index = 0
        while pacer.wait_until(slot * pacer.period):
            pixels = self._read()
            if pixels is None:
                break
            yield self._deliver(index, time.monotonic() - self.t0, pixels)
            index += 1
            slot += 1
            # A slow read (reconnect, slow USB) loses the slots it overran: count them.
            missed = pacer.slots_missed(slot)
            self.stats.dropped += missed
            slot += missed
        self._report(SourceEndEvent(source=self.name, delivered=self.stats.delivered))


class Picamera2Source(FrameSource):
    """The Raspberry Pi camera via picamera2 (libcamera); `size` is (height, width).

    picamera2 exists only on Raspberry Pi OS: elsewhere opening it raises
    MissingDependencyError saying what to use instead.
    """

    name = "picamera2"
    live = True

    def __init__(
        self,
        fps: float = 2.0,
        size: tuple[int, int] = (480, 640),
        on_event: EventCallback | None = None,
    ) -> None:
        super().__init__(fps, on_event)
        self.size = size
        self._camera: Any = None

    def _open(self) -> None:
        self._stop.clear()
        try:
            from picamera2 import Picamera2
        except ImportError as e:
            raise MissingDependencyError(
                "picamera2",
                "The Raspberry Pi camera source",
                "It works only on Raspberry Pi OS with libcamera (`sudo apt install "
                "python3-picamera2`); on other boards use --source camera:0 (V4L2).",
            ) from e
        try:
            camera = Picamera2()
            h, w = self.size
            # libcamera's "RGB888" is B, G, R in memory; frames() flips it.
            config = camera.create_video_configuration(main={"size": (w, h), "format": "RGB888"})
            camera.configure(config)
            camera.start()
        except (RuntimeError, IndexError, OSError) as e:
            message = f"picamera2 found no usable camera ({e}); check the ribbon cable"
            self._report(SourceErrorEvent(source=self.name, error=message))
            raise SourceError(message) from e
        self._camera = camera

    def _close(self) -> None:
        if self._camera is not None:
            self._camera.stop()
            self._camera.close()
            self._camera = None

    def frames(self) -> Iterator[Frame]:
        self.open()
        pacer = Pacer(self.fps, self._stop)
        self.t0 = pacer.start()
        slot = index = 0
        while pacer.wait_until(slot * pacer.period):
            try:
                array = self._camera.capture_array("main")
            except (RuntimeError, OSError) as e:
                self.stats.failed += 1
                message = f"picamera2 capture failed after {index} frames: {e}"
                self._report(SourceErrorEvent(
                    source=self.name, error=message, delivered=self.stats.delivered
                ))
                raise SourceError(message) from e
            pixels = np.ascontiguousarray(array[:, :, 2::-1])
            yield self._deliver(index, time.monotonic() - self.t0, pixels)
            index += 1
            slot += 1
            missed = pacer.slots_missed(slot)
            self.stats.dropped += missed
            slot += missed
        self._report(SourceEndEvent(source=self.name, delivered=self.stats.delivered))
