"""ProAssist conversations (system/user/assistant turns and `frames` spans) as stream inputs.

One reading, shared by replay, evaluation, calibration, the demo and training, so they all see
the same sequence: the first system turn, when it comes before any frames and any other turn,
is the opening system message, verbatim (task knowledge, when a dataset has it, is already part
of it); later system and user turns enter before the next frame, at that frame's time; assistant
turns are the reference replies to the last frame before them. `MessageSchedule` is the one
rule for which timed messages go with a frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proassist_edge.errors import DataError
from proassist_edge.runtime.messages import TextMessage

DUE_SLACK = 1e-9  # a message at a frame's time (float division) goes with that frame


@dataclass
class ConversationInputs:
    system: str  # "" when there is no opening system turn (has_system False)
    messages: list[TextMessage] = field(default_factory=list)  # timed: t = frame index / fps
    replies: dict[int, str] = field(default_factory=dict)  # frame index -> reference reply
    message_frames: list[int] = field(default_factory=list)  # frame index each message precedes
    has_system: bool = True  # False: no opening system turn (a replay uses the bundle's own)
    knowledge: str = ""  # task knowledge kept apart from `system` (episode_inputs)


def _start(turn: Mapping[str, Any], i: int) -> int:
    try:
        return int(turn["start"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"conversation turn {i} (frames) has no integer 'start'") from e


def _content(turn: Mapping[str, Any], i: int) -> str:
    content = turn.get("content")
    if not isinstance(content, str):
        raise DataError(f"conversation turn {i} ({turn.get('role')}) has no text 'content'")
    return content


def parse_conversation(
    turns: Iterable[Mapping[str, Any]], fps: float = 2.0, num_frames: int | None = None
) -> ConversationInputs:
    """The conversation as stream inputs. With `num_frames`, turns due at or after that frame
    (past the video) are dropped. Raises DataError on an unknown role, a frames turn without an
    integer start, or a system or user turn without text."""
    system: str | None = None
    pending: list[tuple[str, str]] = []
    out = ConversationInputs(system="")
    seen_frames = False
    last_frame = 0
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role == "frames":
            start = _start(turn, i)
            seen_frames = True
            if num_frames is None or start < num_frames:
                for r, c in pending:
                    out.messages.append(TextMessage(r, c, t=start / fps))  # type: ignore[arg-type]
                    out.message_frames.append(start)
            pending = []
            last_frame = max(int(turn.get("end", start + 1)) - 1, start)
        elif role in ("system", "user"):
            content = _content(turn, i)
            if role == "system" and system is None and not seen_frames and not pending:
                system = content
            else:
                pending.append((str(role), content))
        elif role == "assistant":  # an output, not an input: read as leniently as ever
            text = str(turn.get("content", "")).strip()
            prev = out.replies.get(last_frame)
            out.replies[last_frame] = f"{prev} {text}" if prev else text
        else:
            raise DataError(f"conversation turn {i} has an unknown role {role!r}")
    out.system = system or ""
    out.has_system = system is not None
    return out


class MessageSchedule:
    """Which timed messages go with a frame: every message not yet handed out whose time is at
    or before the frame's (within DUE_SLACK), in time order (ties in the order given). The one
    rule for the core's replay, the replay command, the bench and the demo's message feed."""

    def __init__(self, messages: Iterable[TextMessage]) -> None:
        self._queue = sorted(messages, key=lambda m: m.t)

    def due(self, t: float) -> list[TextMessage]:
        """The messages due by stream time `t`, each once."""
        n = 0
        while n < len(self._queue) and self._queue[n].t <= t + DUE_SLACK:
            n += 1
        out, self._queue = self._queue[:n], self._queue[n:]
        return out

    def __len__(self) -> int:
        return len(self._queue)
