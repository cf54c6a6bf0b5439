"""The assistant core: one frame step = encode, append to KV memory, decide, maybe decode.

Semantics are ProAssist's (proassist-reference.md) and match the PyTorch reference loop
(export/reference.py) decision for decision, token for token; tests hold them together.
Only the core touches the KV memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from proassist_edge.errors import ContextOverflowError, ProAssistEdgeError
from proassist_edge.manifest import DEFAULT_THRESHOLD
from proassist_edge.runtime.backend import Decoder, StepOut
from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.context import ContextStrategy, find_knowledge, reduction
from proassist_edge.runtime.conversation import MessageSchedule
from proassist_edge.runtime.messages import FrameResult, TextMessage
from proassist_edge.runtime.prompt import PromptBuilder, StreamSettings, decide_talk
from proassist_edge.runtime.stages import Stage, StageName, StageObserver
from proassist_edge.runtime.warm import WarmStart, warm_start

log = logging.getLogger(__name__)


class NonFiniteOutputError(ProAssistEdgeError):
    """A graph returned NaN or inf during a step. The step was rolled back: the KV memory and the
    pending prompt are as they were before it; the frame and the messages given with it are lost."""

    def __init__(
        self, index: int, t: float, what: str, messages: Sequence[TextMessage] = ()
    ) -> None:
        super().__init__(
            f"frame {index} (t={t:.2f}s): the graph returned a non-finite {what}; the step was "
            "skipped and the memory rolled back (if it repeats, re-export or re-quantize)"
        )
        self.index, self.t, self.what, self.messages = index, t, what, tuple(messages)


TokenCallback = Callable[[int], None]
_Out = TypeVar("_Out", bound=StepOut | np.ndarray | None)  # what a stage gives its observers


def settings_from_manifest(bundle: Bundle, **overrides: object) -> StreamSettings:
    """The bundle's stream settings (its decision rule, context strategy and caps), with each
    override that is not None in their place. A diff margin, the manifest's or given, replaces
    the threshold (`decide_talk`)."""
    m = bundle.manifest.model
    base = dict(
        threshold=m.default_threshold,
        context_strategy=m.context_strategy,
        max_seq_len=m.max_seq_len,
        reserve=m.context_reserve,
        drop_middle_tail=m.drop_middle_tail,
        max_reply_tokens=m.max_reply_tokens,
        max_summary_tokens=m.max_summary_tokens,
        diff_margin=m.diff_margin,
        feed_eos=m.feed_eos,
    )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return StreamSettings(**base)  # type: ignore[arg-type]


class StreamCore:
    """ProAssist's streaming loop over a bundle, one frame step at a time (the authors'
    `StreamInferenceRunner`): append the pending tokens, the messages and the frame, decide,
    maybe reply; then, when the cache has reached `max_seq_len - reserve`, reduce it by the
    context strategy (runtime/context.py) before the next frame.

    `observers` (runtime/stages.py) are told about every stage: encode, the decision append,
    each reply or summary token, the summary request, reset and keep; more can be added to the
    `observers` list at any time."""

    def __init__(
        self,
        bundle: Bundle,
        settings: StreamSettings | None = None,
        system: str | None = None,
        knowledge: str = "",
        observers: Iterable[StageObserver] = (),
        opening: bool = True,
    ) -> None:
        m = bundle.manifest.model
        self.b = bundle
        self.s = settings or settings_from_manifest(bundle)
        if self.s.max_seq_len > m.max_seq_len:
            raise ValueError(
                f"max_seq_len {self.s.max_seq_len} exceeds the bundle's {m.max_seq_len}: "
                "re-export with a larger --max-seq-len"
            )
        self.pb = PromptBuilder(bundle.tokenizer, m.chat_format)
        self.system = m.system_prompt if system is None else system
        self.knowledge = knowledge
        # False: no opening system message at all (a conversation without one, as the authors
        # stream it); the system prompt and knowledge are then unused
        self.open = opening
        self.not_talk, self.eos, self.sep = m.not_talk_id, m.eos_id, m.sep_token_id
        self.head_mode = m.w2t_mode == "head"
        self.dec = bundle.new_decoder(self.s.kv_capacity)
        self.observers: list[StageObserver] = list(observers)
        self.reset()

    def reset(self) -> None:
        self._change_memory(None)
        # the opening system message's content: the "initial system prompt" of a summary restart
        self.opening = self.pb.chat.system_content(self.system, self.knowledge) if self.open else ""
        self.task_knowledge = ""  # found by the first step, whose messages follow the opening
        self.first_step = True
        self.prefix_len: int | None = None  # drop_middle's kept prefix, once a user spoke
        self.pending: list[int] = self.pb.opening(self.system, self.knowledge) if self.open else []
        # the warm start restores the opening's KV (runtime/warm.py), as a summary's restart
        self.warm: WarmStart | None = None
        if self.s.warm and self.open:
            self.warm = warm_start(self.b, self.dec, self.pending)
            if self.warm.ready:
                self.pending = []
        self.prev_p: float | None = None
        self.fed_last = True  # whether the last decoded token entered the cache

    @property
    def kv_len(self) -> int:
        return self.dec.kv_len

    # --- the stages, each seen by the observers --------------------------------------------
    def _staged(self, stage: Stage, run: Callable[[], _Out]) -> _Out:
        for o in self.observers:
            o.stage_started(stage)
        out = run()
        for o in self.observers:
            o.stage_ended(stage, out)
        return out

    def _encode(self, frames: np.ndarray) -> np.ndarray:
        if not self.observers:
            return self.b.encode_frames(frames)
        return self._staged(Stage("encode", len(frames), frames=frames),
                            lambda: self.b.encode_frames(frames))

    def _feed(
        self, name: StageName, embeds: np.ndarray, ids: Sequence[int] = (),
        frames: np.ndarray | None = None,
    ) -> StepOut:
        if not self.observers:
            return self.dec.append(embeds)
        stage = Stage(name, embeds.shape[1], embeds, tuple(ids), frames)
        return self._staged(stage, lambda: self.dec.append(embeds))

    def _change_memory(self, keep: tuple[int, int, int] | None) -> None:
        """Empty the memory (keep None), or keep [0, prefix_len) + [start, end)."""
        if keep is None:
            self._staged(Stage("reset"), self.dec.reset)
        else:
            self._staged(Stage("keep", keep=keep), lambda: self.dec.keep(*keep))

    def _append(
        self, name: StageName, inputs: np.ndarray, text: Sequence[int], frames: np.ndarray
    ) -> tuple[np.ndarray, float]:
        out = self._feed(name, inputs, text, frames)
        return out.logits, decision_probability(self.b, out, self.head_mode)

    def _greedy(self, logits: np.ndarray, cap: int) -> Iterator[int]:
        """Greedy tokens, the first forced away from not-talk; each is in the cache once yielded
        except the last (the eos or the cap's token), as in the authors' loop; `feed_eos` feeds
        a final eos too (`fed_token`). Raises _NonFinite before using bad logits."""
        _require_finite(logits, "logits")
        logits = logits.copy()
        logits[self.not_talk] = -np.inf
        for i in range(cap):
            t = int(np.argmax(logits))
            done = t == self.eos or i == cap - 1 or self.kv_len >= self.dec.capacity
            self.fed_last = fed_token(t, i, cap, self.kv_len, self.dec.capacity, self.eos,
                                      self.s.feed_eos)
            if not self.fed_last:  # (implies done)
                yield t
                return
            # a reply token needs no decision: skip P(not talk) (a softmax over the
            # vocabulary, or the head graph), which _append would compute and drop
            logits = self._feed("decode", self.b.embed([t]), (t,)).logits
            _require_finite(logits, "decoded-token logits")
            yield t
            if done:
                return

    def _rollback(self, kv_len: int) -> None:
        # keep(prefix, start, end) with an empty tail truncates the memory to kv_len
        self._change_memory((kv_len, kv_len, kv_len))

    # --- one step -------------------------------------------------------------------------
    def step(
        self,
        frames: np.ndarray,
        index: int,
        t: float,
        messages: Sequence[TextMessage] = (),
        on_token: TokenCallback | None = None,
    ) -> FrameResult:
        """Append k frames (k, h, w, 3) and the messages, decide, maybe reply, then reduce the
        memory if it is due. The result's `context_len` is the cache length after the step
        (its reply included), before any reduction; `reset` names the reduction that followed.

        `on_token` is called with each reply token as soon as it is decoded (not for summaries),
        so speech can start before the reply ends. A non-finite graph output raises
        NonFiniteOutputError after rolling the memory back to its state before this step.
        """
        if not self.kv_len and self.warm is not None and self.warm.prefix is not None:
            # an emptied memory (a summary's restart) that begins as the opening does takes the
            # shared ids' KV from the warm start instead of running them (runtime/warm.py)
            self.pending = self.warm.prefix.restore(self.dec, self.pending)
        pairs = [(m.role, m.content) for m in messages]
        # no opening message: the first step's messages begin with bos (PromptBuilder.step_text)
        text = self.pb.step_text(self.pending, pairs, self.first_step and not self.open)
        tokens = self._encode(frames)  # (k, I, H)
        inputs = self._inputs(text, tokens)
        if self.kv_len + inputs.shape[1] >= self.dec.capacity:
            raise ContextOverflowError(
                f"frame {index}: {inputs.shape[1]} input tokens at context {self.kv_len} pass "
                f"the KV capacity {self.dec.capacity}: shorten the message, or re-export with a "
                "larger --max-seq-len"
            )
        undo = (self.kv_len, self.pending)
        self.pending = []
        ids: list[int] = []
        try:
            logits, p = self._append("append", inputs, text, frames)
            _require_finite(p, "P(not talk)")
            talk = decide_talk(
                p, self.prev_p, self.s, lambda: int(np.argmax(logits)) != self.not_talk
            )
            self.fed_last = False  # a silent step's not-talk token is not fed
            for tok in self._greedy(logits, self.s.max_reply_tokens) if talk else ():
                ids.append(tok)
                if on_token is not None:
                    on_token(tok)
        except _NonFinite as e:
            self._rollback(undo[0])
            self.pending = undo[1]
            raise NonFiniteOutputError(index, t, str(e), messages) from None
        self.prev_p = p
        opened = [("system", self.opening)] if self.first_step and self.open else []
        self.task_knowledge = find_knowledge(self.task_knowledge, [*opened, *pairs])
        self.first_step = False
        if self.prefix_len is None and any(m.role == "user" for m in messages):
            self.prefix_len = self.kv_len
        last = ids[-1] if talk else self.not_talk
        # a separator model feeds the step's last token before the next frame (the authors)
        self.pending = [last] if self.sep is not None and not self.fed_last else []
        context_len = self.kv_len
        reset, summary = self._reduce(frames)
        reply = self.pb.reply_text(ids) if talk else ""
        return FrameResult(
            index, t, p, talk, reply, tuple(ids), context_len,
            None if summary is None else summary[0], reset,
            () if summary is None else summary[1],
        )

    def _inputs(self, text: list[int], tokens: np.ndarray) -> np.ndarray:
        return frame_inputs(self.b, self.sep, text, tokens)

    def _reduce(self, frames: np.ndarray) -> tuple[str | None, tuple[str, tuple[int, ...]] | None]:
        """The context strategy, when due: (the reduction applied, (summary, its ids) or None)."""
        s = self.s
        due = reduction(
            self.kv_len, self.prefix_len, s.strategy, s.max_seq_len, s.reserve, s.drop_middle_tail
        )
        if due is None:
            return None, None
        if due.keep is not None:
            self._change_memory(due.keep)
        elif due.strategy is ContextStrategy.SUMMARIZE_AND_DROP:
            return due.strategy.value, self._summarize(frames)
        else:
            self._change_memory(None)
        return due.strategy.value, None

    def _summarize(self, frames: np.ndarray) -> tuple[str, tuple[int, ...]]:
        """The summary request and the frame just processed (encoded again, as the authors do)
        appended to the full cache; the summary decides with the authors' default threshold
        0.5; then the cache is emptied and the next frame starts from the resume message.
        A non-finite output drops the cache without a summary (the stream goes on)."""
        kv_len = self.kv_len
        try:
            request = self.pb.summary_request()
            inputs = self._inputs(request, self._encode(frames))
            logits, p = self._append("summary", inputs, request, frames)
            _require_finite(p, "P(not talk)")
            self.prev_p = p  # the authors' loop keeps this P as the previous one too
            ids = [] if p > SUMMARY_THRESHOLD else list(self._greedy(logits, self.s.max_summary_tokens))
        except _NonFinite as e:
            log.warning("summary at context %d failed (%s): context dropped without one", kv_len, e)
            ids = []
        summary = self.pb.reply_text(ids)
        self._change_memory(None)
        self.pending = self.pb.resume(self.opening, summary, self.task_knowledge)
        return summary, tuple(ids)

    def replay(
        self, frames: np.ndarray, messages: Iterable[TextMessage] = (), fps: float = 2.0
    ) -> Iterator[FrameResult]:
        """Every frame in order, one per step, none dropped: deterministic. A message goes with
        the first frame at or after its time (runtime/conversation.py MessageSchedule)."""
        schedule = MessageSchedule(messages)
        for i in range(len(frames)):
            t = i / fps
            yield self.step(frames[i : i + 1], i, t, schedule.due(t))


SUMMARY_THRESHOLD = DEFAULT_THRESHOLD  # the authors' summary call passes none: their default decides


def fed_token(t: int, i: int, cap: int, kv_len: int, capacity: int, eos: int, feed_eos: bool) -> bool:
    """Whether greedy token `t`, the i-th of at most `cap`, enters a memory of `kv_len` positions:
    every token but the last (an eos, or the cap's), as the authors' loop; with `feed_eos` a
    final eos too. The core and the reference loop share it. A full memory takes nothing (the
    reply ends there); `StreamSettings.kv_capacity` leaves room for every fed token, eos
    included, so within it this never changes a stream (the authors' cache has no bound)."""
    if kv_len >= capacity:
        return False
    return not (t == eos or i == cap - 1) or (t == eos and feed_eos)


def frame_inputs(bundle: Bundle, sep: int | None, text: Sequence[int], tokens: np.ndarray) -> np.ndarray:
    """A decision append's inputs (1, n, H): the text's embeddings, then the frame tokens
    (k, I, H), the frames joined by the separator's embedding when the model has one (as in
    training)."""
    k = tokens.shape[0]
    if sep is not None and k > 1:
        parts = [tokens[0][None]]
        for j in range(1, k):
            parts += [bundle.embed([sep]), tokens[j][None]]
        frames = np.concatenate(parts, axis=1)
    else:
        frames = tokens.reshape(1, -1, tokens.shape[-1])
    return np.concatenate([bundle.embed(list(text)), frames], axis=1) if text else frames


class _NonFinite(Exception):
    """Internal: a graph output is NaN or inf (turned into NonFiniteOutputError by `step`)."""


def _require_finite(x: np.ndarray | float, what: str) -> None:
    # max() propagates NaN and shows +inf; a -inf logit alone is harmless to argmax and softmax
    if not math.isfinite(float(np.max(x))):
        raise _NonFinite(what)


def decision_probability(bundle: Bundle, out: StepOut, head_mode: bool) -> float:
    """P(not talk) of a decision step: from the graph when it computes it, else the head graph
    on the last hidden state (w2t "head"), else the softmax of the not-talk logit."""
    if out.p_not_talk is not None:
        return out.p_not_talk
    if head_mode:
        assert bundle.head is not None, "bundle lacks the decision head graph"
        p = bundle.head.run(None, {"hidden_states": out.hidden[None, None]})[0]
        return float(p.reshape(-1)[-1])
    return not_talk_probability(out.logits, bundle.manifest.model.not_talk_id)


def not_talk_probability(logits: np.ndarray, not_talk: int) -> float:
    """softmax(logits)[not_talk], stably: exp in float32, summed in float64 (relative error
    ~1e-6). numpy's float64 exp over SmolLM2's 49k logits took 0.77 ms of every frame step here,
    its float32 exp 0.17 ms."""
    x = np.asarray(logits, np.float32)
    m = float(x.max())
    return float(np.exp(float(x[not_talk]) - m) / np.exp(x - m).sum(dtype=np.float64))


def greedy_generate(
    bundle: Bundle, prompt: list[int], max_new: int, eos: int | None = None,
    decoder: Decoder | None = None,
) -> list[int]:
    """Plain greedy text generation through the bundle's decoder (no frames, no forcing).

    `decoder`: one to run on, reset first and kept for the next call, so its KV buffers (on the
    device under CUDA or TensorRT) are allocated once for every call (runtime/greedy.py
    `GreedyGenerator` holds one); without it, one is made for this call and closed after."""
    eos = bundle.manifest.model.eos_id if eos is None else eos
    need = len(prompt) + max_new + 1
    dec = bundle.new_decoder(need) if decoder is None else decoder
    if decoder is not None:
        if dec.capacity < need:
            raise ContextOverflowError(f"{len(prompt)} prompt tokens and {max_new} new ones pass "
                                       f"the decoder's capacity {dec.capacity}: use a larger one")
        dec.reset()
    try:
        logits = dec.append(bundle.embed(prompt)).logits
        out: list[int] = []
        for _ in range(max_new):
            t = int(np.argmax(logits))
            out.append(t)
            if t == eos:
                break
            logits = dec.append(bundle.embed([t])).logits
    finally:
        if decoder is None and (close := getattr(dec, "close", None)) is not None:
            close()  # a TensorRT decoder's device buffers go now, not at garbage collection
    return out
