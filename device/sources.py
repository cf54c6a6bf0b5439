"""Frame sources: synthetic pattern, video file, image folder, cameras, and `open_source`.

Every source yields `runtime.messages.Frame` (uint8 RGB, H x W x 3). Optional
packages (PyAV, OpenCV, picamera2, GStreamer's PyGObject) are imported only when a source
needs them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from proassist_edge.device.cameras import CameraSource, Picamera2Source
from proassist_edge.device.gst import GstSource, csi_pipeline, parse_csi
from proassist_edge.errors import MissingDependencyError, SourceError
from proassist_edge.events import (
    FrameUnreadableEvent,
    SourceEndEvent,
    SourceErrorEvent,
    SourceTruncatedEvent,
)
from proassist_edge.runtime.grabber import FrameGrabber, ThreadedSource
from proassist_edge.runtime.messages import Frame
from proassist_edge.runtime.source_base import EventCallback, FrameSource, SourceStats, check_pixels

__all__ = [
    "CameraSource",
    "EventCallback",
    "FileSource",
    "FolderSource",
    "FrameGrabber",
    "FrameSource",
    "GstSource",
    "Picamera2Source",
    "SourceStats",
    "SyntheticSource",
    "ThreadedSource",
    "open_source",
]

Renderer = Callable[[int], np.ndarray]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# A frame counts as "at or before" a target time within this slack: pts * time_base
# and k / fps are both floats, and 15/30 must equal 1/2.
_T_EPS = 1e-6


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:
        raise MissingDependencyError(
            "av", "Reading video files", "Install it with `pip install av`."
        ) from e
    return av


class SyntheticSource(FrameSource):
    """A deterministic moving test pattern (or any `renderer(index) -> pixels`).

    `size` is (height, width). Give `seconds` or `n_frames` for a finite stream;
    with neither it runs until closed. The same seed gives the same pixels.
    """

    name = "synthetic"

    def __init__(
        self,
        fps: float = 2.0,
        size: tuple[int, int] = (384, 384),
        seconds: float | None = None,
        n_frames: int | None = None,
        seed: int = 0,
        renderer: Renderer | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        super().__init__(fps, on_event)
        if seconds is not None and n_frames is not None:
            raise ValueError("give seconds or n_frames, not both")
        self.size = size
        self.n_frames = n_frames if seconds is None else round(seconds * self.fps)
        self.seed = seed
        self.renderer = renderer or self._pattern
        self._base: np.ndarray | None = None

    def _gradient(self) -> np.ndarray:
        # Built once: each frame is then a roll plus one square, cheap enough for 30 fps.
        h, w = self.size
        rng = np.random.default_rng(self.seed)
        c0, c1, c2 = rng.integers(0, 256, size=(3, 3)).astype(np.float32)
        x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        img = c0 * (1 - x) * (1 - y) + c1 * x + c2 * y * (1 - x)
        return np.clip(img, 0, 255).astype(np.uint8)  # (H, W, 3)

    def _pattern(self, index: int) -> np.ndarray:
        if self._base is None:
            self._base = self._gradient()
        h, w = self.size
        img = np.roll(self._base, shift=(3 * index) % w, axis=1)
        side = max(1, min(h, w) // 4)
        x = (7 * index) % max(1, w - side)
        y = (5 * index) % max(1, h - side)
        img[y : y + side, x : x + side] = (255 - 17 * index % 256, 64, 17 * index % 256)
        return img

    def frames(self) -> Iterator[Frame]:
        self.open()
        index = 0
        while self.n_frames is None or index < self.n_frames:
            pixels = check_pixels(self.renderer(index), f"{self.name} renderer")
            yield self._deliver(index, index / self.fps, pixels)
            index += 1
        self._report(SourceEndEvent(source=self.name, delivered=self.stats.delivered))


class FileSource(FrameSource):
    """Any video FFmpeg reads, decoded with PyAV and resampled to `fps` by timestamp.

    For each target time k / fps it yields the latest decoded frame whose
    presentation time is <= that time (times counted from the first frame), with
    `Frame.t` the target time. A decode error mid-file raises SourceError after
    the frames before it; a file that just stops early ends the stream and
    reports a `source_truncated` event.
    """

    def __init__(
        self, path: str | Path, fps: float = 2.0, on_event: EventCallback | None = None
    ) -> None:
        super().__init__(fps, on_event)
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self._container: Any = None

    def _open(self) -> None:
        av = _import_av()
        if not self.path.is_file():
            self._fail(f"video file {self.path} does not exist")
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as e:
            self._fail(f"cannot open {self.path} as a video ({e}); is it complete?", e)
        if not self._container.streams.video:
            self._container.close()
            self._fail(f"{self.path} has no video stream")

    def _close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _fail(self, message: str, cause: BaseException | None = None) -> NoReturn:
        self.stats.failed += 1
        self._report(SourceErrorEvent(source=self.name, error=message, delivered=self.stats.delivered))
        raise SourceError(message) from cause

    def frames(self) -> Iterator[Frame]:
        av = _import_av()
        self.open()
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or 30)
        k = 0  # next target slot
        first: float | None = None
        prev: Any = None  # latest decoded av.VideoFrame, converted only when emitted
        t_prev = 0.0
        try:
            for n, decoded in enumerate(self._container.decode(stream)):
                t_abs = decoded.time if decoded.time is not None else n / rate
                first = t_abs if first is None else first
                t = t_abs - first
                while prev is not None and k / self.fps < t - _T_EPS:
                    yield self._emit(k, prev)
                    k += 1
                prev, t_prev = decoded, t
        except (av.FFmpegError, OSError) as e:
            self._fail(
                f"decoding {self.path} failed after {self.stats.delivered} frames: {e}", e
            )
        while prev is not None and k / self.fps <= t_prev + _T_EPS:
            yield self._emit(k, prev)
            k += 1
        self._report_end(t_prev if prev is not None else None)

    def _emit(self, k: int, decoded: Any) -> Frame:
        pixels = np.ascontiguousarray(decoded.to_ndarray(format="rgb24"))
        return self._deliver(k, k / self.fps, pixels)

    def _report_end(self, t_last: float | None) -> None:
        duration = self._container.duration  # microseconds (av.time_base), or None
        expected = duration / 1e6 if duration else None
        if t_last is None or (expected is not None and t_last < expected - 0.5):
            self._report(SourceTruncatedEvent(
                source=self.name, error=f"{self.path} ended at {t_last}s of {expected}s",
                delivered=self.stats.delivered,
            ))
        self._report(SourceEndEvent(source=self.name, delivered=self.stats.delivered))


def _natural_key(path: Path) -> list[Any]:
    # frame_2.png sorts before frame_10.png, as a person reading names expects.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def _read_image(path: Path) -> np.ndarray | None:
    """RGB pixels of one image, or None when it cannot be decoded (OpenCV, else PyAV)."""
    try:
        import cv2
    except ImportError:
        return _read_image_av(path)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_image_av(path: Path) -> np.ndarray | None:
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            for decoded in container.decode(video=0):
                return np.asarray(decoded.to_ndarray(format="rgb24"))
    except (av.FFmpegError, OSError):
        return None
    return None


class FolderSource(FrameSource):
    """Images of a folder (jpg, png, bmp, webp) in natural name order, one per 1 / fps.

    An unreadable image is skipped, counted as failed and reported as an event.
    """

    def __init__(
        self, folder: str | Path, fps: float = 2.0, on_event: EventCallback | None = None
    ) -> None:
        super().__init__(fps, on_event)
        self.folder = Path(folder)
        self.name = f"folder:{self.folder}"
        self.paths: list[Path] = []

    def _open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"image folder {self.folder} does not exist")
        files = [p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise SourceError(f"{self.folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        self.paths = sorted(files, key=_natural_key)

    def frames(self) -> Iterator[Frame]:
        self.open()
        index = 0
        for path in self.paths:
            pixels = _read_image(path)
            if pixels is None:
                self.stats.failed += 1
                self._report(FrameUnreadableEvent(source=self.name, path=str(path)))
                continue
            yield self._deliver(index, index / self.fps, np.ascontiguousarray(pixels))
            index += 1
        self._report(SourceEndEvent(source=self.name, delivered=self.stats.delivered))


SPECS = (
    "synthetic, synthetic:SECONDS, file:PATH, folder:DIR, camera:N, picamera2, "
    "gst:PIPELINE (everything before the sink), csi:N[,WxH@FPS] (Jetson CSI camera)"
)


def open_source(spec: str, fps: float, on_event: EventCallback | None = None) -> FrameSource:
    """Make a source from a command-line spec (see SPECS); a bare path means file or folder.

    `synthetic` runs until closed; `synthetic:SECONDS` ends after SECONDS.
    `gst:` takes the rest of the spec as the pipeline (colons included).
    The source is returned unopened: use it as a context manager.
    """
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return SyntheticSource(fps, seconds=float(arg) if arg else None, on_event=on_event)
    if kind == "file" and arg:
        return FileSource(arg, fps, on_event)
    if kind == "folder" and arg:
        return FolderSource(arg, fps, on_event)
    if kind == "camera":
        device: int | str = int(arg) if arg.isdigit() else (arg or 0)
        return CameraSource(device, fps, on_event=on_event)
    if kind == "picamera2" and not arg:
        return Picamera2Source(fps, on_event=on_event)
    if kind == "gst":
        return GstSource(arg, fps, on_event=on_event)
    if kind == "csi":
        csi = parse_csi(arg)
        return GstSource(csi_pipeline(csi), fps, name=f"csi:{csi.sensor_id}", live=True,
                         on_event=on_event)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, fps, on_event)
    if path.is_file():
        return FileSource(path, fps, on_event)
    raise SourceError(f"unknown source {spec!r}; use one of: {SPECS}")
