"""The in-memory episode every data source yields (task world, written splits, episode folders,
ProAssist data), and the readers of written episodes.

An episode folder (`replay --episode DIR`) holds the frames, either `frames.npy` (uint8,
N x H x W x 3 or N x 3 x H x W) or images (a `frames/` subfolder, else the folder itself) read
in natural name order, and `conversation.json` in ProAssist's format: a list of turns, or a dict
with key "conversation" (and optionally "metadata", "fps", "start_frame_idx"). `metadata.json`
may add `knowledge`/`fps`. A replay feeds that knowledge after the system prompt; the "knowledge"
of a ProAssist sample's own "metadata" is not fed (the authors' runner reads knowledge only from
the conversation, and their samples carry it in the metadata even where the dialogue has none).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import DataError
from proassist_edge.runtime.conversation import ConversationInputs, parse_conversation

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Turn = dict[str, Any]


@dataclass
class Episode:
    """One video with its dialogue, in the ProAssist conversation format.

    frames: uint8 (N, H, W, 3) RGB at `fps`; conversation: turns `{"role": "system"|"user"|
    "assistant", "content": str}` and `{"role": "frames", "start": i, "end": j}` (end exclusive,
    indices into `frames`); an assistant turn answers the last frame before it.
    """

    uid: str
    frames: np.ndarray = field(repr=False)
    conversation: list[Turn]
    metadata: dict[str, Any]
    fps: float = 2.0

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def task(self) -> str:
        return str(self.metadata.get("task", self.metadata.get("task_goal", "")))

    def reference(self) -> list[str]:
        """Per frame, what the assistant says after it ("" when silent)."""
        return reference_per_frame(self.conversation, self.num_frames)


def reference_per_frame(conversation: list[Turn], num_frames: int) -> list[str]:
    """Per frame the reference utterance ("" = silent), as the evaluation metrics need it.

    An assistant turn belongs to the last frame shown before it (frame j-1 after a frames turn
    ending at j); one before any frame belongs to frame 0. Two turns on one frame are joined.
    """
    out = [""] * num_frames
    last = 0
    for turn in conversation:
        role = turn.get("role")
        if role == "frames":
            last = max(int(turn["end"]) - 1, 0)
        elif role == "assistant" and num_frames:
            i = min(last, num_frames - 1)
            text = str(turn.get("content", "")).strip()
            out[i] = f"{out[i]} {text}".strip() if out[i] else text
    return out


# --- a split folder: index.jsonl and one episode folder per entry -------------------------
def load_split_entry(split_dir: str | Path, entry: dict[str, Any]) -> Episode:
    """One episode named by an index.jsonl entry."""
    ep_dir = Path(split_dir) / str(entry["dir"])
    try:
        frames = np.load(ep_dir / "frames.npy")
        conversation = json.loads((ep_dir / "conversation.json").read_text())
        metadata = json.loads((ep_dir / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"episode {entry.get('episode')} in {ep_dir} is unreadable ({e}): "
                        "regenerate the split with `proassist-edge taskworld generate`") from e
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DataError(f"{ep_dir / 'frames.npy'}: expected uint8 (N, H, W, 3), got "
                        f"{frames.dtype} {frames.shape}; regenerate the split")
    if frames.shape[0] != int(entry.get("num_frames", frames.shape[0])):
        raise DataError(f"{ep_dir}: index says {entry['num_frames']} frames, frames.npy has "
                        f"{frames.shape[0]}; regenerate the split")
    return Episode(str(entry["episode"]), frames, conversation, metadata,
                   float(entry.get("fps", 2.0)))


def read_index(split_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(split_dir) / "index.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: write a split there with "
                        "`proassist-edge taskworld generate --split test -o DIR`")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON lines ({e}); regenerate the split") from e


def read_split(split_dir: str | Path) -> Iterator[Episode]:
    """The episodes of a split written by generate_split, in index order."""
    for entry in read_index(split_dir):
        yield load_split_entry(split_dir, entry)


# --- an episode folder --------------------------------------------------------------------------
def _natural_key(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def load_frames(episode: Path) -> np.ndarray:
    """The episode folder's frames as uint8 (N, H, W, 3) RGB."""
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


def _shifted(turns: list[Turn], offset: int) -> list[Turn]:
    """Frames turns re-indexed from `start_frame_idx` (the clip's first frame) to 0."""
    out = []
    for i, turn in enumerate(turns):
        if turn.get("role") == "frames":
            try:
                turn = {**turn, **{k: int(turn[k]) - offset for k in ("start", "end") if k in turn}}
            except (TypeError, ValueError) as e:
                raise DataError(f"conversation turn {i} (frames): 'start'/'end' not integers") from e
        out.append(turn)
    return out


def load_episode(episode_dir: str | Path) -> Episode:
    """An episode folder as an Episode (uid: the folder's name; metadata: conversation.json's
    "metadata" updated by metadata.json). `episode_inputs` says what a replay feeds from it."""
    root = Path(episode_dir)
    if not root.is_dir():
        raise DataError(f"episode folder {root} does not exist")
    frames = load_frames(root)
    conv_path = root / "conversation.json"
    data: Any = _read_json(conv_path) if conv_path.is_file() else []
    meta: dict[str, Any] = {}
    if isinstance(data, dict):  # a ProAssist sample: its metadata knowledge is not fed
        meta.update({k: v for k, v in (data.get("metadata") or {}).items() if k != "knowledge"})
        turns = data.get("conversation", [])
    else:
        turns = data
    if (root / "metadata.json").is_file():
        meta.update(_read_json(root / "metadata.json"))
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{conv_path}: expected a list of turns or {{'conversation': [...]}}")
    fps = float(meta.get("fps") or (data.get("fps") if isinstance(data, dict) else None) or 2.0)
    offset = int(data.get("start_frame_idx", 0)) if isinstance(data, dict) else 0
    turns = _shifted(turns, offset) if offset else turns
    parse_conversation(turns, fps, len(frames))  # a bad turn fails here, at loading
    return Episode(root.name, frames, turns, meta, fps)


def episode_inputs(ep: Episode) -> ConversationInputs:
    """What a replay of the episode feeds the core: its conversation as parse_conversation reads
    it (turns past the last frame dropped), with the task knowledge of its metadata kept apart.
    Data that already merged the knowledge into the system turn has it split off again, so the
    opening is system + "\n\n" + knowledge once (the same opening message either way)."""
    conv = parse_conversation(ep.conversation, ep.fps, ep.num_frames)
    knowledge = str(ep.metadata.get("knowledge") or "")
    suffix = "\n\n" + knowledge
    system = conv.system
    if conv.has_system and knowledge and system.endswith(suffix):
        system = system[: -len(suffix)]
    return replace(conv, system=system, knowledge=knowledge)
