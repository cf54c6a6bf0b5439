"""Per-stage latency of the streaming assistant, and of the PyTorch reference loop on the same
workload in the same process.

Timing stays outside the stages (as in runtime/loop.py): the bench's clock is an observer of the
core's stages (runtime/stages.py) and timestamps each; the core code that runs is the code that
ships. Speech runs on its own thread, as on the device: the first sentence is synthesized while
the rest of the reply decodes. Between frames the bench lets the speaker go idle, so no frame
step (ours or the reference's) is timed while a voice synthesizes on the same cores.

Stages (ms): `encode` (vision graph, one frame), `append` (the frame step: I frame tokens plus
any text, through the decoder), `decision` (P(not talk) and the rule, from the append's end to
the first reply token's append or the step's end), `decode` (one reply token through the
decoder), `ttft` (step start to the first reply token handed off), `step` (the whole frame step
incl. speech hand-off), `tts` (synthesis of one sentence), `ttfa` (decision to the first audio
sample of a reply ready), `e2e_lag` (frame handed to the core to the last audio sample of its
reply ready).
"""

from __future__ import annotations

import json
import math
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.backend import StepOut
from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.conversation import MessageSchedule
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.messages import TextMessage
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.speech_base import SpeechSink
from proassist_edge.runtime.stages import APPENDS, Stage, StageObserver
from proassist_edge.runtime.stream_text import SentenceSplitter

QUANTILES = (50, 95, 99)


def percentiles(samples: Iterable[float], qs: Sequence[int] = QUANTILES) -> dict[str, float | None]:
    """n, mean and the `qs` percentiles (linear interpolation between order statistics, numpy's
    default); None for every figure of an empty sample."""
    a = np.asarray([x for x in samples if math.isfinite(x)], np.float64)
    out: dict[str, float | None] = {"n": float(a.size)}
    out["mean"] = float(a.mean()) if a.size else None
    for q in qs:
        out[f"p{q}"] = float(np.percentile(a, q)) if a.size else None
    return out


def median(samples: Iterable[float]) -> float | None:
    a = [x for x in samples if math.isfinite(x)]
    return float(np.median(a)) if a else None


# --- the workload ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What every measured loop runs: the same frames, messages and decision threshold."""

    frames: np.ndarray  # (N, h, w, 3) uint8
    fps: float
    threshold: float
    reply_tokens: int
    messages: tuple[TextMessage, ...] = ()
    warmup: int = 3


def collect_frames(spec: str, n: int, fps: float) -> np.ndarray:
    """The first `n` frames of a device source (synthetic, file:..., folder:...), in memory so
    reading them is not timed."""
    from proassist_edge.device.sources import open_source

    out: list[np.ndarray] = []
    with open_source(spec, fps) as src:
        for frame in src.frames():
            out.append(frame.pixels)
            if len(out) == n:
                break
    if not out:
        raise ValueError(f"source {spec!r} gave no frames")
    return np.stack(out)


def settings_for(bundle: Bundle, threshold: float, reply_tokens: int) -> StreamSettings:
    from proassist_edge.runtime.core import settings_from_manifest

    return settings_from_manifest(bundle, threshold=threshold, max_reply_tokens=reply_tokens)


def calibrate_threshold(
    bundle: Bundle, frames: np.ndarray, messages: Sequence[TextMessage], fps: float,
    talk_fraction: float,
) -> float:
    """A threshold under which about `talk_fraction` of the frames talk (talk iff P(not talk)
    <= threshold), so the workload has both silent frames and replies to time: a random or
    untrained projector puts P(not talk) far from the manifest's threshold either way. The
    calibration replays the same frames and messages, so the measured stream follows it up to
    its first reply: at least one frame talks."""
    core = build_assistant(bundle, settings=settings_for(bundle, -1.0, 1)).core  # -1: never talk
    ps = [r.p_not_talk for r in core.replay(frames, messages, fps)]
    return float(np.quantile(ps, talk_fraction))


def calibrate_reference(
    ckpt: Any, bundle: Bundle, frames: np.ndarray, messages: Sequence[TextMessage], fps: float,
    talk_fraction: float,
) -> float:
    """The same calibration for the PyTorch reference loop, from its own P(not talk): a
    quantized bundle's threshold would make the fp32 reference talk on other frames, or never."""
    from proassist_edge.export.reference import ReferenceLoop

    settings = settings_for(bundle, -1.0, 1)
    loop = ReferenceLoop(ckpt.model, ckpt.tokenizer, ckpt.chat, settings, bundle.manifest.model.system_prompt)
    ps = [r.p_not_talk for r in loop.run(frames, messages, fps)]
    return float(np.quantile(ps, talk_fraction))


# --- timing, outside the stages ----------------------------------------------------------------
class _Clock(StageObserver):
    """Timestamps (time.monotonic) of the current step: an observer of our core's stages, or
    filled by the reference loop's timed calls."""

    def __init__(self) -> None:
        self.start(0.0)
        self._t = 0.0

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.encode_ms: float | None = None
        self.appends: list[tuple[float, float, int]] = []  # (start, end, tokens)
        self.first_token: float | None = None

    def stage_started(self, stage: Stage) -> None:
        self._t = time.monotonic()

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        t1 = time.monotonic()
        if stage.name == "encode":
            self.encode_ms = 1e3 * (t1 - self._t)
        elif stage.name in APPENDS:
            self.appends.append((self._t, t1, stage.tokens))


class _ReferenceClock(_Clock):
    """The reference loop hands no token out before it is appended: its first reply token is
    out when the first decode append ends."""

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        super().stage_ended(stage, out)
        if stage.name == "decode" and self.first_token is None:
            self.first_token = time.monotonic()


# --- speech on its own thread --------------------------------------------------------------------
@dataclass
class _Piece:
    text: str  # "" marks the end of a reply whose last sentence was already queued
    t_frame: float
    t_decided: float
    first: bool
    last: bool


class SpeechTimer:
    """A FIFO speaker thread that synthesizes each piece and timestamps its first sample ready."""

    def __init__(self, sink: SpeechSink) -> None:
        self.sink = sink
        self.q: queue.Queue[_Piece | None] = queue.Queue()
        self.tts_ms: list[float] = []
        self.ttfa_ms: list[float] = []
        self.lag_ms: list[float] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="bench-speech", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (piece := self.q.get()) is not None:
            try:
                self._speak(piece)
            finally:
                self.q.task_done()  # idle() waits on the queue's join
        self.q.task_done()

    def _speak(self, piece: _Piece) -> None:
        t_in = time.monotonic()
        t_ready = t_in
        if piece.text:
            try:
                # speak() returns when the audio is ready (WAV sinks: after synthesis, with its
                # first-sample time); nothing plays in the bench
                t_ready = self.sink.speak(piece.text).t_audio_start
                self.tts_ms.append(1e3 * (t_ready - t_in))
            except Exception as e:  # noqa: BLE001 - a failed voice is reported, not fatal
                self.errors.append(f"{type(e).__name__}: {e}")
                return
        if piece.first and piece.text:
            self.ttfa_ms.append(1e3 * (t_ready - piece.t_decided))
        if piece.last:
            self.lag_ms.append(1e3 * (t_ready - piece.t_frame))

    def say(self, piece: _Piece) -> None:
        self.q.put(piece)

    def close(self, timeout: float = 120.0) -> None:
        self.q.put(None)
        self.thread.join(timeout)


class _Reply:
    """Sentence pieces of one reply handed to the speaker as the tokens arrive (loop.py's way)."""

    def __init__(self, core: StreamCore, speech: SpeechTimer | None, clock: _Clock) -> None:
        self.core, self.speech, self.clock = core, speech, clock
        self.ids: list[int] = []
        self.splitter = SentenceSplitter()
        self.said = 0

    def on_token(self, token: int) -> None:
        if self.clock.first_token is None:
            self.clock.first_token = time.monotonic()
        self.ids.append(token)
        for piece in self.splitter.update(self.core.pb.reply_text(self.ids)):
            self._say(piece, last=False)

    def finish(self, text: str) -> None:
        rest = self.splitter.finish(text)
        if rest or self.said:
            self._say(rest, last=True)

    def _say(self, text: str, last: bool) -> None:
        if self.speech is not None:
            t_decided = _decided(self.clock)
            self.speech.say(_Piece(text, self.clock.t0, t_decided, self.said == 0, last))
        self.said += 1


def _decided(clock: _Clock) -> float:
    """The decision is made between the frame append's end and the first reply append."""
    if len(clock.appends) > 1:
        return clock.appends[1][0]
    return clock.first_token or time.monotonic()


# --- the streams ----------------------------------------------------------------------------------
@dataclass
class StreamRun:
    """Per-stage samples (ms) and stream-level figures of one measured stream."""

    stages: dict[str, list[float]] = field(default_factory=dict)
    talk: list[bool] = field(default_factory=list)
    budget_ms: float = 500.0
    speech_errors: list[str] = field(default_factory=list)

    def add(self, stage: str, ms: float | None) -> None:
        if ms is not None:
            self.stages.setdefault(stage, []).append(ms)

    def no_talk_step_ms(self) -> list[float]:
        return [s for s, t in zip(self.stages.get("step", []), self.talk, strict=True) if not t]

    def summary(self) -> dict[str, Any]:
        steps = self.stages.get("step", [])
        return {
            "stages_ms": {k: percentiles(v) for k, v in sorted(self.stages.items())},
            "frames": len(steps),
            "talk_frames": int(sum(self.talk)),
            # frames back to back: the rate the core sustains (speech has its own thread)
            "sustained_fps": 1e3 * len(steps) / sum(steps) if steps else None,
            "deadline_ms": self.budget_ms,
            "deadline_misses": int(sum(x > self.budget_ms for x in steps)),
            "no_talk_step_ms_p50": median(self.no_talk_step_ms()),
            "speech_errors": self.speech_errors[:5],
        }

    def record(self, clock: _Clock, talk: bool, t_end: float) -> None:
        self.talk.append(talk)
        self.add("step", 1e3 * (t_end - clock.t0))
        self.add("encode", clock.encode_ms)
        if not clock.appends:
            return
        a0, a1, _ = clock.appends[0]
        self.add("append", 1e3 * (a1 - a0))
        nxt = clock.appends[1][0] if len(clock.appends) > 1 else (clock.first_token or t_end)
        self.add("decision", 1e3 * (nxt - a1))
        for s, e, n in clock.appends[1:]:
            if n == 1:
                self.add("decode", 1e3 * (e - s))
        if talk and clock.first_token is not None:
            self.add("ttft", 1e3 * (clock.first_token - clock.t0))


class OursStepper:
    """Our StreamCore on the workload, one frame per call, speech handed off as it decodes."""

    def __init__(
        self, bundle: Bundle, work: Workload, speech: SpeechTimer | None, system: str | None = None
    ) -> None:
        self.work, self.speech = work, speech
        settings = settings_for(bundle, work.threshold, work.reply_tokens)
        self.clock = _Clock()
        self.core = build_assistant(bundle, settings=settings, system=system, stages=[self.clock]).core
        self.run = StreamRun(budget_ms=1e3 / work.fps)

    def warm_up(self) -> None:
        for i in range(min(self.work.warmup, len(self.work.frames))):
            self.core.step(self.work.frames[i : i + 1], i, i / self.work.fps)
        self.core.reset()

    def step(self, i: int, due: list[TextMessage]) -> None:
        self.clock.start(time.monotonic())
        reply = _Reply(self.core, self.speech, self.clock)
        frames = self.work.frames[i : i + 1]
        r = self.core.step(frames, i, i / self.work.fps, due, on_token=reply.on_token)
        if r.talk:
            reply.finish(r.text)  # the step ends once the last piece is handed to the speaker
        self.run.record(self.clock, r.talk, time.monotonic())

    def idle(self) -> None:
        if self.speech is not None:
            self.speech.q.join()

    def finish(self) -> StreamRun:
        if self.speech is not None:
            self.speech.close()
            self.run.stages["tts"] = self.speech.tts_ms
            self.run.stages["ttfa"] = self.speech.ttfa_ms
            self.run.stages["e2e_lag"] = self.speech.lag_ms
            self.run.speech_errors = self.speech.errors
        return self.run


class ReferenceStepper:
    """export/reference.py's ReferenceLoop (PyTorch, HF DynamicCache) on the same workload."""

    def __init__(self, ckpt: Any, work: Workload, settings: StreamSettings, system: str) -> None:
        from proassist_edge.export.reference import ReferenceLoop

        self.work, self.ckpt = work, ckpt
        self.clock = clock = _ReferenceClock()
        self.loop = ReferenceLoop(ckpt.model, ckpt.tokenizer, ckpt.chat, settings, system,
                                  observers=[clock])
        self.run = StreamRun(budget_ms=1e3 / work.fps)

    def warm_up(self) -> None:
        for i in range(min(self.work.warmup, len(self.work.frames))):
            self.loop.step(self.work.frames[i : i + 1], i, i / self.work.fps)
        self.loop.reset()

    def step(self, i: int, due: list[TextMessage]) -> None:
        self.clock.start(time.monotonic())
        r = self.loop.step(self.work.frames[i : i + 1], i, i / self.work.fps, due)
        self.run.record(self.clock, r.talk, time.monotonic())

    def idle(self) -> None:
        pass

    def finish(self) -> StreamRun:
        return self.run


def run_lockstep(work: Workload, steppers: Sequence[OursStepper | ReferenceStepper]) -> None:
    """Every stepper takes frame i before any takes frame i+1, in alternating order, each once
    the others' speech went idle: a change of machine load hits every loop alike, so their
    ratios hold on a busy machine even when the absolute times do not."""
    for s in steppers:
        s.warm_up()
    schedules = [MessageSchedule(work.messages) for _ in steppers]
    for i in range(len(work.frames)):
        order = list(range(len(steppers)))
        if i % 2:
            order.reverse()
        for k in order:
            for other in steppers:
                other.idle()
            steppers[k].step(i, schedules[k].due(i / work.fps))


# --- memory of the runtime alone -----------------------------------------------------------------
_PROBE = """
import json, resource, sys
import numpy as np
from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import settings_from_manifest
a = json.loads(sys.argv[1])
b = open_bundle(a["bundle"], a["decoder"], verify=False, threads=a["threads"])
core = build_assistant(b, settings=settings_from_manifest(b, threshold=2.0, max_reply_tokens=a["reply"])).core
rng = np.random.default_rng(0)
frames = rng.integers(0, 256, (a["frames"], a["size"], a["size"], 3), dtype=np.uint8)
list(core.replay(frames))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_loaded": "torch" in sys.modules}))
"""


def runtime_peak_memory(
    bundle: Path, decoder: str, threads: int, frames: int = 4, size: int = 384, reply: int = 4
) -> dict[str, Any]:
    """Peak resident memory (MB) of the runtime alone running this bundle, in a fresh process:
    the bench process also holds torch, other bundles and the bandwidth array. Every frame talks
    so the decode path is allocated too; the KV buffer is the manifest's full capacity."""
    args = {"bundle": str(bundle), "decoder": decoder, "threads": threads, "frames": frames,
            "size": size, "reply": reply}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
            timeout=600, check=False,
        )
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {"peak_rss_mb": None, "error": f"memory probe failed: {e}"}


def process_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
