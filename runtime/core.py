"""The assistant core: one frame step = encode, append to KV memory, decide, maybe decode.

Semantics are ProAssist's (proassist-reference.md) and match the PyTorch reference loop
(export/reference.py) decision for decision, token for token; tests hold them together.
Only the core touches the KV memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from proassist_edge.errors import ProAssistEdgeError

from .backend import StepOut
from .bundle import Bundle
from .messages import FrameResult, TextMessage
from .prompt import PromptBuilder, StreamSettings, decide_talk, drop_middle_keep, needs_reset


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


def settings_from_manifest(bundle: Bundle, **overrides: object) -> StreamSettings:
    m = bundle.manifest.model
    base = dict(
        threshold=m.default_threshold,
        context_strategy=m.context_strategy,
        max_seq_len=m.max_seq_len,
        reserve=m.context_reserve,
        drop_middle_tail=m.drop_middle_tail,
        max_reply_tokens=m.max_reply_tokens,
        max_summary_tokens=m.max_summary_tokens,
    )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return StreamSettings(**base)  # type: ignore[arg-type]


class StreamCore:
    def __init__(
        self,
        bundle: Bundle,
        settings: StreamSettings | None = None,
        system: str | None = None,
        knowledge: str = "",
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
        self.not_talk, self.eos = m.not_talk_id, m.eos_id
        self.head_mode = m.w2t_mode == "head"
        self.dec = bundle.new_decoder(self.s.max_seq_len)
        self.reset()

    def reset(self) -> None:
        self.dec.reset()
        self.prefix_len: int | None = None
        self.pending: list[int] = self.pb.opening(self.system, self.knowledge)
        self.prev_p: float | None = None

    @property
    def kv_len(self) -> int:
        return self.dec.kv_len

    # --- one forward ----------------------------------------------------------------------
    def _append(self, embeds: np.ndarray) -> tuple[np.ndarray, float]:
        out = self.dec.append(embeds)
        return out.logits, decision_probability(self.b, out, self.head_mode)

    def _greedy(self, logits: np.ndarray, cap: int) -> Iterator[int]:
        """Greedy tokens, the first forced away from not-talk; each is in the cache once yielded
        (except the final eos unless feed_eos). Raises _NonFinite before using bad logits."""
        _require_finite(logits, "logits")
        logits = logits.copy()
        logits[self.not_talk] = -np.inf
        for i in range(cap):
            t = int(np.argmax(logits))
            full = self.kv_len >= self.s.max_seq_len
            done = t == self.eos or i == cap - 1 or full
            if done and not (t == self.eos and self.s.feed_eos and not full):
                yield t
                return
            # a reply token needs no decision: skip P(not talk) (a softmax over the
            # vocabulary, or the head graph), which _append would compute and drop
            logits = self.dec.append(self.b.embed([t])).logits
            _require_finite(logits, "decoded-token logits")
            yield t
            if done:
                return

    def _rollback(self, kv_len: int) -> None:
        # keep(prefix, start, end) with an empty tail truncates the memory to kv_len
        self.dec.keep(kv_len, kv_len, kv_len)

    # --- one step -------------------------------------------------------------------------
    def step(
        self,
        frames: np.ndarray,
        index: int,
        t: float,
        messages: Sequence[TextMessage] = (),
        on_token: TokenCallback | None = None,
    ) -> FrameResult:
        """Append k frames (k, h, w, 3) and the messages, decide, maybe reply.

        `on_token` is called with each reply token as soon as it is decoded (not for summaries),
        so speech can start before the reply ends. A non-finite graph output raises
        NonFiniteOutputError after rolling the memory back to its state before this step.
        """
        text = list(self.pending)
        for m in messages:
            text += self.pb.message(m.role, m.content)
        tokens = self.b.encode_frames(frames)  # (k, I, H)
        n = len(text) + tokens.shape[0] * tokens.shape[1]
        reset = None
        if self.kv_len and needs_reset(self.kv_len, n, self.s):
            reset = self.s.context_strategy
            if reset == "summarize_and_drop":
                return self._summarize(text, tokens, index, t, messages)
            keep = drop_middle_keep(self.kv_len, self.prefix_len or 0, self.s)
            if reset == "drop_middle" and keep is not None:
                self.dec.keep(self.prefix_len or 0, *keep)
            else:
                reset = "drop_all"
                self.dec.reset()
        undo = (self.kv_len, self.pending, self.prefix_len)
        self.pending = []
        if self.prefix_len is None:
            self.prefix_len = len(text)
        ids: list[int] = []
        try:
            logits, p = self._append(self._inputs(text, tokens))
            _require_finite(p, "P(not talk)")
            talk = decide_talk(p, self.prev_p, self.s)
            for tok in self._greedy(logits, self.s.max_reply_tokens) if talk else ():
                ids.append(tok)
                if on_token is not None:
                    on_token(tok)
        except _NonFinite as e:
            self._rollback(undo[0])
            self.pending, self.prefix_len = undo[1], undo[2]
            raise NonFiniteOutputError(index, t, str(e), messages) from None
        self.prev_p = p
        reply = self.pb.reply_text(ids) if talk else ""
        return FrameResult(index, t, p, talk, reply, tuple(ids), self.kv_len, None, reset)

    def _inputs(self, text: list[int], tokens: np.ndarray) -> np.ndarray:
        frames = tokens.reshape(1, -1, tokens.shape[-1])
        return np.concatenate([self.b.embed(text), frames], axis=1) if text else frames

    def _summarize(
        self,
        text: list[int],
        tokens: np.ndarray,
        index: int,
        t: float,
        messages: Sequence[TextMessage],
    ) -> FrameResult:
        kv_len = self.kv_len
        try:
            logits, p = self._append(self._inputs(text + self.pb.summary_request(), tokens))
            _require_finite(p, "P(not talk)")
            cap = max(1, min(self.s.max_summary_tokens, self.s.max_seq_len - self.kv_len))
            ids = list(self._greedy(logits, cap))
        except _NonFinite as e:
            self._rollback(kv_len)  # the summary is retried at the next frame
            raise NonFiniteOutputError(index, t, str(e), messages) from None
        self.prev_p = p
        summary = self.pb.reply_text(ids)
        self.dec.reset()
        self.pending = self.pb.resume(self.system, summary, self.knowledge)
        return FrameResult(
            index, t, p, False, "", tuple(ids), self.kv_len, summary, "summarize_and_drop"
        )

    def replay(
        self, frames: np.ndarray, messages: Iterable[TextMessage] = (), fps: float = 2.0
    ) -> Iterator[FrameResult]:
        """Every frame in order, one per step, none dropped: deterministic."""
        queue = sorted(messages, key=lambda m: m.t)
        for i in range(len(frames)):
            t = i / fps
            due = [m for m in queue if m.t <= t + 1e-9]
            queue = queue[len(due) :]
            yield self.step(frames[i : i + 1], i, t, due)


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
    bundle: Bundle, prompt: list[int], max_new: int, eos: int | None = None
) -> list[int]:
    """Plain greedy text generation through the bundle's decoder (no frames, no forcing)."""
    eos = bundle.manifest.model.eos_id if eos is None else eos
    dec = bundle.new_decoder(len(prompt) + max_new + 1)
    logits = dec.append(bundle.embed(prompt)).logits
    out: list[int] = []
    for _ in range(max_new):
        t = int(np.argmax(logits))
        out.append(t)
        if t == eos:
            break
        logits = dec.append(bundle.embed([t])).logits
    return out
