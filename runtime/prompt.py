"""Token assembly shared by every streaming loop: chat messages to ids, reply ids to text.

Pure Python over `tokenizers`: the runtime, the PyTorch reference loop and training all build
their sequences here, so a format change happens in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer

from proassist_edge.chat import ChatFormat
from proassist_edge.manifest import DEFAULT_THRESHOLD
from proassist_edge.runtime.context import CONTEXT_STRATEGIES, ContextStrategy, resume_content

__all__ = ["CONTEXT_STRATEGIES", "PromptBuilder", "StreamSettings", "decide_talk"]


@dataclass(frozen=True)
class StreamSettings:
    """How a stream runs: the decision rule, the context strategy and the caps."""

    threshold: float = DEFAULT_THRESHOLD
    diff_margin: float | None = None  # the "diff" rule: talk when P drops by more than this
    context_strategy: str = "summarize_and_drop"
    max_seq_len: int = 4096
    reserve: int = 128
    drop_middle_tail: int = 512
    max_reply_tokens: int = 100
    max_summary_tokens: int = 512
    feed_eos: bool = False  # authors' default: the final eos of a reply is not fed back

    def __post_init__(self) -> None:
        if self.context_strategy not in CONTEXT_STRATEGIES:
            raise ValueError(
                f"context strategy {self.context_strategy!r}: choose one of {CONTEXT_STRATEGIES}"
            )
        if self.max_seq_len <= self.reserve + 16:
            raise ValueError(f"max_seq_len {self.max_seq_len} leaves no room past the reserve")

    @property
    def strategy(self) -> ContextStrategy:
        return ContextStrategy(self.context_strategy)

    @property
    def kv_capacity(self) -> int:
        """KV positions a stream can need. The reduction runs only after a step, on a cache of
        at least max_seq_len - reserve, so the worst case is a cache one short of that, a
        step's inputs and a whole reply, then the summary request with the frame again and a
        whole summary: max_seq_len + the reply + the summary + one reserve more holds it
        while a step's inputs and the summary request together stay within twice the reserve
        (258 tokens at the default; a longer user message there raises ContextOverflowError)."""
        return self.max_seq_len + self.max_reply_tokens + self.max_summary_tokens + self.reserve


def decide_talk(
    p: float, prev_p: float | None, s: StreamSettings, lm_talks: Callable[[], bool] = lambda: True
) -> bool:
    """True to talk. Silent iff P(not talk) exceeds the threshold in force (the authors' rule).

    With the diff rule, a drop of more than `diff_margin` since the previous frame sets the
    threshold to 1 (talk); otherwise it is 0.5. A threshold <= 0 forces nothing in the authors'
    loop: the LM's own greedy choice decides (`lm_talks`: its argmax is not the not-talk token).
    """
    threshold = s.threshold
    if s.diff_margin is not None:
        threshold = 1.0 if prev_p is not None and prev_p - p > s.diff_margin else DEFAULT_THRESHOLD
    if threshold <= 0:
        return lm_talks()
    return not p > threshold


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, chat: ChatFormat) -> None:
        self.tok = tokenizer
        self.chat = chat
        self._cache: dict[tuple[str, str, bool], list[int]] = {}

    def ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def message(self, role: str, content: str, with_bos: bool = False) -> list[int]:
        """A formatted message's ids; the content's ends are stripped, as the authors do."""
        key = (role, content, with_bos)
        if key not in self._cache:
            self._cache[key] = self.ids(self.chat.render(role, content.strip(), with_bos))
        return self._cache[key]

    def reply_text(self, ids: list[int] | tuple[int, ...]) -> str:
        return self.chat.reply_text(self.tok.decode(list(ids), skip_special_tokens=False))

    def opening(self, system: str, knowledge: str = "") -> list[int]:
        return self.message("system", self.chat.system_content(system, knowledge), with_bos=True)

    def resume(self, system: str, summary: str, knowledge: str = "") -> list[int]:
        """The message that restarts the context after a summary, with the full chat template
        (so it begins with bos). `system` is the opening message's whole content."""
        return self.message("system", resume_content(system, summary, knowledge), with_bos=True)

    def summary_request(self) -> list[int]:
        # a mid-stream message: no bos (the authors' non-first-turn format)
        return self.message("system", self.chat.summary_request)
