"""Token assembly shared by every streaming loop: chat messages to ids, reply ids to text.

Pure Python over `tokenizers`: the runtime, the PyTorch reference loop and training all build
their sequences here, so a format change happens in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from proassist_edge.chat import ChatFormat


@dataclass(frozen=True)
class StreamSettings:
    """How a stream runs: the decision rule, the context strategy and the caps."""

    threshold: float = 0.5
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


CONTEXT_STRATEGIES = ("drop_all", "drop_middle", "summarize_and_drop")


def decide_talk(p: float, prev_p: float | None, s: StreamSettings) -> bool:
    """True to talk. Silent iff P(not talk) exceeds the threshold in force (the authors' rule).

    With the diff rule, a drop of more than `diff_margin` since the previous frame forces talk;
    otherwise the threshold is 0.5.
    """
    if s.diff_margin is None:
        return not p > s.threshold
    if prev_p is not None and prev_p - p > s.diff_margin:
        return True
    return not p > 0.5


def needs_reset(kv_len: int, incoming: int, s: StreamSettings) -> bool:
    """The context strategy runs when the cache would pass max_seq_len - reserve."""
    return kv_len + incoming > s.max_seq_len - s.reserve


def drop_middle_keep(kv_len: int, prefix_len: int, s: StreamSettings) -> tuple[int, int] | None:
    """The span [start, kv_len) kept after the prefix, or None when drop_middle cannot shorten."""
    if kv_len <= prefix_len + s.drop_middle_tail:
        return None
    return kv_len - s.drop_middle_tail, kv_len


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, chat: ChatFormat) -> None:
        self.tok = tokenizer
        self.chat = chat
        self._cache: dict[tuple[str, str, bool], list[int]] = {}

    def ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def message(self, role: str, content: str, with_bos: bool = False) -> list[int]:
        key = (role, content, with_bos)
        if key not in self._cache:
            self._cache[key] = self.ids(self.chat.render(role, content, with_bos))
        return self._cache[key]

    def reply_text(self, ids: list[int] | tuple[int, ...]) -> str:
        return self.chat.reply_text(self.tok.decode(list(ids), skip_special_tokens=False))

    def opening(self, system: str, knowledge: str = "") -> list[int]:
        return self.message("system", self.chat.system_content(system, knowledge), with_bos=True)

    def resume(self, system: str, summary: str, knowledge: str = "") -> list[int]:
        content = self.chat.resume_content(system, summary, knowledge)
        return self.message("system", content, with_bos=True)

    def summary_request(self) -> list[int]:
        # The authors format it with the full chat template, so it starts with bos again.
        return self.message("system", self.chat.summary_request, with_bos=True)
