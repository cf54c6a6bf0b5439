"""A bundle replayed on the PyTorch reference's history: the measure for bundles that are not
meant to match logit for logit (fp16, int4).

Run freely, a bundle follows its own replies: one reply token that rounding flips changes every
context after it, and a stream compared token for token then says little about the model. Here
the reference loop's stages are recorded (`Tape`, an observer of `ReferenceLoop`, as the
runtime's stage observers watch `StreamCore`) and replayed on the bundle: the same text and
frames in each append (through the bundle's own vision graph and embedding table), the same
resets and cuts of the memory, the reference's own reply tokens fed back. At every decision the
bundle's P(not talk), talk decision and logits are compared with the reference's; at every reply
token, whether the bundle's greedy choice is the reference's (teacher-forced top-1). This is
what `quantize` measures between a child and its parent (quant/calibration.py ShadowDecoder),
here against PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from proassist_edge.runtime.backend import StepOut
from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.core import SUMMARY_THRESHOLD, decision_probability, frame_inputs
from proassist_edge.runtime.prompt import StreamSettings, decide_talk
from proassist_edge.runtime.stages import DECISIONS, Stage, StageObserver


@dataclass
class TapeEntry:
    name: str  # "append", "summary", "decode", "reset" or "keep"
    ids: tuple[int, ...] = ()
    frames: np.ndarray | None = None
    keep: tuple[int, int, int] | None = None
    logits: np.ndarray | None = None  # decisions only: the reference's last-position logits
    p: float | None = None  # decisions only


@dataclass
class Tape(StageObserver):
    """The reference loop's stages, in order (logits kept at decisions only: a 128k vocabulary
    makes 0.5 MB a position)."""

    entries: list[TapeEntry] = field(default_factory=list)

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        if stage.name == "encode":
            return
        entry = TapeEntry(stage.name, stage.ids, stage.frames, stage.keep)
        if stage.name in DECISIONS and isinstance(out, StepOut):
            entry.logits, entry.p = out.logits.copy(), out.p_not_talk
        self.entries.append(entry)


class CachedVision:
    """A vision session that encodes each distinct frame batch once: the shadow replay and the
    free-running replay, and every decoder variant, see the same frames (a SigLIP-so400m tower
    takes seconds a frame on two cores)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.cache: dict[bytes, list[np.ndarray]] = {}

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        frames = feeds["frames"]
        key = f"{frames.shape}".encode() + frames.tobytes()
        if key not in self.cache:
            self.cache[key] = self.session.run(outputs, feeds)
        return self.cache[key]


def with_cached_vision(bundle: Bundle, vision: CachedVision | None) -> tuple[Bundle, CachedVision]:
    cached = vision or CachedVision(bundle.vision)
    return replace(bundle, vision=cached), cached  # type: ignore[arg-type]  # a session's run()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64 / den) if den > 0 else float(np.array_equal(a64, b64))


def shadow_figures(
    tape: list[TapeEntry], bundle: Bundle, settings: StreamSettings, sep: int | None,
) -> dict[str, Any]:
    """Replay TAPE on BUNDLE's decoder (see the module docstring); the figures."""
    m = bundle.manifest.model
    head_mode = m.w2t_mode == "head"
    dec = bundle.new_decoder(settings.kv_capacity)
    p_diff, talk, cos, top1, tokens = [], [], [], [], []
    prev: tuple[float | None, float | None] = (None, None)
    last: np.ndarray | None = None
    first = False  # the next reply token is a reply's first (not-talk masked, as greedy does)
    for e in tape:
        if e.name == "reset":
            dec.reset()
            continue
        if e.name == "keep":
            assert e.keep is not None
            dec.keep(*e.keep)
            continue
        if e.name == "decode":
            assert last is not None
            choice = last.copy()
            if first:
                choice[m.not_talk_id] = -np.inf
            tokens.append(int(np.argmax(choice)) == e.ids[0])
            first = False
            out = dec.append(bundle.embed(list(e.ids)))
        else:
            assert e.frames is not None
            out = dec.append(frame_inputs(bundle, sep, e.ids, bundle.encode_frames(e.frames)))
        last = out.logits.copy()  # valid until the decoder's next append otherwise
        if e.name in DECISIONS:
            assert e.logits is not None and e.p is not None
            p = decision_probability(bundle, out, head_mode)
            if e.name == "summary":  # the authors' fixed threshold, whatever the rule
                talk.append((e.p <= SUMMARY_THRESHOLD) == (p <= SUMMARY_THRESHOLD))
            else:
                talk.append(decide_talk(e.p, prev[0], settings) == decide_talk(p, prev[1], settings))
            prev = (e.p, p)
            p_diff.append(abs(e.p - p))
            cos.append(cosine(e.logits, out.logits))
            top1.append(int(np.argmax(e.logits)) == int(np.argmax(out.logits)))
            first = True
    return {
        "decision_agreement": float(np.mean(talk)) if talk else 1.0,
        "decisions": len(talk),
        "p_not_talk_mae": float(np.mean(p_diff)) if p_diff else 0.0,
        "p_not_talk_max_abs": float(np.max(p_diff)) if p_diff else 0.0,
        "logit_cosine": float(np.mean(cos)) if cos else 1.0,
        "logit_cosine_min": float(np.min(cos)) if cos else 1.0,
        "top1_at_decisions": float(np.mean(top1)) if top1 else 1.0,
        "token_top1": float(np.mean(tokens)) if tokens else 1.0,
        "reply_tokens": len(tokens),
    }
