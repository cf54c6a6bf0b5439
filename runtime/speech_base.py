"""The speech-sink interface and WAV helpers shared by every engine and output."""

from __future__ import annotations

import threading
import time
import wave
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proassist_edge.errors import SpeechError
from proassist_edge.runtime.messages import Utterance

# Mono float32 samples in [-1, 1] and their sample rate in Hz.
Audio = tuple[np.ndarray, int]


@dataclass(frozen=True)
class SpeakResult:
    """What one `speak` did: when the first sample was ready or started playing
    (`time.monotonic()`), how long the audio is, whether it was cut, and the file
    it went to (WAV sinks)."""

    t_audio_start: float
    duration_s: float
    interrupted: bool = False
    file: str | None = None


class SpeechSink(ABC):
    """Turns text into audio (`synthesize`) and delivers it (`speak`).

    Engines (pyttsx3, espeak-ng, piper) only synthesize: their `speak` returns
    once the audio is ready. Outputs (sounddevice, WAV) wrap an engine. `speak`
    is called from one thread at a time (the Speaker's); `cancel`, when set from
    another thread, asks playback to stop early.
    """

    name: str = "sink"

    def warmup(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Load models or devices now so the first utterance is not slow."""

    @abstractmethod
    def synthesize(self, text: str) -> Audio:
        """Mono float32 samples in [-1, 1] and the sample rate; raises SpeechError."""

    def speak(
        self,
        text: str,
        *,
        utterance: Utterance | None = None,
        cancel: threading.Event | None = None,
    ) -> SpeakResult:
        """Synthesize `text` and deliver it; returns when done or cancelled."""
        samples, rate = self.synthesize(text)
        return SpeakResult(time.monotonic(), duration_s(samples, rate))

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release engines and devices."""


def duration_s(samples: np.ndarray, rate: int) -> float:
    return len(samples) / rate if rate > 0 else 0.0


def read_wav(path: str | Path) -> Audio:
    """Read a PCM WAV as mono float32 in [-1, 1]."""
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (OSError, EOFError, wave.Error) as e:
        raise SpeechError(f"cannot read speech WAV {path}: {e}") from e
    if width == 1:  # 8-bit WAV is unsigned
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise SpeechError(f"{path}: unsupported WAV sample width {width} bytes")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return np.ascontiguousarray(data, dtype=np.float32), rate


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """Write mono float32 samples as a 16-bit PCM WAV."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
