"""Frame sources and the threaded grabber: determinism, timestamps, failures, drop policy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proassist_edge.device.sources import (
    CameraSource,
    FileSource,
    FolderSource,
    FrameSource,
    Picamera2Source,
    SyntheticSource,
    ThreadedSource,
    open_source,
)
from proassist_edge.errors import FrameError, MissingDependencyError, SourceError
from proassist_edge.events import Event, to_record
from proassist_edge.runtime.messages import Frame


class Records(list[dict[str, Any]]):
    """An event callback: keeps each event as the record the event log writes."""

    def __call__(self, event: Event) -> None:
        self.append(to_record(event))


av = pytest.importorskip("av")
BITS = 7  # frame numbers up to 127 drawn as 7 stripes: robust to lossy compression


def _stripes(i: int, size: int = 64) -> np.ndarray:
    img = np.full((size, size, 3), 20, np.uint8)
    width = size // 8
    for b in range(BITS):
        if (i >> b) & 1:
            img[:, b * width : (b + 1) * width] = (230, 200 - i, 40 + i)
    img[:, BITS * width :] = (0, 0, 255)  # frame-independent blue reference stripe
    return img


def _frame_number(pixels: np.ndarray) -> int:
    width = pixels.shape[1] // 8
    bits = [pixels[:, b * width : (b + 1) * width, 0].mean() > 125 for b in range(BITS)]
    return sum(int(bit) << b for b, bit in enumerate(bits))


def _write_video(path: Path, times: list[float], fmt: str | None = None) -> Path:
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        # 1/3000 s holds both i/30 and the 0.05 s steps of the VFR clip exactly.
        stream.codec_context.time_base = Fraction(1, 3000)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(_stripes(i), format="rgb24")
            frame.pts, frame.time_base = round(t * 3000), Fraction(1, 3000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s at 30 fps, 64x64, each frame showing its number."""
    folder = tmp_path_factory.mktemp("video")
    return _write_video(folder / "clip.mp4", [i / 30 for i in range(120)])


class ListSource(FrameSource):
    """Yields `n` frames, then optionally raises; can pretend to be live."""

    name = "list"

    def __init__(self, n: int, error: Exception | None = None, live: bool = False) -> None:
        super().__init__(fps=10.0)
        self.n, self.error, self.live = n, error, live
        self.finished = threading.Event()

    def frames(self) -> Iterator[Frame]:
        for i in range(self.n):
            yield self._deliver(i, i / self.fps, np.full((4, 4, 3), i, np.uint8))
        self.finished.set()
        if self.error is not None:
            raise self.error


def test_synthetic_is_deterministic_and_moves() -> None:
    def grab(seed: int) -> list[Frame]:
        with SyntheticSource(fps=4.0, size=(48, 64), n_frames=5, seed=seed) as source:
            return list(source.frames())

    a, b, c = grab(3), grab(3), grab(4)
    assert [f.t for f in a] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0].pixels, c[0].pixels)
    assert not np.array_equal(a[0].pixels, a[1].pixels)
    assert a[0].pixels.shape == (48, 64, 3) and a[0].pixels.dtype == np.uint8


def test_synthetic_renderer_hook_and_bad_pixels() -> None:
    source = SyntheticSource(n_frames=2, renderer=lambda i: np.full((8, 8, 3), i, np.uint8))
    assert [int(f.pixels[0, 0, 0]) for f in source.frames()] == [0, 1]
    bad = SyntheticSource(n_frames=1, renderer=lambda i: np.zeros((8, 8), np.float32))
    with pytest.raises(FrameError, match="uint8"):
        list(bad.frames())


def test_file_source_resamples_by_timestamp(mp4: Path) -> None:
    events = Records()
    with FileSource(mp4, fps=2.0, on_event=events) as source:
        frames = list(source.frames())
    assert [f.t for f in frames] == [k * 0.5 for k in range(8)]
    assert [_frame_number(f.pixels) for f in frames] == [15 * k for k in range(8)]
    assert frames[0].pixels.shape == (64, 64, 3)
    assert events[-1]["type"] == "source_end" and events[-1]["delivered"] == 8


def test_file_source_non_integer_ratio(mp4: Path) -> None:
    # 1/3 s is frame 10 exactly: float timestamps must not push it to frame 9.
    with FileSource(mp4, fps=3.0) as source:
        numbers = [_frame_number(f.pixels) for f in source.frames()]
    assert numbers == [10 * k for k in range(12)]


def test_file_source_uses_pts_not_frame_index(tmp_path: Path) -> None:
    # Variable frame rate: eight frames 0.25 s apart, a gap, then 3.0 s and 3.1 s.
    times = [i * 0.25 for i in range(8)] + [3.0, 3.1]
    path = _write_video(tmp_path / "vfr.mkv", times, fmt="matroska")
    with FileSource(path, fps=2.0) as source:
        frames = list(source.frames())
    assert [f.t for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert [_frame_number(f.pixels) for f in frames] == [0, 2, 4, 6, 7, 7, 8]


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_truncated_file_ends_or_raises_without_hanging(
    mp4: Path, tmp_path: Path, suffix: str
) -> None:
    source_path = mp4
    if suffix == "mkv":
        source_path = _write_video(tmp_path / "clip.mkv", [i / 30 for i in range(120)], "matroska")
    data = source_path.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    events = Records()
    got: list[Frame] = []
    try:
        with ThreadedSource(FileSource(cut, 2.0, on_event=events), realtime=False) as grab:
            while (frame := grab.get(timeout=10)) is not None:
                got.append(frame)
    except SourceError as e:
        assert str(cut) in str(e)
        assert any(ev["type"] == "source_error" for ev in events)
    else:
        assert got and [f.t for f in got] == [k * 0.5 for k in range(len(got))]
        assert len(got) < 8
        assert any(ev["type"] == "source_truncated" for ev in events)


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        FileSource(tmp_path / "nope.mp4").open()


def test_error_reaches_consumer_after_good_frames() -> None:
    source = ListSource(3, error=SourceError("camera vanished"))
    with ThreadedSource(source, realtime=False) as grab:
        got = [grab.get(timeout=5) for _ in range(3)]
        with pytest.raises(SourceError, match="camera vanished"):
            grab.get(timeout=5)
    assert [f.index for f in got if f is not None] == [0, 1, 2]


def test_unexpected_exception_is_wrapped() -> None:
    events = Records()
    source = ListSource(1, error=RuntimeError("driver bug"))
    with ThreadedSource(source, realtime=False, on_event=events) as grab:
        assert grab.get(timeout=5) is not None
        with pytest.raises(SourceError, match="driver bug"):
            grab.get(timeout=5)
    assert events[-1]["type"] == "source_error"


def test_keep_newest_drops_oldest_and_counts() -> None:
    events = Records()
    source = ListSource(10, live=True)
    grab = ThreadedSource(source, capacity=2, on_event=events).start()
    assert source.finished.wait(5)
    assert [grab.get(timeout=5), grab.get(timeout=5)] and grab.get(timeout=5) is None
    grab.close()
    assert grab.dropped == 8 and grab.stats.dropped == 8 and grab.stats.delivered == 2
    drops = [e for e in events if e["type"] == "frame_dropped"]
    assert [e["index"] for e in drops] == list(range(8))


def test_keep_newest_keeps_the_latest_frames() -> None:
    source = ListSource(10, live=True)
    with ThreadedSource(source, capacity=3) as grab:
        assert source.finished.wait(5)
        assert [f.index for f in grab] == [7, 8, 9]


def test_replay_mode_blocks_instead_of_dropping() -> None:
    with ThreadedSource(ListSource(20), capacity=2, realtime=False) as grab:
        indices = [f.index for f in grab]
    assert indices == list(range(20)) and grab.dropped == 0


def test_get_batch_takes_everything_queued() -> None:
    source = ListSource(5, live=True)
    with ThreadedSource(source, capacity=4) as grab:
        assert source.finished.wait(5)
        assert [f.index for f in grab.get_batch(timeout=5)] == [1, 2, 3, 4]
        assert grab.get_batch(timeout=5) == []


def test_realtime_replay_is_paced() -> None:
    source = SyntheticSource(fps=20.0, size=(8, 8), n_frames=5)
    start = time.monotonic()
    with ThreadedSource(source, realtime=True) as grab:
        frames = list(grab)
        lag = grab.lag_s(frames[-1])
    elapsed = time.monotonic() - start
    assert len(frames) == 5 and elapsed >= 0.18  # frame 4 is due at 0.2 s
    assert lag is not None and lag >= 0


def test_get_times_out() -> None:
    source = SyntheticSource(fps=0.5, size=(8, 8), n_frames=3)
    with ThreadedSource(source, realtime=True) as grab:
        assert grab.get(timeout=5) is not None
        with pytest.raises(TimeoutError):
            grab.get(timeout=0.05)


class FakeCapture:
    """Stands in for cv2.VideoCapture; `script` says which reads succeed."""

    def __init__(self, script: list[bool], opens: bool = True) -> None:
        self.script, self.opens = script, opens

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opens

    def read(self) -> tuple[bool, np.ndarray | None]:
        ok = self.script.pop(0) if self.script else False
        bgr = np.zeros((4, 4, 3), np.uint8)
        bgr[..., 0] = 255  # blue in BGR
        return (True, bgr) if ok else (False, None)

    def release(self) -> None:
        pass


def test_camera_reconnects_with_backoff() -> None:
    script = [True, True, False]  # the first device fails on its third read
    captures = [FakeCapture(script), FakeCapture([], opens=False), FakeCapture([True, True])]
    events = Records()
    camera = CameraSource(
        0, fps=50.0, backoff_s=0.01, capture_factory=lambda d: captures.pop(0),
        on_event=events,
    )
    with camera:
        frames = [f for _, f in zip(range(4), camera.frames(), strict=False)]
    assert len(frames) == 4
    assert frames[0].pixels[0, 0].tolist() == [0, 0, 255]  # converted to RGB
    kinds = [e["type"] for e in events]
    assert kinds.count("camera_read_failed") == 2 and "camera_reconnected" in kinds
    delays = [e["retry_in_s"] for e in events if e["type"] == "camera_read_failed"]
    assert delays == [0.01, 0.02]


def test_camera_gives_up_after_bounded_retries() -> None:
    events = Records()
    captures = [FakeCapture([True]), FakeCapture([]), FakeCapture([], opens=False)]
    camera = CameraSource(
        0, fps=50.0, max_retries=2, backoff_s=0.01,
        capture_factory=lambda d: captures.pop(0), on_event=events,
    )
    with camera, pytest.raises(SourceError, match="gave up after 2"):
        list(camera.frames())
    assert events[-1]["type"] == "source_error"


def test_missing_camera_fails_at_open() -> None:
    with pytest.raises(SourceError, match="could not be opened"):
        CameraSource(0, capture_factory=lambda d: FakeCapture([], opens=False)).open()


def test_folder_source_natural_order_skips_bad_images(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    for i, name in [(1, "img1.png"), (2, "img2.png"), (10, "img10.png")]:
        cv2.imwrite(str(tmp_path / name), _stripes(i)[:, :, ::-1])
    (tmp_path / "img5.png").write_bytes(b"not a png")
    events = Records()
    with FolderSource(tmp_path, fps=1.0, on_event=events) as source:
        frames = list(source.frames())
    assert [_frame_number(f.pixels) for f in frames] == [1, 2, 10]
    assert [f.t for f in frames] == [0.0, 1.0, 2.0]
    assert source.stats.failed == 1 and events[0]["type"] == "frame_unreadable"


def test_open_source_specs(mp4: Path, tmp_path: Path) -> None:
    assert isinstance(open_source("synthetic", 2.0), SyntheticSource)
    finite = open_source("synthetic:1.5", 2.0)
    assert isinstance(finite, SyntheticSource) and finite.n_frames == 3
    assert isinstance(open_source(f"file:{mp4}", 2.0), FileSource)
    assert isinstance(open_source(str(mp4), 2.0), FileSource)
    assert isinstance(open_source(f"folder:{tmp_path}", 2.0), FolderSource)
    camera = open_source("camera:2", 2.0)
    assert isinstance(camera, CameraSource) and camera.device == 2
    assert isinstance(open_source("picamera2", 2.0), Picamera2Source)
    with pytest.raises(SourceError, match="unknown source"):
        open_source("webcam", 2.0)


def test_picamera2_off_pi_says_what_to_do() -> None:
    pytest.importorskip("cv2")
    try:
        import picamera2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("picamera2 is importable here")
    with pytest.raises(MissingDependencyError, match="Raspberry Pi"):
        Picamera2Source().open()


def test_close_stops_a_blocked_replay_producer() -> None:
    source = SyntheticSource(fps=2.0, size=(8, 8), n_frames=1000)
    grab = ThreadedSource(source, capacity=1, realtime=False).start()
    assert grab.get(timeout=5) is not None
    start = time.monotonic()
    grab.close()
    assert time.monotonic() - start < 2 and not source._opened


def test_close_interrupts_a_camera_backoff() -> None:
    events = Records()
    failed = threading.Event()

    def observe(event: Event) -> None:
        events(event)
        if events[-1]["type"] == "camera_read_failed":
            failed.set()

    captures = [FakeCapture([True]), FakeCapture([], opens=False)]
    camera = CameraSource(
        0, fps=50.0, backoff_s=30.0, capture_factory=lambda d: captures.pop(0),
        on_event=observe,
    )
    grab = ThreadedSource(camera).start()
    assert grab.get(timeout=5) is not None
    assert failed.wait(5)
    start = time.monotonic()
    grab.close()
    assert time.monotonic() - start < 2
    assert grab.get(timeout=1) is None  # a clean end, not an error
