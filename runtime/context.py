"""The rolling memory's rules: when the context is reduced, and how, exactly as ProAssist's own
streaming runner does it (`StreamInferenceRunner.run_inference_on_video` / `manage_kv_cache`).

Pure functions over lengths and strings, shared by the runtime core and the PyTorch reference
loop, so both reduce the same cache at the same frame:

* **when**: after a frame's step is complete (its decision, its reply and the reply's tokens in
  the cache), if the cache holds at least `max_seq_len - reserve` positions; never predicted
  from the next frame's inputs;
* `drop_all`: empty the cache; the next frame starts it (no system prompt), preceded only by
  what the previous step left to feed (a separator model's last token);
* `drop_middle`: keep the prefix (the whole cache right after the step that first received a
  user turn, its reply included) and the last `drop_middle_tail` positions after it; no prefix
  yet acts as drop_all; a cache shorter than the tail is kept whole;
* `summarize_and_drop`: ask for a progress summary with the frame just processed, empty the
  cache, and restart the next frame from one system message (`resume_content`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class ContextStrategy(str, Enum):
    DROP_ALL = "drop_all"
    DROP_MIDDLE = "drop_middle"
    SUMMARIZE_AND_DROP = "summarize_and_drop"


CONTEXT_STRATEGIES = tuple(s.value for s in ContextStrategy)
KNOWLEDGE_MARK = "Task knowledge:"  # how the authors' runner finds the knowledge message


@dataclass(frozen=True)
class Reduction:
    """What to do with the cache after a step. `keep` = (prefix_len, start, end) for drop_middle:
    keep [0, prefix_len) + [start, end)."""

    strategy: ContextStrategy
    keep: tuple[int, int, int] | None = None


def reduction(
    kv_len: int,
    prefix_len: int | None,
    strategy: ContextStrategy | str,
    max_seq_len: int,
    reserve: int,
    tail: int,
) -> Reduction | None:
    """The reduction due after a step that left `kv_len` positions in the cache, or None."""
    if kv_len < max_seq_len - reserve:
        return None
    strategy = ContextStrategy(strategy)
    if strategy is ContextStrategy.DROP_MIDDLE:
        if prefix_len is None:
            return Reduction(ContextStrategy.DROP_ALL)
        if kv_len < tail:
            return None  # the authors' "no need to drop"
        return Reduction(strategy, (prefix_len, max(kv_len - tail, prefix_len), kv_len))
    return Reduction(strategy)


def resume_content(system: str, summary: str, knowledge: str) -> str:
    """The system message that restarts the context after a summary: the initial system
    prompt, the summary and the task knowledge joined by single spaces, as the authors join
    them (a part is added only when the system prompt or knowledge is non-empty; the message
    formatter strips the ends)."""
    text = summary
    if system:
        text = f"{system} {text}"
    if knowledge:
        text = f"{text} {knowledge}"
    return text


def find_knowledge(found: str, messages: Iterable[tuple[str, str]]) -> str:
    """The task knowledge (kept once found): of the first step whose messages hold a system
    message containing "Task knowledge:", the last such message, as the authors' loop (which
    does not stop at the first) finds it. `messages`: one step's (role, content) pairs, the
    first step's beginning with the opening system message."""
    if found:
        return found
    hits = [content for role, content in messages if role == "system" and KNOWLEDGE_MARK in content]
    return hits[-1] if hits else ""
