"""Every message that flows between stages: small frozen dataclasses, nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Role = Literal["system", "user"]


@dataclass(frozen=True)
class Frame:
    """One camera frame: uint8 RGB pixels (H, W, 3), its index and capture time (seconds)."""

    index: int
    t: float
    pixels: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class TextMessage:
    """A user or system message that enters the context before the next frame."""

    role: Role
    content: str
    t: float = 0.0


@dataclass(frozen=True)
class Utterance:
    """Something the assistant says: one sentence-sized piece of a reply."""

    text: str
    t_frame: float
    t_decided: float
    final: bool = True
    reply_id: int = 0


@dataclass(frozen=True)
class FrameResult:
    """What the core concluded for one frame step (the oracle's and the runtime's unit).

    `context_len` is the cache length after the step, its reply included; `reset` names the
    context reduction that followed the step, and `summary` (with `summary_ids`) the progress
    summary that summarize_and_drop generated then."""

    index: int
    t: float
    p_not_talk: float
    talk: bool
    text: str = ""
    token_ids: tuple[int, ...] = ()
    context_len: int = 0
    summary: str | None = None
    reset: str | None = None
    summary_ids: tuple[int, ...] = ()
