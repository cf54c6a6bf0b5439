"""The GStreamer source (gst:, csi:): spec parsing and pipeline strings everywhere; real
pipelines (videotestsrc) wherever GStreamer and PyGObject are installed, end to end through `run`."""

from __future__ import annotations

import json
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proassist_edge.device import gst
from proassist_edge.device.doctor import _gstreamer
from proassist_edge.device.gst import (
    CsiSpec,
    GstElementMissingError,
    GstFacts,
    GstPipelineError,
    GstSource,
    camera_specs,
    csi_pipeline,
    parse_csi,
)
from proassist_edge.device.sources import SPECS, open_source
from proassist_edge.errors import MissingDependencyError, SourceError
from proassist_edge.events import Event, to_record


class Records(list[dict[str, Any]]):
    def __call__(self, event: Event) -> None:
        self.append(to_record(event))


def _have_gst() -> str:
    """'' when GStreamer, PyGObject and the base plugins are here, else why not."""
    try:
        Gst = gst.import_gst()
    except MissingDependencyError as e:
        return str(e)
    missing = [n for n in ("videotestsrc", "videoconvert", "videorate", "appsink", "identity",
                           "valve") if Gst.ElementFactory.find(n) is None]
    return f"GStreamer elements missing: {missing} (gstreamer1.0-plugins-base)" if missing else ""


WHY_NO_GST = _have_gst()
needs_gst = pytest.mark.skipif(bool(WHY_NO_GST), reason=f"GStreamer absent: {WHY_NO_GST}")
RED = "pattern=solid-color foreground-color=0xffff0000"  # ARGB


# --- specs and strings (no GStreamer needed) -------------------------------------------------
def test_parse_csi() -> None:
    assert parse_csi("") == CsiSpec(0, 1920, 1080, Fraction(30))
    assert parse_csi("1") == CsiSpec(1, 1920, 1080, Fraction(30))
    assert parse_csi("0,1280x720@60") == CsiSpec(0, 1280, 720, Fraction(60))
    assert parse_csi("2,640x480@29.97").fps == Fraction("29.97")
    for bad in ("x", "-1", "0,1280x720", "0,1280x720@", "0,wxh@30", "0,0x720@30", "0,1280x720@0",
                "0;1280x720@30"):
        with pytest.raises(SourceError, match="csi:N,WxH@FPS"):
            parse_csi(bad)


def test_csi_pipeline_string() -> None:
    assert csi_pipeline(parse_csi("1,1280x720@60")) == (
        "nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1280,height=720,"
        "framerate=60/1 ! nvvidconv ! video/x-raw,format=BGRx"
    )
    assert "framerate=2997/100" in csi_pipeline(parse_csi("0,640x480@29.97"))


def test_open_source_builds_gst_and_csi_sources_unopened() -> None:
    assert "gst:PIPELINE" in SPECS and "csi:N[,WxH@FPS]" in SPECS
    src = open_source("csi:1,1280x720@60", 2.0)
    assert isinstance(src, GstSource) and src.live and src.name == "csi:1"
    assert src.launch == (
        csi_pipeline(parse_csi("1,1280x720@60")) + " ! videorate ! video/x-raw,framerate=2/1 ! "
        "videoconvert ! video/x-raw,format=RGB ! appsink name=proassist_sink max-buffers=2 sync=false"
    )
    # Everything after the first colon is the pipeline, colons included.
    src = open_source("gst:uridecodebin uri=file:///tmp/a.mp4 ! videoconvert !", 2.0)
    assert isinstance(src, GstSource) and not src.live
    assert src.pipeline == "uridecodebin uri=file:///tmp/a.mp4 ! videoconvert"
    assert open_source("gst:v4l2src device=/dev/video0", 2.0).live  # guessed until it opens
    with pytest.raises(SourceError, match="needs a pipeline"):
        open_source("gst:", 2.0)
    with pytest.raises(SourceError, match="csi:N"):
        open_source("csi:zero", 2.0)


def test_missing_pygobject_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gst, "_gst", None)
    monkeypatch.setitem(sys.modules, "gi", None)  # import gi -> ImportError
    with pytest.raises(MissingDependencyError, match=r"apt install gstreamer1.0-tools.*\[gst\]"):
        GstSource("videotestsrc").open()
    facts = gst.probe_gst()
    assert not facts.available and "import of gi" in facts.why
    monkeypatch.setattr(gst, "probe_gst", lambda: facts)
    checks = {c.name: c for c in _gstreamer()}
    assert not checks["GStreamer + PyGObject"].ok
    assert "pip install 'proassist-edge[gst]'" in checks["GStreamer + PyGObject"].fix
    assert "gst:" not in checks["camera specs"].detail


def test_camera_specs_on_a_fake_jetson(tmp_path: Path) -> None:
    for i, name in enumerate(["vi-output, imx219 9-0010", "vi-output, imx219 10-0010", "UVC Camera"]):
        (tmp_path / "dev").mkdir(exist_ok=True)
        (tmp_path / "dev" / f"video{i}").touch()
        sysfs = tmp_path / "sys/class/video4linux" / f"video{i}"
        sysfs.mkdir(parents=True)
        (sysfs / "name").write_text(name + "\n")
    all_elements = {name: True for name in gst.PROBED_ELEMENTS}
    specs = camera_specs(GstFacts(True, "GStreamer 1.20.3", elements=all_elements), tmp_path,
                         opencv=True)
    assert specs[:2] == ["csi:0", "csi:1"]
    assert "gst:v4l2src device=" + str(tmp_path / "dev/video2") in specs
    assert "camera:2" in specs and "gst:videotestsrc" in specs and specs[-1] == "folder:DIR"
    bare = camera_specs(GstFacts(False, why="no gi"), tmp_path)
    assert bare == ["synthetic", "file:PATH", "folder:DIR"]


# --- real pipelines ----------------------------------------------------------------------------
@needs_gst
def test_videotestsrc_frames_are_rgb_at_media_time() -> None:
    events = Records()
    # 63 px wide: GStreamer pads RGB rows to 4 bytes, the source must cut the padding.
    src = open_source(f"gst:videotestsrc num-buffers=6 {RED} ! video/x-raw,width=63,height=20",
                      2.0, events)
    with src:
        frames = list(src.frames())
    assert not src.live and src.t0 is None
    assert [f.index for f in frames] == list(range(6))
    assert [f.t for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    for f in frames:
        assert f.pixels.shape == (20, 63, 3) and f.pixels.dtype == np.uint8
        assert f.pixels.flags.c_contiguous
        assert (f.pixels == (255, 0, 0)).all()  # red stays red: RGB, not BGR
    assert [e["type"] for e in events] == ["source_end"] and events[0]["delivered"] == 6


@needs_gst
def test_a_30fps_stream_is_resampled_to_the_target_rate() -> None:
    with GstSource("videotestsrc num-buffers=30 ! video/x-raw,width=32,height=24,framerate=30/1",
                   fps=2.0) as src:
        ts = [f.t for f in src.frames()]
    # 30 frames of 1/30 s cover [0, 1] s; videorate keeps one frame per 0.5 s slot up to the end.
    assert ts == [0.0, 0.5, 1.0]


@needs_gst
def test_the_csi_tail_converts_bgrx_to_rgb() -> None:
    """The CSI pipeline with its Jetson-only elements swapped for desktop ones."""
    csi = csi_pipeline(CsiSpec(0, 64, 48, Fraction(30)))
    desktop = (csi.replace("nvarguscamerasrc sensor-id=0", f"videotestsrc num-buffers=3 {RED}")
               .replace("(memory:NVMM)", "").replace("nvvidconv", "videoconvert"))
    with GstSource(desktop, fps=30.0) as src:
        frames = list(src.frames())
    assert len(frames) == 3 and all((f.pixels == (255, 0, 0)).all() for f in frames)


@needs_gst
def test_bad_pipelines_fail_typed_with_the_fix() -> None:
    events = Records()
    with pytest.raises(GstPipelineError, match=r"syntax error.*gst-launch-1.0"):
        GstSource("videotestsrc ! ! videoconvert", on_event=events).open()
    assert events[-1]["type"] == "source_error"
    with pytest.raises(GstPipelineError, match="could not link"):
        GstSource("videotestsrc ! audioconvert").open()
    with pytest.raises(GstElementMissingError, match=r"nvarguscamerasrc.*JetPack") as info:
        open_source("csi:0", 2.0).open()
    assert info.value.element == "nvarguscamerasrc"
    with pytest.raises(GstElementMissingError, match="no element 'nosuchsrc'"):
        GstSource("nosuchsrc").open()


@needs_gst
def test_an_error_mid_file_raises_after_the_frames_before_it() -> None:
    events = Records()
    src = GstSource("videotestsrc num-buffers=100 ! identity error-after=4", on_event=events)
    got = []
    with pytest.raises(SourceError, match=r"failed after \d frames: identity0: Failed after"):
        with src:
            for frame in src.frames():
                got.append(frame)
    assert 1 <= len(got) <= 4 and src.stats.failed == 1
    assert events[-1]["type"] == "source_error" and events[-1]["delivered"] == len(got)


@needs_gst
def test_a_live_camera_that_errors_is_rebuilt_and_keeps_its_clock() -> None:
    events = Records()
    src = GstSource("videotestsrc is-live=true ! video/x-raw,width=32,height=24 ! "
                    "identity error-after=3", fps=10.0, backoff_s=0.05, on_event=events)
    assert src.live  # guessed from is-live=true
    frames = []
    with src:
        assert src.live and src.t0 is not None
        for frame in src.frames():
            frames.append(frame)
            assert 0 <= time.monotonic() - (src.t0 + frame.t) < 1.0  # capture time, not pull time
            if len(frames) == 6:
                break
    kinds = [e["type"] for e in events]
    assert "camera_read_failed" in kinds and "camera_reconnected" in kinds
    ts = [f.t for f in frames]
    assert ts == sorted(ts) and [f.index for f in frames] == list(range(6))
    assert src.stats.failed >= 1 and src.stats.dropped >= 1  # the reconnect lost slots


@needs_gst
def test_a_live_camera_that_goes_silent_gives_up_after_the_retries() -> None:
    events = Records()
    src = GstSource("videotestsrc is-live=true ! valve drop=true", fps=10.0, max_retries=2,
                    backoff_s=0.05, stall_s=0.3, on_event=events)
    with pytest.raises(SourceError, match=r"no frame for 0.3 s.*gave up after 2 reconnect"):
        with src:
            list(src.frames())
    kinds = [e["type"] for e in events]
    assert kinds.count("camera_read_failed") == 2 and kinds[-1] == "source_error"
    assert src.stats.failed == 3


@needs_gst
def test_interrupt_stops_a_live_pipeline_soon() -> None:
    src = GstSource("videotestsrc is-live=true ! video/x-raw,width=32,height=24", fps=2.0)
    with src:
        it = src.frames()
        next(it)
        threading.Timer(0.1, src.interrupt).start()
        t = time.monotonic()
        rest = list(it)
    assert time.monotonic() - t < 1.5 and len(rest) <= 1


@needs_gst
def test_doctor_lists_gstreamer_and_the_specs_that_work() -> None:
    checks = {c.name: c for c in _gstreamer()}
    assert checks["GStreamer + PyGObject"].ok
    assert "videotestsrc" in checks["GStreamer + PyGObject"].detail
    assert "gst:videotestsrc" in checks["camera specs"].detail
    assert not checks["CSI camera (nvarguscamerasrc)"].ok  # no Jetson here


@needs_gst
def test_run_on_videotestsrc_end_to_end(tiny_bundle, tmp_path: Path) -> None:
    from proassist_edge.cli import main

    bundle, _, thr = tiny_bundle(1, "lm", 1)
    events = tmp_path / "events.jsonl"
    rc = main(["run", str(bundle), "--source",
               "gst:videotestsrc num-buffers=6 ! video/x-raw,width=64,height=48 ! videoconvert",
               "--tts", "none", "--no-realtime", "--events", str(events), "--threshold", str(thr),
               "--max-reply-tokens", "2", "--quiet"])
    assert rc == 0
    log = [json.loads(line) for line in events.read_text().splitlines()]
    frames = [e for e in log if e["type"] == "frame"]
    assert sum(len(e["frames"]) for e in frames) == 6
    assert log[0]["type"] == "start" and log[-1]["type"] == "stop"
    assert any(e["type"] == "source_end" and e["delivered"] == 6 for e in log)
