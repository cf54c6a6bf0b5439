"""The PyTorch reference streaming loop: ProAssist's per-frame semantics, run the authors' way.

It is the oracle every exported or quantized path is compared against, and the baseline the
benchmarks beat. It keeps the Hugging Face KV cache exactly as the authors' code does (a growing
DynamicCache); the on-device runtime reproduces the same decisions with its own buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import DynamicCache

from proassist_edge.chat import ChatFormat
from proassist_edge.runtime.messages import FrameResult, TextMessage
from proassist_edge.runtime.prompt import (
    PromptBuilder,
    StreamSettings,
    decide_talk,
    drop_middle_keep,
    needs_reset,
)

from .model import ProAssistModel


class ReferenceLoop:
    def __init__(
        self,
        model: ProAssistModel,
        tokenizer: Tokenizer,
        chat: ChatFormat,
        settings: StreamSettings | None = None,
        system: str = "",
        knowledge: str = "",
    ) -> None:
        self.model = model.eval()
        self.pb = PromptBuilder(tokenizer, chat)
        self.s = settings or StreamSettings()
        self.system, self.knowledge = system, knowledge
        eos = tokenizer.token_to_id(chat.eos)
        if eos is None:
            raise ValueError(f"eos token {chat.eos!r} missing from the tokenizer")
        self.eos_id: int = eos
        self.reset()

    def reset(self) -> None:
        self.past: DynamicCache | None = None
        self.kv_len = 0
        self.prefix_len: int | None = None
        self.pending: list[int] = self.pb.opening(self.system, self.knowledge)
        self.prev_p: float | None = None

    # --- the cache -------------------------------------------------------------------------
    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.model(embeds, self.past)
        self.past = out.past  # type: ignore[assignment]
        self.kv_len += embeds.shape[1]
        self._last_p = float(out.p_not_talk[0, -1])
        return out.logits[0, -1]

    def _drop_middle(self) -> bool:
        keep = drop_middle_keep(self.kv_len, self.prefix_len or 0, self.s)
        if keep is None or self.past is None:
            return False
        start, end, pre = keep[0], keep[1], self.prefix_len or 0
        layers = [
            (
                torch.cat([layer.keys[:, :, :pre], layer.keys[:, :, start:end]], dim=2),
                torch.cat([layer.values[:, :, :pre], layer.values[:, :, start:end]], dim=2),
            )
            for layer in cast(Any, self.past).layers  # Llama: full-attention layers only
        ]
        self.past = DynamicCache(ddp_cache_data=layers)
        self.kv_len = pre + end - start
        return True

    def _drop_all(self) -> None:
        self.past, self.kv_len = None, 0

    # --- decoding ----------------------------------------------------------------------------
    def _greedy(self, logits: torch.Tensor, cap: int) -> list[int]:
        """Greedy decode; the first token may not be the not-talk token. Generated tokens stay
        in the cache; the final eos is fed back only with feed_eos."""
        logits = logits.clone()
        logits[self.model.not_talk_id] = -float("inf")
        ids: list[int] = []
        for i in range(cap):
            t = int(torch.argmax(logits))
            ids.append(t)
            done = t == self.eos_id or i == cap - 1 or self.kv_len >= self.s.max_seq_len
            if done and not (
                t == self.eos_id and self.s.feed_eos and self.kv_len < self.s.max_seq_len
            ):
                break
            logits = self._forward(self.model.embed_ids(torch.tensor([[t]])))
            if done:
                break
        return ids

    # --- one step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self, frames: np.ndarray, index: int, t: float, messages: Sequence[TextMessage] = ()
    ) -> FrameResult:
        """Append k frames (k, h, w, 3) and the pending messages; decide; maybe speak."""
        text = list(self.pending)
        for m in messages:
            text += self.pb.message(m.role, m.content)
        tokens = self.model.encode_frames(torch.from_numpy(np.ascontiguousarray(frames)))
        n = len(text) + tokens.shape[0] * tokens.shape[1]
        reset = None
        if self.kv_len and needs_reset(self.kv_len, n, self.s):
            reset = self.s.context_strategy
            if reset == "summarize_and_drop":
                return self._summarize(text, tokens, index, t)
            if reset == "drop_middle" and self._drop_middle():
                pass
            else:
                reset = "drop_all"
                self._drop_all()
        self.pending = []
        if self.prefix_len is None:
            self.prefix_len = len(text)
        embeds = torch.cat(
            [
                self.model.embed_ids(torch.tensor([text], dtype=torch.long)),
                tokens.reshape(1, -1, tokens.shape[-1]),
            ],
            1,
        )
        logits = self._forward(embeds)
        p = self._last_p
        talk = decide_talk(p, self.prev_p, self.s)
        self.prev_p = p
        ids = self._greedy(logits, self.s.max_reply_tokens) if talk else []
        reply = self.pb.reply_text(ids) if talk else ""
        return FrameResult(index, t, p, talk, reply, tuple(ids), self.kv_len, None, reset)

    def _summarize(
        self, text: list[int], tokens: torch.Tensor, index: int, t: float
    ) -> FrameResult:
        """Ask for a progress summary with the current frame, then restart from it."""
        ids = text + self.pb.summary_request()
        embeds = torch.cat(
            [
                self.model.embed_ids(torch.tensor([ids], dtype=torch.long)),
                tokens.reshape(1, -1, tokens.shape[-1]),
            ],
            1,
        )
        logits = self._forward(embeds)
        p = self._last_p
        self.prev_p = p
        cap = max(1, min(self.s.max_summary_tokens, self.s.max_seq_len - self.kv_len))
        out = self._greedy(logits, cap)
        summary = self.pb.reply_text(out)
        self._drop_all()
        self.pending = self.pb.resume(self.system, summary, self.knowledge)
        return FrameResult(
            index, t, p, False, "", tuple(out), self.kv_len, summary, "summarize_and_drop"
        )

    def run(
        self, frames: np.ndarray, messages: Iterable[TextMessage] = (), fps: float = 2.0
    ) -> list[FrameResult]:
        """Process every frame in order, one per step; messages enter before the frame at or
        after their time."""
        queue = sorted(messages, key=lambda m: m.t)
        results = []
        for i in range(len(frames)):
            t = i / fps
            due = [m for m in queue if m.t <= t + 1e-9]
            queue = queue[len(due) :]
            results.append(self.step(frames[i : i + 1], i, t, due))
        return results
