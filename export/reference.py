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
from proassist_edge.export.model import ProAssistModel
from proassist_edge.runtime.backend import StepOut
from proassist_edge.runtime.context import ContextStrategy, find_knowledge, reduction
from proassist_edge.runtime.core import SUMMARY_THRESHOLD, fed_token
from proassist_edge.runtime.messages import FrameResult, TextMessage
from proassist_edge.runtime.prompt import PromptBuilder, StreamSettings, decide_talk
from proassist_edge.runtime.stages import Stage, StageName, StageObserver


class ReferenceLoop:
    """ProAssist's streaming runner in PyTorch: the same step and the same context rules as the
    runtime core (runtime/context.py), on a Hugging Face cache."""

    def __init__(
        self,
        model: ProAssistModel,
        tokenizer: Tokenizer,
        chat: ChatFormat,
        settings: StreamSettings | None = None,
        system: str = "",
        knowledge: str = "",
        observers: Sequence[StageObserver] = (),
        opening: bool = True,
    ) -> None:
        self.model = model.eval()
        # told about each stage as the runtime core tells its own (runtime/stages.py): the
        # benchmark times the PyTorch loop with the same observer as ours
        self.observers: list[StageObserver] = list(observers)
        self.pb = PromptBuilder(tokenizer, chat)
        self.s = settings or StreamSettings()
        self.system, self.knowledge = system, knowledge
        self.open = opening  # False: no opening message (runtime/core.py's StreamCore)
        # a separator model's not-talk token is its frame separator (proassist-reference.md)
        self.sep = model.not_talk_id if model.cfg.img_sep_token else None
        eos = tokenizer.token_to_id(chat.eos)
        if eos is None:
            raise ValueError(f"eos token {chat.eos!r} missing from the tokenizer")
        self.eos_id: int = eos
        self.reset()

    def reset(self) -> None:
        self.past: DynamicCache | None = None
        self.kv_len = 0
        self.opening = self.pb.chat.system_content(self.system, self.knowledge) if self.open else ""
        self.task_knowledge = ""  # found by the first step, whose messages follow the opening
        self.first_step = True
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # drop_middle's
        self.pending: list[int] = self.pb.opening(self.system, self.knowledge) if self.open else []
        self.prev_p: float | None = None
        self.fed_last = True

    # --- the cache -------------------------------------------------------------------------
    def _forward(
        self, embeds: torch.Tensor, name: StageName = "decode", ids: Sequence[int] = (),
        frames: np.ndarray | None = None,
    ) -> torch.Tensor:
        """One append; observers see its stage as the runtime core's (the ids and frames its
        inputs were made of) and its output as a StepOut (float32 numpy)."""
        stage = Stage(name, int(embeds.shape[1]), ids=tuple(ids), frames=frames)
        self._notify_started(stage)
        out = self.model(embeds, self.past)
        self.past = out.past  # type: ignore[assignment]
        self.kv_len += embeds.shape[1]
        self._last_p = float(out.p_not_talk[0, -1])
        if self.observers:
            step = StepOut(out.logits[0, -1].float().numpy(), out.hidden[0, -1].float().numpy(),
                           self._last_p)
            for o in self.observers:
                o.stage_ended(stage, step)
        return out.logits[0, -1]

    def _notify_started(self, stage: Stage) -> None:
        for o in self.observers:
            o.stage_started(stage)

    def _notify(self, stage: Stage) -> None:
        """A change of the memory (reset, keep): told before and after, as the core does."""
        self._notify_started(stage)
        for o in self.observers:
            o.stage_ended(stage, None)

    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        stage = Stage("encode", len(frames), frames=frames)
        for o in self.observers:
            o.stage_started(stage)
        tokens = self.model.encode_frames(torch.from_numpy(np.ascontiguousarray(frames)))
        for o in self.observers:
            o.stage_ended(stage, None)
        return tokens

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        assert self.past is not None
        return [(la.keys, la.values) for la in cast(Any, self.past).layers]  # full attention only

    def _drop_middle(self, start: int, end: int) -> None:
        """The kept prefix (a snapshot taken when it was captured, as the authors keep the
        cache object of that step) followed by positions [start, end) of the cache."""
        assert self.prefix is not None
        layers = [
            (torch.cat([pk, k[:, :, start:end]], dim=2), torch.cat([pv, v[:, :, start:end]], dim=2))
            for (pk, pv), (k, v) in zip(self.prefix, self._layers(), strict=True)
        ]
        self.past = DynamicCache(ddp_cache_data=layers)
        self.kv_len = layers[0][0].shape[2]
        self._notify(Stage("keep", keep=(self.prefix[0][0].shape[2], start, end)))

    def _drop_all(self) -> None:
        self.past, self.kv_len = None, 0
        self._notify(Stage("reset"))

    # --- decoding ----------------------------------------------------------------------------
    def _greedy(self, logits: torch.Tensor, cap: int) -> list[int]:
        """Greedy decode; the first token may not be the not-talk token. Generated tokens stay
        in the cache except the last (the eos, or the cap's); feed_eos feeds a final eos. The
        cache grows without bound, as the authors'; the runtime's bound (`kv_capacity`) is
        applied by the same rule (`fed_token`), and within the contract it never binds."""
        logits = logits.clone()
        logits[self.model.not_talk_id] = -float("inf")
        ids: list[int] = []
        capacity = self.s.kv_capacity
        for i in range(cap):
            t = int(torch.argmax(logits))
            ids.append(t)
            done = t == self.eos_id or i == cap - 1 or self.kv_len >= capacity
            self.fed_last = fed_token(t, i, cap, self.kv_len, capacity, self.eos_id, self.s.feed_eos)
            if not self.fed_last:
                break
            logits = self._forward(self.model.embed_ids(torch.tensor([[t]])), "decode", (t,))
            if done:
                break
        return ids

    def _embed(self, ids: list[int], tokens: torch.Tensor) -> torch.Tensor:
        # text first (embedded even when empty: one embed per step, frames after it)
        parts = [self.model.embed_ids(torch.tensor([ids], dtype=torch.long))]
        for j in range(tokens.shape[0]):
            if j and self.sep is not None:  # frames joined by the separator
                parts.append(self.model.embed_ids(torch.tensor([[self.sep]])))
            parts.append(tokens[j][None])
        return torch.cat(parts, 1)

    # --- one step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self, frames: np.ndarray, index: int, t: float, messages: Sequence[TextMessage] = ()
    ) -> FrameResult:
        """Append k frames (k, h, w, 3) and the pending messages; decide; maybe speak; then
        reduce the cache when it is due (runtime/core.py's StreamCore.step, in PyTorch)."""
        pairs = [(m.role, m.content) for m in messages]
        text = self.pb.step_text(self.pending, pairs, self.first_step and not self.open)
        tokens = self._encode(frames)
        logits = self._forward(self._embed(text, tokens), "append", text, frames)
        p = self._last_p
        nt = self.model.not_talk_id
        talk = decide_talk(p, self.prev_p, self.s, lambda: int(torch.argmax(logits)) != nt)
        self.prev_p = p
        self.fed_last = False
        ids = self._greedy(logits, self.s.max_reply_tokens) if talk else []
        opened = [("system", self.opening)] if self.first_step and self.open else []
        self.task_knowledge = find_knowledge(self.task_knowledge, [*opened, *pairs])
        self.first_step = False
        if self.prefix is None and any(m.role == "user" for m in messages):
            self.prefix = self._layers()  # the cache as it is now (the authors keep it)
        last = ids[-1] if talk else nt
        self.pending = [last] if self.sep is not None and not self.fed_last else []
        context_len = self.kv_len
        reset, summary = self._reduce(frames)
        reply = self.pb.reply_text(ids) if talk else ""
        return FrameResult(
            index, t, p, talk, reply, tuple(ids), context_len,
            None if summary is None else summary[0], reset,
            () if summary is None else summary[1],
        )

    def _reduce(self, frames: np.ndarray) -> tuple[str | None, tuple[str, tuple[int, ...]] | None]:
        s = self.s
        prefix_len = None if self.prefix is None else self.prefix[0][0].shape[2]
        due = reduction(
            self.kv_len, prefix_len, s.strategy, s.max_seq_len, s.reserve, s.drop_middle_tail
        )
        if due is None:
            return None, None
        if due.keep is not None:
            self._drop_middle(due.keep[1], due.keep[2])
        elif due.strategy is ContextStrategy.SUMMARIZE_AND_DROP:
            return due.strategy.value, self._summarize(frames)
        else:
            self._drop_all()
        return due.strategy.value, None

    def _summarize(self, frames: np.ndarray) -> tuple[str, tuple[int, ...]]:
        """Ask for a progress summary with the frame just processed, then restart from it."""
        tokens = self._encode(frames)
        request = self.pb.summary_request()
        logits = self._forward(self._embed(request, tokens), "summary", request, frames)
        p = self.prev_p = self._last_p
        out = [] if p > SUMMARY_THRESHOLD else self._greedy(logits, self.s.max_summary_tokens)
        summary = self.pb.reply_text(out)
        self._drop_all()
        self.pending = self.pb.resume(self.opening, summary, self.task_knowledge)
        return summary, tuple(out)

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
