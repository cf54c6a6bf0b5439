"""Deterministic replay of a recorded episode: every frame in order, one step each, none dropped.

An episode folder holds the frames, either `frames.npy` (uint8, N x H x W x 3 or N x 3 x H x W)
or images (a `frames/` subfolder, else the folder itself) read in natural name order, and
`conversation.json` in ProAssist's format: a list of turns, or a dict with key "conversation"
(and optionally "metadata", "fps", "start_frame_idx"). `metadata.json` may add `knowledge`/`fps`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from proassist_edge.errors import DataError
from proassist_edge.events import (
    ErrorEvent,
    MessageEvent,
    ReplayStartEvent,
    ReplayStopEvent,
    UtteranceEvent,
)
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import NonFiniteOutputError, StreamCore, settings_from_manifest
from proassist_edge.runtime.events import EventBus, EventLog, Observer, frame_event, reduction_events
from proassist_edge.runtime.messages import FrameResult, TextMessage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Episode(NamedTuple):
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    messages: list[TextMessage]  # timed user/system messages after the opening
    system: str | None  # the opening system prompt (None: the bundle's default)
    knowledge: str
    fps: float


def _natural_key(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def load_frames(episode: Path) -> np.ndarray:
    """The episode's frames as uint8 (N, H, W, 3) RGB."""
    npy = episode / "frames.npy"
    if npy.is_file():
        try:
            frames = np.load(npy)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {npy}: {e}") from e
        if frames.dtype != np.uint8 or frames.ndim != 4:
            raise DataError(f"{npy} must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
        if frames.shape[-1] != 3 and frames.shape[1] == 3:
            frames = frames.transpose(0, 2, 3, 1)  # (N, 3, H, W) -> (N, H, W, 3)
        if frames.shape[-1] != 3:
            raise DataError(f"{npy} has shape {frames.shape}: want N x H x W x 3 or N x 3 x H x W")
        return np.ascontiguousarray(frames)
    folder = episode / "frames" if (episode / "frames").is_dir() else episode
    paths = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key
    )
    if not paths:
        raise DataError(f"{episode} has no frames.npy and no images ({', '.join(IMAGE_SUFFIXES)})")
    return _read_images(paths)


def _read_images(paths: Sequence[Path]) -> np.ndarray:
    try:
        import cv2
    except ImportError as e:
        raise DataError(
            "reading an image folder needs OpenCV: pip install opencv-python-headless, "
            "or save the frames as frames.npy"
        ) from e
    images: list[np.ndarray] = []
    for p in paths:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError(f"cannot decode image {p}")
        if images and bgr.shape != images[0].shape:
            raise DataError(f"{p} is {bgr.shape[:2]}, earlier frames are {images[0].shape[:2]}")
        images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return np.stack(images)


def parse_conversation(
    turns: Sequence[Mapping[str, Any]], fps: float, n_frames: int, offset: int = 0
) -> tuple[str | None, list[TextMessage]]:
    """(opening system prompt, timed messages). The first system turn before any frames is the
    system prompt; later system/user turns are due with the next frames turn, at its start
    index / fps; assistant turns are outputs, not inputs; turns after the last frame are dropped.
    """
    system: str | None = None
    waiting: list[tuple[str, str]] = []
    messages: list[TextMessage] = []
    seen_frames = False
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role == "frames":
            try:
                start = int(turn["start"]) - offset
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"conversation turn {i} (frames) has no integer 'start'") from e
            seen_frames = True
            if start < n_frames:
                messages += [TextMessage(r, c, start / fps) for r, c in waiting]  # type: ignore[arg-type]
            waiting = []
        elif role in ("system", "user"):
            content = turn.get("content")
            if not isinstance(content, str):
                raise DataError(f"conversation turn {i} ({role}) has no text 'content'")
            if role == "system" and system is None and not seen_frames and not waiting:
                system = content
            else:
                waiting.append((role, content))
        elif role != "assistant":
            raise DataError(f"conversation turn {i} has an unknown role {role!r}")
    return system, messages


def load_episode(episode_dir: str | Path) -> Episode:
    """Frames, timed messages, system prompt, task knowledge and fps of an episode folder."""
    root = Path(episode_dir)
    if not root.is_dir():
        raise DataError(f"episode folder {root} does not exist")
    frames = load_frames(root)
    conv_path = root / "conversation.json"
    data: Any = _read_json(conv_path) if conv_path.is_file() else []
    meta: dict[str, Any] = {}
    if isinstance(data, dict):
        meta.update(data.get("metadata") or {})
        turns = data.get("conversation", [])
    else:
        turns = data
    if (root / "metadata.json").is_file():
        meta.update(_read_json(root / "metadata.json"))
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{conv_path}: expected a list of turns or {{'conversation': [...]}}")
    fps = float(meta.get("fps") or (data.get("fps") if isinstance(data, dict) else None) or 2.0)
    offset = int(data.get("start_frame_idx", 0)) if isinstance(data, dict) else 0
    knowledge = str(meta.get("knowledge") or "")
    system, messages = parse_conversation(turns, fps, len(frames), offset)
    # Data that already merged the knowledge into the system turn: split it off again, so the
    # opening is system + "\n\n" + knowledge once (the same opening message either way).
    suffix = "\n\n" + knowledge
    if system is not None and knowledge and system.endswith(suffix):
        system = system[: -len(suffix)]
    return Episode(frames, messages, system, knowledge, fps)


def replay_results(
    core: StreamCore, frames: np.ndarray, messages: Sequence[TextMessage], fps: float,
    bus: EventBus | None = None,
) -> Iterator[FrameResult]:
    """One step per frame in order (messages due at or before a frame go with it), with events.

    A frame whose step gave a non-finite output is reported and yields a silent result with
    P(not talk) NaN; the memory is as before that step.
    """
    queue = sorted(messages, key=lambda m: m.t)
    for i in range(len(frames)):
        t = i / fps
        due = [m for m in queue if m.t <= t + 1e-9]
        queue = queue[len(due) :]
        for m in due:
            if bus is not None:
                bus.emit(MessageEvent(role=m.role, content=m.content, t=t))
        t0 = time.perf_counter()
        try:
            r = core.step(frames[i : i + 1], i, t, due)
        except NonFiniteOutputError as e:
            r = FrameResult(i, t, float("nan"), False, context_len=core.kv_len)
            if bus is not None:
                bus.emit(ErrorEvent(kind=type(e).__name__, error=str(e), fatal=False,
                                    skipped=True, index=i, t=t))
                bus.emit(frame_event(r, skipped=True))
            yield r
            continue
        if bus is not None:
            bus.emit(frame_event(r, step_ms=1e3 * (time.perf_counter() - t0)))
            if r.text:
                bus.emit(UtteranceEvent(text=r.text, t_frame=t, t_decided=time.monotonic(),
                                        index=i))
            for event in reduction_events(r):
                bus.emit(event)
        yield r


def replay_episode(
    bundle_path: str | Path,
    episode_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    events_path: str | Path | None = None,
    decoder: str | None = None,
    *,
    console: bool = False,
    observers: Sequence[Observer] = (),
    threads: int = 0,
) -> list[FrameResult]:
    """Replay an episode through a bundle; writes `frame` records (and start/stop, utterance,
    message, context_reset, summary, error) to `events_path` as JSONL. Settings overrides are
    StreamSettings fields (threshold, context_strategy, max_seq_len, max_reply_tokens, ...)."""
    episode = load_episode(episode_dir)
    bundle = open_bundle(bundle_path, decoder, threads=threads)
    settings = settings_from_manifest(bundle, **dict(overrides or {}))
    core = StreamCore(bundle, settings, episode.system, episode.knowledge)
    log = EventLog(events_path, console)
    bus = EventBus([log, *observers])
    t0 = time.monotonic()
    bus.emit(ReplayStartEvent(
        bundle=str(bundle_path), decoder=bundle.decoder_name, episode=str(episode_dir),
        frames=len(episode.frames), fps=episode.fps, settings=asdict(settings),
        system=core.system, knowledge=core.knowledge,
    ))
    reason = "error"
    try:
        results = list(replay_results(core, episode.frames, episode.messages, episode.fps, bus))
        reason = "end_of_episode"
    finally:
        bus.emit(ReplayStopEvent(reason=reason, frames=len(episode.frames),
                                 wall_s=time.monotonic() - t0, event_write_errors=log.write_errors))
        log.close()
    return results
