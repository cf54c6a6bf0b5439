"""Calibration on multimodal streams: the decoder sees what it sees at run time.

The parent bundle's StreamCore runs over frame streams with a system prompt and a user question,
and an observer of the core (runtime/stages.py) records the real feeds of its portable decoder:
inputs_embeds (frame tokens from the vision graph, chat-turn text, reply tokens) and the past
KV of growing lengths. Text-only calibration is not an option: custom-projector VLMs calibrated
on text collapse (TensorRT-LLM issue #1860), because frame tokens live in a different range
than word embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from proassist_edge.errors import DataError
from proassist_edge.runtime.backend import Decoder, PortableDecoder, StepOut
from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.core import StreamCore, decision_probability, frame_inputs, settings_from_manifest
from proassist_edge.runtime.messages import FrameResult, TextMessage
from proassist_edge.runtime.prompt import StreamSettings, decide_talk
from proassist_edge.runtime.stages import APPENDS, DECISIONS, Stage, StageObserver

QUESTIONS = ("What should I do next?", "Did I do that step right?", "What is left to do?")


# --- frame streams ---------------------------------------------------------------------------
def synthetic_stream(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """The export verifier's moving scene (export/verify.py), without importing torch."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.float32) * (255.0 / size)
    frames = np.empty((n, size, size, 3), np.uint8)
    colours = rng.integers(0, 256, (4, 3))
    for i in range(n):
        img = base * (0.6 + 0.4 * np.sin(i / 17.0) ** 2)
        for j, c in enumerate(colours):
            cx = int((size / 2) + (size / 3) * np.sin(i / (7.0 + j * 3) + j))
            cy = int((size / 2) + (size / 3) * np.cos(i / (11.0 + j) + j))
            img[max(cy - 6, 0) : cy + 6, max(cx - 6, 0) : cx + 6] = c
        frames[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return frames


def split_episodes(split_dir: Path) -> list[Path]:
    files = sorted(split_dir.glob("episodes/*/frames.npy"))
    if not files:
        raise DataError(
            f"{split_dir} holds no episodes/*/frames.npy: pass a task-world split folder "
            "(proassist-edge taskworld ...) or 'synthetic'"
        )
    return files


def frame_streams(source: str | Path | None, streams: int, frames: int, offset: int = 0) -> list[np.ndarray]:
    """`streams` uint8 (frames, H, W, 3) streams: synthetic scenes (seeds offset..), or the
    episodes of a task-world split (from episode `offset`, wrapping around)."""
    if source is None or str(source) == "synthetic":
        return [synthetic_stream(frames, seed=offset + i) for i in range(streams)]
    files = split_episodes(Path(source))
    out = []
    for i in range(streams):
        path = files[(offset + i) % len(files)]
        arr = np.load(path, mmap_mode="r")
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise DataError(f"{path}: expected uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
        out.append(np.array(arr[:frames]))
    return out


def stream_messages(frames: int, fps: float, k: int = 0) -> list[TextMessage]:
    """One user question early in the stream (a chat turn between frames, as in the paper)."""
    return [TextMessage("user", QUESTIONS[k % len(QUESTIONS)], t=min(5.0, frames / (4 * fps)))]


class Stream(NamedTuple):
    """What a comparison replays: frames, the chat turns between them, and the system prompt
    (None: the bundle's own)."""

    frames: np.ndarray
    messages: list[TextMessage]
    system: str | None = None


def plain_streams(frames: list[np.ndarray], fps: float) -> list[Stream]:
    """Frame streams with one user question each (calibration and synthetic comparisons)."""
    return [Stream(f, stream_messages(len(f), fps, k)) for k, f in enumerate(frames)]


def episode_streams(data: str | Path, n: int | None, frames: int | None = None) -> list[Stream]:
    """The first n episodes of an evaluation split (all when None) with their own conversation
    (system prompt, task knowledge, user turns): the comparison on the data the model is
    graded on."""
    from itertools import islice

    from proassist_edge.runtime.conversation import parse_conversation
    from proassist_edge.runtime.episode import read_split

    out = []
    for ep in islice(read_split(data), n):
        conv = parse_conversation(ep.conversation, ep.fps)
        msgs = [m for m in conv.messages if frames is None or m.t * ep.fps < frames]
        out.append(Stream(np.ascontiguousarray(ep.frames[:frames]), msgs, conv.system))
    if not out:
        raise DataError(f"{data} holds no episodes to compare on")
    return out


# --- a shadow of the core's decoder ------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64 / den) if den > 0 else float(np.array_equal(a64, b64))


class ShadowDecoder(StageObserver):
    """Bundle B's decoder shadowing the core of bundle A, as an observer of A's core: every
    append, reset and keep of A's core is repeated on a decoder of B with B's own inputs for the
    same history (B's vision graph's frame tokens for the same frames, B's embedding table's
    rows for the same token ids), and at each decision position the logits and the talk
    decision are compared. The history is A's (its decisions and replies), so one flipped
    decision is counted once instead of cascading through a reply that differs."""

    def __init__(self, core: StreamCore, shadow: Bundle, settings: StreamSettings) -> None:
        self.core, self.shadow, self.settings = core, shadow, settings
        self.dec = shadow.new_decoder(core.dec.capacity)
        self.cosines: list[float] = []
        self.top1: list[bool] = []
        self.p: list[tuple[float, float]] = []  # (A, B) P(not talk) per decision
        self.talk: list[tuple[bool, bool]] = []  # (A, B) decision
        self.prev: tuple[float | None, float | None] = (None, None)
        self.head_mode = core.b.manifest.model.w2t_mode == "head"

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        if stage.name in APPENDS:
            assert isinstance(out, StepOut)
            mirror = self.dec.append(self.inputs(stage))
            if stage.name in DECISIONS:
                self.compare(out, mirror)
        elif stage.name == "reset":
            self.dec.reset()
        elif stage.name == "keep":
            assert stage.keep is not None
            self.dec.keep(*stage.keep)

    def inputs(self, stage: Stage) -> np.ndarray:
        """B's version of the stage's inputs: a reply token's row of B's table, or a decision
        append's text and frames built as the core builds them (core.frame_inputs)."""
        if stage.name == "decode":
            return self.shadow.embed(list(stage.ids))
        assert stage.frames is not None
        tokens = self.shadow.encode_frames(stage.frames)
        return frame_inputs(self.shadow, self.core.sep, stage.ids, tokens)

    def compare(self, out: StepOut, mirror: StepOut) -> None:
        p = (decision_probability(self.core.b, out, self.head_mode),
             decision_probability(self.shadow, mirror, self.head_mode))
        self.talk.append((decide_talk(p[0], self.prev[0], self.settings),
                          decide_talk(p[1], self.prev[1], self.settings)))
        self.p.append(p)
        self.prev = p
        self.cosines.append(cosine(out.logits, mirror.logits))
        self.top1.append(int(np.argmax(out.logits)) == int(np.argmax(mirror.logits)))


# --- recording feeds ------------------------------------------------------------------------
@dataclass
class Sample:
    feeds: dict[str, np.ndarray]
    kind: str  # "frame" (text turn and/or frame tokens) or "token" (one reply token)
    stream: int
    step: int
    frame_tokens: np.ndarray | None = None  # the vision graph's tokens in this feed, if any


@dataclass
class FeedRecorder(StageObserver):
    """Uniform reservoir samples of the feeds of a core's portable decoder (an observer of the
    core: before each append, its inputs and the past KV), kept per kind so that frame steps
    are never crowded out by reply tokens. Past KV arrays are referenced, not copied: the
    portable decoder replaces them every step and never writes into one."""

    max_frame: int = 96
    max_token: int = 32
    seed: int = 0
    frames: list[Sample] = field(default_factory=list)
    tokens: list[Sample] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=lambda: {"frame": 0, "token": 0})
    stream: int = 0
    step: int = 0
    last_frame_tokens: np.ndarray | None = None
    decoder: Decoder | None = None  # the observed core's decoder

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def stage_started(self, stage: Stage) -> None:
        if stage.name in APPENDS:
            assert stage.embeds is not None and self.decoder is not None
            self.see(stage.embeds, self.decoder, stage.name in DECISIONS)

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        if stage.name == "encode":
            assert isinstance(out, np.ndarray)
            self.last_frame_tokens = out

    def see(self, embeds: np.ndarray, dec: Decoder, frame_step: bool) -> None:
        if not isinstance(dec, PortableDecoder):
            raise TypeError("calibration taps the portable decoder (its feeds are the graph's inputs)")
        kind = "frame" if frame_step else "token"
        pool, cap = (self.frames, self.max_frame) if frame_step else (self.tokens, self.max_token)
        self.seen[kind] += 1
        n = self.seen[kind]
        slot = n - 1 if len(pool) < cap else int(self.rng.integers(0, n))
        if slot >= cap:
            return
        feeds = dict(zip(dec.names, dec.past, strict=True))
        feeds["inputs_embeds"] = np.array(embeds, dtype=np.float32)
        toks = self.last_frame_tokens if frame_step else None
        sample = Sample(feeds, kind, self.stream, self.step, toks)
        if slot < len(pool):
            pool[slot] = sample
        else:
            pool.append(sample)

    def samples(self) -> list[Sample]:
        # the first step of a stream (system prompt + first frame, empty past) is kept: the
        # calibrator reduces empty KV inputs without complaint.
        return sorted(self.frames + self.tokens, key=lambda s: (s.stream, s.step, s.kind))


def record_feeds(
    parent: Bundle, streams: list[np.ndarray], reply_tokens: int = 16, fps: float = 2.0,
    max_frame: int = 96, max_token: int = 32,
) -> FeedRecorder:
    """Run the parent's StreamCore (portable decoder) over the streams and sample its feeds."""
    if parent.manifest.graphs[parent.decoder_name].variant != "portable":
        raise ValueError(f"calibration needs a portable decoder, not {parent.decoder_name!r}")
    rec = FeedRecorder(max_frame, max_token)
    settings = settings_from_manifest(parent, max_reply_tokens=reply_tokens)
    core = StreamCore(parent, settings, observers=[rec])
    rec.decoder = core.dec
    for k, frames in enumerate(streams):
        rec.stream, rec.step = k, 0
        core.reset()
        for r in core.replay(frames, stream_messages(len(frames), fps, k), fps):
            rec.step = r.index + 1  # samples recorded during frame i+1's step carry i+1
    return rec


class FeedReader(CalibrationDataReader):
    """onnxruntime's calibration reader over recorded samples (or plain feed dicts)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:  # type: ignore[override]
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.feeds)


def vision_feeds(streams: list[np.ndarray], per_stream: int = 16) -> list[dict[str, np.ndarray]]:
    """Single frames spread over every stream, in the layout the runtime feeds (1, H, W, 3)."""
    out = []
    for s in streams:
        idx = np.linspace(0, len(s) - 1, min(per_stream, len(s))).astype(int)
        out += [{"frames": np.ascontiguousarray(s[i : i + 1])} for i in idx]
    return out


def replay_pair(
    a: Bundle, b: Bundle, stream: Stream, reply_tokens: int, fps: float,
) -> tuple[list[tuple[FrameResult, FrameResult]], ShadowDecoder]:
    """Both bundles' StreamCore over one stream in lockstep (end to end: B's own vision, table
    and replies), and B's decoder shadowing A's core (decoder alone, identical contexts).
    Returns the per-frame result pairs and the shadow, which holds its figures."""
    frames, messages, system = stream
    settings = settings_from_manifest(a, max_reply_tokens=reply_tokens)
    core_a = StreamCore(a, settings, system=system)
    shadow = ShadowDecoder(core_a, b, settings)
    core_a.observers.append(shadow)
    core_b = StreamCore(b, settings_from_manifest(b, max_reply_tokens=reply_tokens), system=system)
    pairs = list(zip(core_a.replay(frames, messages, fps), core_b.replay(frames, messages, fps), strict=True))
    return pairs, shadow
