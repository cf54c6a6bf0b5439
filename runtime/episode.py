"""The in-memory episode every data source yields (task world, written splits, ProAssist data)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import DataError

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
