"""Token assembly shared by every streaming loop: chat messages to ids, reply ids to text.

Pure Python over `tokenizers`: the runtime, the PyTorch reference loop and training all build
their sequences here, so a format change happens in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    # the authors' "diff" rule: talk when P(not talk) fell by more than this since the previous
    # decision, else silent iff P > 0.5; it replaces `threshold` (see decide_talk)
    diff_margin: float | None = None
    context_strategy: str = "summarize_and_drop"
    max_seq_len: int = 4096
    reserve: int = 128
    drop_middle_tail: int = 512
    max_reply_tokens: int = 100
    max_summary_tokens: int = 512
    # False, the authors' loop: a reply's final eos is not fed back; True feeds it, as training
    # sequences hold it (one more position per reply or summary that ends in eos)
    feed_eos: bool = False
    # restore the opening message's KV from the warm-start cache, computing it when missing
    # (runtime/warm.py); decisions and tokens are those of a cold start
    warm: bool = False

    def __post_init__(self) -> None:
        if self.context_strategy not in CONTEXT_STRATEGIES:
            raise ValueError(
                f"context strategy {self.context_strategy!r}: choose one of {CONTEXT_STRATEGIES}"
            )
        if self.max_seq_len <= self.reserve + 16:
            raise ValueError(f"max_seq_len {self.max_seq_len} leaves no room past the reserve")
        if self.diff_margin is not None and not 0.0 <= self.diff_margin < 1.0:
            raise ValueError(
                f"diff margin {self.diff_margin}: give a drop of P(not talk) in [0, 1), e.g. 0.1"
            )

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
        (258 tokens at the default; a longer user message there raises ContextOverflowError).
        With `feed_eos`, a reply and a summary that end in eos at their cap keep one position
        more each, so a fed eos always fits and the memory never cuts a reply short."""
        fed_eos = 2 if self.feed_eos else 0
        return (self.max_seq_len + self.max_reply_tokens + self.max_summary_tokens + self.reserve
                + fed_eos)


def decide_talk(
    p: float, prev_p: float | None, s: StreamSettings, lm_talks: Callable[[], bool] = lambda: True
) -> bool:
    """True to talk. Silent iff P(not talk) exceeds the threshold in force (the authors' rule,
    `fast_greedy_generate` in pro-assist/ProAssist).

    With the diff rule (their threshold "diff<margin>"), `prev_p` is the P of the previous
    decision append: the previous frame's, or the summary request's when a summary came between
    (their model keeps the last P of every call). A drop of more than the margin sets the
    threshold to 1 (talk); otherwise it is 0.5, whatever `s.threshold` is. With no previous P
    (a stream's first frame) it is 0.5: their code compares with the last P of the previous
    video there, or fails on the first video. A threshold <= 0 forces nothing in the authors'
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
        raw = self.tok.decode(list(ids), skip_special_tokens=False)
        return self.chat.reply_text(self.chat.decoded(raw))

    def step_text(self, pending: list[int], messages: Sequence[tuple[str, str]],
                  bos_first: bool) -> list[int]:
        """A step's text ids: what is pending, then the messages. `bos_first` (the first step of
        a stream that has no opening message): messages, if any, begin with bos, as the authors'
        first turn (`apply_chat_template`); with none, nothing does."""
        text = list(pending)
        if bos_first and messages and self.chat.bos:
            text += self.ids(self.chat.bos)
        for role, content in messages:
            text += self.message(role, content)
        return text

    def opening(self, system: str, knowledge: str = "") -> list[int]:
        return self.message("system", self.chat.system_content(system, knowledge), with_bos=True)

    def resume(self, system: str, summary: str, knowledge: str = "") -> list[int]:
        """The message that restarts the context after a summary, with the full chat template
        (so it begins with bos). `system` is the opening message's whole content."""
        return self.message("system", resume_content(system, summary, knowledge), with_bos=True)

    def summary_request(self) -> list[int]:
        # a mid-stream message: no bos (the authors' non-first-turn format)
        return self.message("system", self.chat.summary_request)
