"""The live loop: threads, speech, events, shutdown and failure handling, on a tiny real bundle."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from proassist_edge.device.sources import SyntheticSource
from proassist_edge.errors import SourceError, SpeechError
from proassist_edge.events import Event, SpeechEvent, StageEvent, to_record
from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.events import (
    EventLog,
    LatencyObserver,
    frame_event,
    live_frame_event,
)
from proassist_edge.runtime.loop import Assistant, LoopOptions, RunSummary, parse_message_line
from proassist_edge.runtime.messages import Frame, FrameResult
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.source_base import FrameSource
from proassist_edge.runtime.speech_base import SpeechSink
from proassist_edge.runtime.stages import Stage, StageObserver
from proassist_edge.runtime.stream_text import SentenceSplitter

REPLY_TOKENS = 4


@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> tuple[Path, float]:
    bundle, _, thr = tiny_bundle(1, "lm", 1)
    return bundle, thr


class Recorder:
    """Every event, as the record the event log writes."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def on_event(self, event: Event) -> None:
        with self.lock:
            self.events.append(to_record(event))

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def make_assistant(
    bundle: Path, source: FrameSource, sink: SpeechSink | None = None, threshold: float = 1.0,
    events: Path | str | None = None, **options: object,
) -> tuple[Assistant, Recorder, EventLog]:
    settings = StreamSettings(threshold=threshold, max_reply_tokens=REPLY_TOKENS)
    rec, log = Recorder(), EventLog(events)
    opts = LoopOptions(**{"realtime": False, **options})  # type: ignore[arg-type]
    assistant = build_assistant(open_bundle(bundle), source, sink, settings, events=[log, rec],
                                options=opts)
    return assistant, rec, log


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- small parts -----------------------------------------------------------------------------
def test_sentence_splitter_emits_sentences_while_text_grows() -> None:
    full = "Now take the red block. Then put it on the base! Ok. Done?"
    s, out = SentenceSplitter(), []
    for i in range(1, len(full) + 1):
        out += s.update(full[:i].strip())
    assert out == ["Now take the red block.", "Then put it on the base!"]
    assert s.finish(full) == "Ok. Done?"
    assert s.update("Header junk. x") == ["Header junk."]
    assert s.update("Real reply") == []  # the text changed under what was said: wait for finish
    assert s.finish("Real reply. Done.") == "Real reply. Done."


def test_parse_message_line() -> None:
    assert parse_message_line("user: what next?\n") == ("user", "what next?")
    assert parse_message_line("System:  the user looks lost") == ("system", "the user looks lost")
    assert parse_message_line("where is the screw") == ("user", "where is the screw")
    assert parse_message_line("note: 3 bolts") == ("user", "note: 3 bolts")
    assert parse_message_line("   ") is None


def test_latency_observer_percentiles() -> None:
    lat = LatencyObserver()
    for ms in range(1, 101):
        lat.on_event(StageEvent(stage="encode", ms=float(ms), frames=1))
    result = FrameResult(0, 0.0, 0.5, False)
    lat.on_event(live_frame_event(result, (0,), None, step_ms=5.0, ttft_ms=None))
    lat.on_event(SpeechEvent(text="hi", t_frame=0.0, reply_id=1, ttfa_s=0.25, duration_s=0.1,
                             interrupted=False, file=None))
    s = lat.summary()
    assert s["encode"]["p50"] == pytest.approx(50.5) and s["encode"]["p95"] == pytest.approx(95.05)
    assert s["step"]["n"] == 1 and s["ttfa"]["p50"] == pytest.approx(250.0) and "ttft" not in s


def test_event_log_on_a_full_disk_reports_once_and_keeps_going(capsys) -> None:
    log = EventLog("/dev/full")  # Linux: every write fails with ENOSPC
    for i in range(5):
        log.on_event(frame_event(FrameResult(i, i / 2, float("nan"), False)))
    log.close()
    assert log.write_errors >= 5 and log.written == 0
    assert capsys.readouterr().err.count("cannot write the event log") == 1


def test_runtime_imports_no_torch() -> None:
    script = (
        "import sys\n"
        "import proassist_edge.runtime.loop, proassist_edge.runtime.replay\n"
        "import proassist_edge.runtime.events, proassist_edge.cli.run\n"
        "from proassist_edge.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


# --- the loop on a real bundle ---------------------------------------------------------------
def test_run_cli_file_source_one_wav_per_utterance(tiny, tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    from proassist_edge.cli import main

    bundle, thr = tiny
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(30):  # 3 s
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    engine = "espeak" if shutil.which("espeak-ng") or shutil.which("espeak") else "none"
    out, events = tmp_path / "out", tmp_path / "events.jsonl"
    rc = main(["run", str(bundle), "--source", f"file:{clip}", "--tts",
               f"wav:{out},engine={engine}", "--events", str(events), "--threshold", str(thr),
               "--max-reply-tokens", "6", "--quiet"])
    assert rc == 0
    log = read_log(events)
    utts = [e for e in log if e["type"] == "utterance"]
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert utts, "the threshold should make the model talk on some frames"
    assert len(list(out.glob("*.wav"))) == len(index) == len(utts)
    for u, w in zip(utts, index, strict=True):
        keys = ("text", "t_frame", "t_decided")
        assert [u[k] for k in keys] == [w[k] for k in keys]
        assert (out / w["file"]).stat().st_size > 0
    frames = [e for e in log if e["type"] == "frame"]
    assert sum(len(e["frames"]) for e in frames) == 6  # 3 s at 2 fps, none dropped
    assert {"start", "stop"} <= {e["type"] for e in log}
    assert len([e for e in log if e["type"] == "speech"]) == len(utts)


def test_sigint_stops_a_live_run_cleanly(tiny, tmp_path: Path) -> None:
    bundle, _ = tiny
    events = tmp_path / "events.jsonl"
    cmd = [sys.executable, "-m", "proassist_edge.cli", "run", str(bundle), "--source", "synthetic",
           "--tts", "none", "--events", str(events), "--threshold", "1.0",
           "--max-reply-tokens", str(REPLY_TOKENS)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killer = threading.Timer(240, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the loop has said something
            if "assistant:" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        killer.cancel()
    assert proc.returncode == 0, err[-2000:]
    log = read_log(events)  # every line is valid JSON
    assert log[0]["type"] == "start" and log[-1]["type"] == "stop"
    assert log[-1]["reason"] == "stopped" and any(e["type"] == "frame" for e in log)
    assert "frames processed" in out


class FailingSource(FrameSource):
    name = "failing"

    def __init__(self, good: int) -> None:
        super().__init__(2.0)
        self.good = good

    def frames(self) -> Iterator[Frame]:
        for i in range(self.good):
            yield self._deliver(i, i / 2, np.full((32, 32, 3), 10 * i, np.uint8))
        raise SourceError("camera cable pulled")


def test_source_dying_mid_stream_ends_cleanly(tiny) -> None:
    assistant, rec, _ = make_assistant(tiny[0], FailingSource(3))
    assistant.read_messages(io.StringIO("system: the user looks lost\nwhere is it?\n\n"))
    summary = assistant.run()
    roles = [(e["role"], e["content"]) for e in rec.of("message")]
    assert roles == [("system", "the user looks lost"), ("user", "where is it?")]
    assert summary.reason == "source_error" and summary.frames == 3 and summary.exit_code == 0
    errors = rec.of("error")
    assert errors and errors[0]["kind"] == "source" and "cable" in errors[0]["error"]
    assert rec.events[-1]["type"] == "stop"


class FlakySink(SpeechSink):
    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        self.calls += 1
        if self.calls == 1:
            raise SpeechError("voice engine crashed")
        return np.zeros(160, np.float32), 16000


def test_tts_failure_is_logged_and_the_loop_goes_on(tiny) -> None:
    source = SyntheticSource(2.0, size=(32, 32), n_frames=5)
    assistant, rec, _ = make_assistant(tiny[0], source, FlakySink(), threshold=1.0)
    summary = assistant.run()
    assert summary.frames == 5 and summary.speech_errors == 1
    assert len(rec.of("speech_error")) == 1 and "crashed" in rec.of("speech_error")[0]["error"]
    assert summary.spoken == summary.utterances - 1 >= 4


def test_unwritable_event_log_does_not_stop_the_loop(tiny, capsys) -> None:
    source = SyntheticSource(2.0, size=(32, 32), n_frames=4)
    assistant, rec, log = make_assistant(tiny[0], source, events="/dev/full")
    summary = assistant.run()
    log.close()
    assert summary.frames == 4 and summary.exit_code == 0 and len(rec.of("frame")) == 4
    assert log.write_errors >= 4
    assert capsys.readouterr().err.count("cannot write the event log") == 1


def nan_bundle(bundle: Path, dest: Path, token: int) -> Path:
    """A copy of the bundle whose embedding row `token` is NaN (sha256 updated): a real graph
    that returns NaN whenever that token enters the context."""
    from proassist_edge.manifest import sha256_file

    shutil.copytree(bundle, dest)
    table = np.load(dest / "embeddings.npy")
    table[token] = np.nan
    np.save(dest / "embeddings.npy", table)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["embeddings.npy"] = sha256_file(dest / "embeddings.npy")
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


POISON = "Xylophone quokka"


def poison_token(bundle: Path) -> int:
    tok = open_bundle(bundle).tokenizer
    return tok.encode(POISON, add_special_tokens=False).ids[-1]


def test_nan_from_the_graph_skips_the_frame_and_keeps_the_memory(tiny, tmp_path: Path) -> None:
    bundle = nan_bundle(tiny[0], tmp_path / "nan", poison_token(tiny[0]))
    source = SyntheticSource(2.0, size=(32, 32), n_frames=5)
    assistant, rec, _ = make_assistant(bundle, source, threshold=tiny[1])
    assistant.inject("user", POISON)  # goes with the first step, whose output is then NaN
    summary = assistant.run()
    errors = rec.of("error")
    assert len(errors) == 1 and errors[0]["kind"] == "NonFiniteOutputError"
    assert errors[0]["frames"] == [0] and errors[0]["dropped_messages"][0]["content"] == POISON
    frames = rec.of("frame")
    assert [e["index"] for e in frames] == [1, 2, 3, 4] and summary.skipped == 1
    assert all(0.0 <= e["p_not_talk"] <= 1.0 for e in frames)
    # The rolled-back memory equals one that never saw the poisoned step.
    clean = StreamCore(open_bundle(tiny[0]), StreamSettings(threshold=tiny[1],
                                                            max_reply_tokens=REPLY_TOKENS))
    src = SyntheticSource(2.0, size=(32, 32), n_frames=5)
    expected = [clean.step(f.pixels[None], f.index, f.t) for f in list(src.frames())[1:]]
    assert [e["token_ids"] for e in frames] == [list(r.token_ids) for r in expected]
    assert [e["p_not_talk"] for e in frames] == pytest.approx([r.p_not_talk for r in expected],
                                                               abs=1e-6)


class SlowEncode(StageObserver):
    """Makes the vision encode slow, as a loaded device would (a stage observer that waits)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.done = seconds, threading.Event()

    def stage_started(self, stage: Stage) -> None:
        if stage.name == "encode":
            self.done.wait(self.seconds)  # never set: a bounded, interruptible delay


def test_frames_dropped_under_load_are_counted(tiny) -> None:
    source = SyntheticSource(20.0, size=(32, 32), n_frames=30)
    assistant, rec, _ = make_assistant(tiny[0], source, threshold=1e-9, realtime=True,
                                       source_capacity=2)
    assistant.core.observers.append(SlowEncode(0.25))
    summary = assistant.run()
    assert summary.dropped > 0 and summary.frames + summary.dropped == 30
    assert sum(e["count"] for e in rec.of("frames_dropped")) == summary.dropped
    assert any(len(e["frames"]) > 1 for e in rec.of("frame")), "late frames go in one step"


def test_max_seconds_and_injected_messages(tiny) -> None:
    source = SyntheticSource(2.0, size=(32, 32))  # endless
    assistant, rec, _ = make_assistant(tiny[0], source, threshold=1e-9, max_seconds=2.0)
    assistant.inject("user", "What is next?")
    with pytest.raises(ValueError):
        assistant.inject("assistant", "no")
    t0 = time.monotonic()
    summary: RunSummary = assistant.run()
    assert summary.reason == "max_seconds" and summary.frames == 4 and summary.stream_s == 1.5
    assert time.monotonic() - t0 < 60
    assert rec.of("message")[0]["content"] == "What is next?"
    # the message went into the first step, after the opening, before the frame's token
    core = assistant.core
    opening = core.pb.opening(core.system, core.knowledge)
    message = core.pb.message("user", "What is next?")
    lens = [e["context_len"] for e in rec.of("frame")]
    assert lens == [len(opening) + len(message) + 1 + i for i in range(4)]
