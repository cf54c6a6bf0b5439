"""GStreamer sources: `gst:PIPELINE` and the Jetson CSI camera `csi:N[,WxH@FPS]`.

The user's pipeline is everything before the sink; the source appends the rate
conversion to the target fps, the conversion to RGB and an `appsink`, and pulls
samples into numpy frames. GStreamer and PyGObject are imported only when a
source opens (`import_gst`), with a MissingDependencyError that says how to
install them.

Live pipelines (cameras: the source element does not preroll) keep only the
newest frame, stamp it with its capture time and, when the camera errors or
stops delivering, tear the pipeline down and rebuild it with a backoff, as
`CameraSource` does. Other pipelines (test patterns, files) deliver every frame
with its media time and end at EOS; an error there ends the stream.
"""

from __future__ import annotations

import ctypes
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from proassist_edge.errors import MissingDependencyError, SourceError
from proassist_edge.events import (
    CameraReadFailedEvent,
    CameraReconnectedEvent,
    SourceEndEvent,
    SourceErrorEvent,
)
from proassist_edge.runtime.messages import Frame
from proassist_edge.runtime.source_base import EventCallback, FrameSource

SINK_NAME = "proassist_sink"
APT_PACKAGES = (
    "gstreamer1.0-tools gstreamer1.0-plugins-base gir1.2-gstreamer-1.0 "
    "gir1.2-gst-plugins-base-1.0 libgirepository1.0-dev libcairo2-dev"
)
INSTALL = (
    f"Install GStreamer with `sudo apt install {APT_PACKAGES}`, then PyGObject with "
    "`pip install 'proassist-edge[gst]'` (or run scripts/install.sh, which does both)."
)
# Which package brings an element, for the message when one is missing.
ELEMENT_PACKAGES = {
    "nvarguscamerasrc": "the Jetson CSI camera: comes with JetPack (`sudo apt install "
    "nvidia-l4t-gstreamer`); it exists only on Jetson boards",
    "nvvidconv": "comes with JetPack (`sudo apt install nvidia-l4t-gstreamer`); only on Jetson",
    "v4l2src": "`sudo apt install gstreamer1.0-plugins-good`",
    "videotestsrc": "`sudo apt install gstreamer1.0-plugins-base`",
    "videoconvert": "`sudo apt install gstreamer1.0-plugins-base`",
    "videorate": "`sudo apt install gstreamer1.0-plugins-base`",
    "appsink": "`sudo apt install gstreamer1.0-plugins-base`",
}
# Element factories `doctor` looks for.
PROBED_ELEMENTS = ("appsink", "videoconvert", "videorate", "videotestsrc", "v4l2src",
                   "nvarguscamerasrc", "nvvidconv")
_LIVE_ELEMENTS = ("nvarguscamerasrc", "v4l2src", "libcamerasrc", "rtspsrc", "udpsrc",
                  "ksvideosrc", "avfvideosrc", "ximagesrc")


class GstPipelineError(SourceError):
    """A `gst:` pipeline does not parse, link or start."""


class GstElementMissingError(GstPipelineError):
    """A pipeline names an element that no installed GStreamer plugin provides."""

    def __init__(self, element: str, pipeline: str) -> None:
        where = ELEMENT_PACKAGES.get(element, "find its plugin with `gst-inspect-1.0 | grep -i "
                                     f"{element}` on a machine that has it")
        super().__init__(f"GStreamer has no element {element!r} here (pipeline: {pipeline!r}); "
                         f"it comes from: {where}. `gst-inspect-1.0 {element}` checks it.")
        self.element = element


_gst: Any = None


def _keep_gcc_unwinder() -> None:
    """Put libgcc_s in the global symbol scope before GStreamer arrives.

    Debian's libgstreamer links libunwind, and GModule loads it globally: a C++
    extension loaded afterwards (onnx, seen in a test process that exported a
    bundle after opening a gst source) then resolved `_Unwind_Resume` to
    libunwind's, and its first caught C++ exception aborted the process.
    """
    try:
        ctypes.CDLL("libgcc_s.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:  # not glibc/gcc (musl, macOS): nothing to protect
        pass


def import_gst() -> Any:
    """`gi.repository.Gst`, initialized; MissingDependencyError saying how to install it."""
    global _gst
    if _gst is not None:
        return _gst
    _keep_gcc_unwinder()
    try:
        import gi
    except ImportError as e:
        raise MissingDependencyError("PyGObject", "The GStreamer source (gst:, csi:)", INSTALL) from e
    try:
        gi.require_version("Gst", "1.0")
        from gi.repository import Gst
    except (ValueError, ImportError) as e:  # ValueError: no Gst typelib (gir1.2-gstreamer-1.0)
        raise MissingDependencyError(
            "GStreamer (gir1.2-gstreamer-1.0)", "The GStreamer source (gst:, csi:)", INSTALL
        ) from e
    Gst.init(None)
    _gst = Gst
    return Gst


# --- specs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CsiSpec:
    """A Jetson CSI camera: Argus sensor id and the sensor mode asked for."""

    sensor_id: int = 0
    width: int = 1920  # 1920x1080@30 is a mode of both IMX219 and IMX477
    height: int = 1080
    fps: Fraction = field(default_factory=lambda: Fraction(30))


_CSI_MODE = re.compile(r"^(\d+)x(\d+)@(\d+(?:\.\d+)?)$")


def parse_csi(arg: str) -> CsiSpec:
    """'' / 'N' / 'N,WxH@FPS' (the part after `csi:`) -> CsiSpec; SourceError when malformed."""
    sensor, _, mode = arg.strip().partition(",")
    usage = f"csi:{arg} is not a CSI camera spec: use csi:N or csi:N,WxH@FPS, e.g. csi:0,1280x720@60"
    if sensor and not sensor.isdigit():
        raise SourceError(usage)
    spec = CsiSpec(sensor_id=int(sensor or 0))
    if not mode:
        return spec
    m = _CSI_MODE.match(mode.strip())
    if m is None:
        raise SourceError(usage)
    width, height, fps = int(m.group(1)), int(m.group(2)), Fraction(m.group(3))
    if width <= 0 or height <= 0 or fps <= 0:
        raise SourceError(usage)
    return CsiSpec(spec.sensor_id, width, height, fps)


def caps_rate(fps: float | Fraction) -> str:
    """A GStreamer framerate fraction: 2.0 -> '2/1', 29.97 -> '2997/100'."""
    f = Fraction(fps).limit_denominator(1001)
    return f"{f.numerator}/{f.denominator}"


def csi_pipeline(spec: CsiSpec) -> str:
    """The Argus pipeline up to system-memory BGRx; the source adds the RGB conversion and sink."""
    return (
        f"nvarguscamerasrc sensor-id={spec.sensor_id} ! "
        f"video/x-raw(memory:NVMM),width={spec.width},height={spec.height},"
        f"framerate={caps_rate(spec.fps)} ! nvvidconv ! video/x-raw,format=BGRx"
    )


def sink_tail(fps: float) -> str:
    """What the source appends to a pipeline: rate to `fps` first (so only the kept frames are
    converted), then RGB, then the appsink it pulls from."""
    return (
        f"videorate ! video/x-raw,framerate={caps_rate(fps)} ! videoconvert ! "
        f"video/x-raw,format=RGB ! appsink name={SINK_NAME} max-buffers=2 sync=false"
    )


def looks_live(pipeline: str) -> bool:
    """A guess before opening (the pipeline's preroll decides once open): camera elements or
    `is-live=true` mean live."""
    first = pipeline.split("!")[0].split()
    return (bool(first) and first[0] in _LIVE_ELEMENTS) or "is-live=true" in pipeline.replace(" ", "")


def sample_pixels(sample: Any) -> np.ndarray:
    """An RGB appsink sample -> (H, W, 3) uint8; GStreamer pads each row to 4 bytes."""
    s = sample.get_caps().get_structure(0)
    width, height = int(s.get_value("width")), int(s.get_value("height"))
    buf = sample.get_buffer()
    data = np.frombuffer(buf.extract_dup(0, buf.get_size()), np.uint8)
    stride = data.size // height
    if stride < width * 3:
        raise SourceError(f"GStreamer gave {data.size} bytes for a {width}x{height} RGB frame")
    rows = data[: stride * height].reshape(height, stride)
    return np.ascontiguousarray(rows[:, : width * 3].reshape(height, width, 3))


# --- the source -------------------------------------------------------------------------------
class GstSource(FrameSource):
    """Frames from a GStreamer pipeline, delivered as RGB at `fps`.

    `pipeline` is everything before the sink (`videotestsrc ! videoconvert`).
    `live` is guessed from the pipeline until it opens, then read from GStreamer
    (a live source does not preroll). A live pipeline that errors, or sends no
    frame for `stall_s` seconds, is rebuilt after `backoff_s * 2**k` (capped at
    `max_backoff_s`), up to `max_retries` consecutive failures; then SourceError.
    """

    def __init__(
        self,
        pipeline: str,
        fps: float = 2.0,
        name: str | None = None,
        live: bool | None = None,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        stall_s: float | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        super().__init__(fps, on_event)
        self.pipeline = pipeline.strip().rstrip("!").strip()
        if not self.pipeline:
            raise SourceError("gst: needs a pipeline, e.g. gst:videotestsrc ! videoconvert "
                              "(everything before the sink)")
        self.name = name or f"gst:{self.pipeline}"
        self.live = looks_live(self.pipeline) if live is None else live
        self.launch = f"{self.pipeline} ! {sink_tail(self.fps)}"
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stall_s = stall_s if stall_s is not None else max(5.0, 4.0 / self.fps)
        self._pipe: Any = None
        self._sink: Any = None
        self._offset = 0.0  # time.monotonic() - pipeline clock, seconds

    # -- lifecycle --
    def _open(self) -> None:
        self._stop.clear()
        try:
            self._start()
        except GstPipelineError as e:
            self.stats.failed += 1
            self._report(SourceErrorEvent(source=self.name, error=str(e)))
            raise
        if self.live:
            self.t0 = self._monotonic(0)

    def _close(self) -> None:
        self._stop_pipeline()

    def _start(self) -> None:
        """Parse, preroll (or learn that it is live) and play; typed errors on failure."""
        Gst = import_gst()
        from gi.repository import GLib

        try:
            pipe = Gst.parse_launch(self.launch)
        except GLib.Error as e:
            raise self._parse_error(e) from e
        self._pipe, self._sink = pipe, pipe.get_by_name(SINK_NAME)
        ret = pipe.set_state(Gst.State.PAUSED)
        if ret == Gst.StateChangeReturn.ASYNC:
            ret, _, _ = pipe.get_state(10 * Gst.SECOND)
        if ret == Gst.StateChangeReturn.FAILURE:
            raise self._start_error()
        self.live = ret == Gst.StateChangeReturn.NO_PREROLL
        if self.live:  # a camera never waits for us: keep the newest frame only
            self._sink.set_property("drop", True)
            self._sink.set_property("max-buffers", 1)
        if pipe.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            raise self._start_error()
        clock = pipe.get_clock()
        self._offset = time.monotonic() - clock.get_time() / 1e9 if clock is not None else 0.0

    def _stop_pipeline(self) -> None:
        if self._pipe is not None:
            self._pipe.set_state(import_gst().State.NULL)
            self._pipe = self._sink = None

    # -- errors --
    def _parse_error(self, e: Any) -> GstPipelineError:
        Gst = import_gst()
        if e.matches(Gst.ParseError.quark(), Gst.ParseError.NO_SUCH_ELEMENT):
            m = re.search(r'no element "([^"]+)"', e.message)
            return GstElementMissingError(m.group(1) if m else e.message, self.pipeline)
        return GstPipelineError(
            f"GStreamer cannot build the pipeline {self.pipeline!r}: {e.message}. Check it with "
            f"`gst-launch-1.0 {self.pipeline} ! fakesink` (elements joined by '!', properties "
            "as name=value)"
        )

    def _bus_error(self) -> str | None:
        """The first ERROR message waiting on the bus, as text, or None."""
        Gst = import_gst()
        if self._pipe is None:
            return None
        msg = self._pipe.get_bus().pop_filtered(Gst.MessageType.ERROR)
        if msg is None:
            return None
        err, debug = msg.parse_error()
        src = msg.src.get_name() if msg.src is not None else "?"
        # debug is "file.c(line): function (): /element path:\nreason"; only the reason helps.
        lines = (debug or "").strip().splitlines()
        return f"{src}: {err.message}" + (f" ({lines[-1].strip()})" if len(lines) > 1 else "")

    def _start_error(self) -> GstPipelineError:
        why = self._bus_error() or "no message from GStreamer"
        self._stop_pipeline()
        hint = ("check the ribbon cable and `sudo systemctl restart nvargus-daemon`"
                if "nvarguscamerasrc" in self.pipeline else
                "check the device with `v4l2-ctl --list-devices`" if "v4l2src" in self.pipeline
                else "a device may be missing or busy")
        return GstPipelineError(
            f"{self.name} could not start: {why}; {hint}, and try "
            f"`gst-launch-1.0 {self.pipeline} ! fakesink`"
        )

    def _fail(self, message: str) -> NoReturn:
        self._report(SourceErrorEvent(source=self.name, error=message, delivered=self.stats.delivered))
        raise SourceError(message)

    # -- frames --
    def _pull(self) -> Any:
        """The next sample; None at EOS or when interrupted; raises _Broken on an error or
        (live) a stall."""
        Gst = import_gst()
        deadline = time.monotonic() + self.stall_s
        while not self._stop.is_set():
            # A bounded blocking pull, so interrupt() and bus errors are seen within 0.2 s.
            sample = self._sink.emit("try-pull-sample", int(0.2 * Gst.SECOND))
            if sample is not None:
                return sample
            error = self._bus_error()
            if error is not None:
                raise _Broken(error)
            if self._sink.get_property("eos"):
                return None
            if self.live and time.monotonic() >= deadline:
                raise _Broken(f"no frame for {self.stall_s:.1f} s")
        return None

    def _time(self, sample: Any) -> float:
        buf, segment = sample.get_buffer(), sample.get_segment()
        Gst = import_gst()
        if buf.pts == Gst.CLOCK_TIME_NONE:
            return time.monotonic() - self.t0 if self.live and self.t0 is not None else 0.0
        running = segment.to_running_time(Gst.Format.TIME, buf.pts) / 1e9
        if not self.live:
            return float(running)
        return self._monotonic(running) - (self.t0 or 0.0)

    def _monotonic(self, running_s: float) -> float:
        """time.monotonic() at a running time of the current pipeline."""
        return self._offset + (self._pipe.get_base_time() / 1e9 if self._pipe else 0.0) + running_s

    def _reconnect(self, failures: int, why: str) -> bool:
        """Rebuild a broken live pipeline after a backoff; False when interrupted."""
        self.stats.failed += 1
        if failures > self.max_retries:
            self._fail(f"{self.name} stopped delivering frames ({why}); gave up after "
                       f"{self.max_retries} reconnect attempts (check the camera and its cable)")
        delay = min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)
        self._report(CameraReadFailedEvent(source=self.name, attempt=failures, retry_in_s=delay))
        self._stop_pipeline()
        if self._stop.wait(delay):
            return False
        try:
            self._start()
        except GstPipelineError:
            return True  # still gone: the next pull finds no pipeline and counts another failure
        self._report(CameraReconnectedEvent(source=self.name, attempt=failures))
        return True

    def frames(self) -> Iterator[Frame]:
        self.open()
        index = failures = 0
        last_slot: int | None = None
        while not self._stop.is_set():
            try:
                if self._pipe is None:
                    raise _Broken("the pipeline did not restart")
                sample = self._pull()
            except _Broken as e:
                if not self.live:
                    self.stats.failed += 1
                    self._fail(f"{self.name} failed after {self.stats.delivered} frames: {e}")
                failures += 1
                if not self._reconnect(failures, str(e)):
                    break
                continue
            if sample is None:
                break
            failures = 0
            t = self._time(sample)
            if self.live:  # frames the appsink dropped, or lost while reconnecting
                slot = round(t * self.fps)
                if last_slot is not None:
                    self.stats.dropped += max(0, slot - last_slot - 1)
                last_slot = slot
            yield self._deliver(index, max(t, 0.0), sample_pixels(sample))
            index += 1
        self._report(SourceEndEvent(source=self.name, delivered=self.stats.delivered))


class _Broken(Exception):
    """A pipeline error or stall inside `frames()`; never leaves this module."""


# --- what is installed (doctor) ------------------------------------------------------------------
@dataclass(frozen=True)
class GstFacts:
    """GStreamer on this machine: importable, its version, which elements exist."""

    available: bool
    version: str = ""
    why: str = ""
    elements: dict[str, bool] = field(default_factory=dict)


def probe_gst() -> GstFacts:
    """What `doctor` reports; never raises."""
    try:
        Gst = import_gst()
    except MissingDependencyError as e:
        cause = e.__cause__
        return GstFacts(False, why=f"{type(cause).__name__}: {cause}" if cause else str(e))
    elements = {name: Gst.ElementFactory.find(name) is not None for name in PROBED_ELEMENTS}
    return GstFacts(True, Gst.version_string(), elements=elements)


def csi_sensors(root: Path = Path("/")) -> list[int]:
    """Argus sensor ids of the CSI cameras: the V4L2 devices whose name is a Jetson VI output,
    in device order."""
    names = []
    for dev in sorted((root / "sys/class/video4linux").glob("video*"),
                      key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else 0):
        try:
            names.append((dev / "name").read_text(errors="replace").strip())
        except OSError:
            continue
    return [i for i, name in enumerate(n for n in names if n.startswith("vi-output"))]


def camera_specs(facts: GstFacts, root: Path = Path("/"), opencv: bool = False,
                 picamera2: bool = False) -> list[str]:
    """The `--source` specs that should work here, cameras first."""
    videos = sorted((root / "dev").glob("video*"), key=lambda p: (len(p.name), p.name))
    specs: list[str] = []
    if facts.elements.get("nvarguscamerasrc") and facts.elements.get("nvvidconv"):
        specs += [f"csi:{i}" for i in csi_sensors(root)]
    if facts.available and facts.elements.get("v4l2src"):
        specs += [f"gst:v4l2src device={v}" for v in videos]
    if opencv:
        specs += [f"camera:{v.name[5:]}" for v in videos if v.name[5:].isdigit()]
    if picamera2:
        specs.append("picamera2")
    if facts.available and facts.elements.get("videotestsrc"):
        specs.append("gst:videotestsrc")
    return specs + ["synthetic", "file:PATH", "folder:DIR"]
