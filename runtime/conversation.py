"""ProAssist conversations (system/user/assistant turns and `frames` spans) as stream inputs.

One reading, shared by replay, evaluation and training, so the three see the same sequence:
the first system turn is the opening system message, verbatim (task knowledge, when a dataset
has it, is already part of it); later system and user turns enter before the next frame, at
that frame's time; assistant turns are the reference replies to the last frame before them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from proassist_edge.runtime.messages import TextMessage


@dataclass
class ConversationInputs:
    system: str
    messages: list[TextMessage] = field(default_factory=list)  # timed: t = frame index / fps
    replies: dict[int, str] = field(default_factory=dict)  # frame index -> reference reply
    message_frames: list[int] = field(default_factory=list)  # frame index each message precedes


def parse_conversation(turns: Iterable[dict[str, Any]], fps: float = 2.0) -> ConversationInputs:
    system: str | None = None
    pending: list[tuple[str, str]] = []
    out = ConversationInputs(system="")
    last_frame = 0
    for turn in turns:
        role = turn.get("role")
        if role == "frames":
            start = int(turn["start"])
            for r, c in pending:
                out.messages.append(TextMessage(r, c, t=start / fps))  # type: ignore[arg-type]
                out.message_frames.append(start)
            pending = []
            last_frame = max(int(turn["end"]) - 1, start)
        elif role == "system" and system is None and not out.messages and not pending:
            system = str(turn.get("content", ""))
        elif role in ("system", "user"):
            pending.append((str(role), str(turn.get("content", ""))))
        elif role == "assistant":
            text = str(turn.get("content", "")).strip()
            prev = out.replies.get(last_frame)
            out.replies[last_frame] = f"{prev} {text}" if prev else text
    out.system = system or ""
    return out
