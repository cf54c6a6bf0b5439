"""The in-memory episode every data source yields (task world, written splits, ProAssist data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
