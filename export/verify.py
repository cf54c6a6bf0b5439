"""Verification: every exported graph against the PyTorch model, on random inputs and on a
stream run through the reference loop and the runtime side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proassist_edge.errors import ToleranceError
from proassist_edge.export.checkpoint import LoadedCheckpoint
from proassist_edge.export.reference import ReferenceLoop
from proassist_edge.export.shadow import Tape, TapeEntry, shadow_figures, with_cached_vision
from proassist_edge.runtime.bundle import Bundle, open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.messages import FrameResult, TextMessage
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.stages import StageObserver


@dataclass(frozen=True)
class Tolerance:
    """What a bundle must meet against the PyTorch model. The defaults are the exact check of an
    fp32 bundle; fp16 and int4 bundles relax the logits and hold the decisions, P(not talk) on
    average, the logits' direction and the reply tokens (export/precision.py)."""

    logits: float = 1e-3
    vision: float = 1e-3  # relative: max |diff| / max(1, max |reference|) of the frame tokens
    p_not_talk: float = 1e-4
    decisions: float = 1.0
    tokens: float = 1.0
    # on the reference's history (the shadow replay: decisions, P(not talk) and logits at every
    # decision, the reference's reply tokens teacher-forced), as quantize's report measures
    shadow_decisions: float = 0.0
    p_not_talk_mae: float = math.inf
    logit_cosine: float = -1.0
    top1: float = 0.0

    def misses(self, w: dict[str, Any], v_abs: float, v_rel: float) -> list[str]:
        out = []
        if w["max_abs_logit_diff"] > self.logits:
            out.append(f"max abs logit diff {w['max_abs_logit_diff']:.2e} > {self.logits}")
        if w["shadow"]["decision_agreement"] < self.shadow_decisions:
            out.append(f"decision agreement on the reference's history "
                       f"{w['shadow']['decision_agreement']:.3f} < {self.shadow_decisions}")
        if w["shadow"]["p_not_talk_mae"] > self.p_not_talk_mae:
            out.append(f"P(not talk) MAE {w['shadow']['p_not_talk_mae']:.4f} > {self.p_not_talk_mae}")
        if w["shadow"]["logit_cosine"] < self.logit_cosine:
            out.append(f"logit cosine {w['shadow']['logit_cosine']:.4f} < {self.logit_cosine}")
        if w["shadow"]["token_top1"] < self.top1:
            out.append(f"reply tokens (teacher-forced top-1) {w['shadow']['token_top1']:.3f} < {self.top1}")
        if v_rel > self.vision:
            out.append(f"vision frame-token diff {v_abs:.2e} ({v_rel:.2e} of their scale) > {self.vision}")
        if w["max_abs_p_not_talk_diff"] > self.p_not_talk:
            out.append(f"P(not talk) diff {w['max_abs_p_not_talk_diff']:.2e} > {self.p_not_talk}")
        if w["decision_agreement"] < self.decisions:
            out.append(f"decision agreement {w['decision_agreement']:.3f} < {self.decisions}")
        if w["token_match_rate"] < self.tokens:
            out.append(f"token match rate {w['token_match_rate']:.3f} < {self.tokens}")
        return out


def synthetic_stream(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """A deterministic moving scene: coloured blocks drifting over a gradient, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.float32) * (255.0 / size)
    frames = np.empty((n, size, size, 3), np.uint8)
    colours = rng.integers(0, 256, (4, 3))
    for i in range(n):
        img = base * (0.6 + 0.4 * np.sin(i / 17.0) ** 2)
        for j, c in enumerate(colours):
            cx = int((size / 2) + (size / 3) * np.sin(i / (7.0 + j * 3) + j))
            cy = int((size / 2) + (size / 3) * np.cos(i / (11.0 + j) + j))
            img[max(cy - 6, 0) : cy + 6, max(cx - 6, 0) : cx + 6] = c
        frames[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return frames


def compare_streams(ref: list[FrameResult], got: list[FrameResult]) -> dict[str, float]:
    n = len(ref)
    return {
        "max_abs_p_not_talk_diff": float(
            max(abs(a.p_not_talk - b.p_not_talk) for a, b in zip(ref, got, strict=True))
        ),
        "decision_agreement": sum(a.talk == b.talk for a, b in zip(ref, got, strict=True)) / n,
        "token_match_rate": sum(a.token_ids == b.token_ids for a, b in zip(ref, got, strict=True))
        / n,
        "frames": n,
    }


def reference_stream(
    ck: LoadedCheckpoint, settings: StreamSettings, system: str, knowledge: str,
    stream: np.ndarray, messages: list[TextMessage], after_reset: int | None, progress: bool,
    fps: float = 2.0, observers: Sequence[StageObserver] = (),
) -> list[FrameResult]:
    """The PyTorch reference loop over STREAM, stopped `after_reset` frames after its first
    context reset when that is given."""
    from tqdm import tqdm

    loop = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, settings, system, knowledge, observers)
    queue = sorted(messages, key=lambda m: m.t)
    results: list[FrameResult] = []
    stop = len(stream)
    for i in tqdm(range(len(stream)), desc="verify: PyTorch reference", unit="frame",
                  disable=not progress, leave=False):
        if i >= stop:
            break
        due = [m for m in queue if m.t <= i / fps + 1e-9]
        queue = queue[len(due) :]
        results.append(loop.step(stream[i : i + 1], i, i / fps, due))
        if after_reset is not None and results[-1].reset and stop == len(stream):
            stop = min(stop, i + 1 + after_reset)
    return results


@dataclass
class Reference:
    """Everything verification needs from the PyTorch model, computed once: the reference
    loop's results over the stream and its stages (the tape the shadow replay follows), frame
    tokens of fixed frames, logits of fixed appends. The model can be dropped afterwards,
    before any bundle graph is loaded."""

    stream: np.ndarray
    messages: list[TextMessage]
    results: list[FrameResult]
    tape: list[TapeEntry]
    settings: StreamSettings
    system: str
    knowledge: str
    sep: int | None  # the frame separator of separator models
    vision_frames: list[np.ndarray]
    vision_tokens: list[np.ndarray]
    appends: list[np.ndarray]  # (1, s, H) random embeddings: a prompt, a frame, one token
    append_logits: list[np.ndarray]
    dtype: str


def reference(
    ck: LoadedCheckpoint, settings: StreamSettings, frames: int = 300, system: str = "",
    knowledge: str = "", after_reset: int | None = None, progress: bool = False,
) -> Reference:
    """The PyTorch side of the verification (see verify_bundle)."""
    stream = synthetic_stream(frames)
    messages = [TextMessage("user", "What should I do next?", t=min(5.0, frames / 4))]
    tape = Tape()
    results = reference_stream(ck, settings, system, knowledge, stream, messages, after_reset,
                               progress, observers=[tape])
    rng = np.random.default_rng(1)
    vis_frames = [rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
                  for n, h, w in ((1, 64, 64), (2, 48, 80), (5, 96, 96))]
    g = torch.Generator().manual_seed(2)
    hidden = ck.model.llm.config.hidden_size
    appends = [(torch.randn(1, s, hidden, generator=g) * 0.05).numpy()
               for s in (7, ck.config.tokens_per_frame, 1)]
    logits, past = [], None
    with torch.no_grad():
        tokens = [ck.model.encode_frames(torch.from_numpy(f)).float().numpy() for f in vis_frames]
        for e in appends:
            out = ck.model(torch.from_numpy(e), past)
            past = out.past
            logits.append(out.logits[0, -1].float().numpy())
    dtype = str(next(ck.model.parameters()).dtype).removeprefix("torch.")
    sep = ck.model.not_talk_id if ck.config.img_sep_token else None
    return Reference(stream[: len(results)], messages, results, tape.entries, settings, system,
                     knowledge, sep, vis_frames, tokens, appends, logits, dtype)


def vision_diff(ref: Reference, b: Bundle) -> tuple[float, float]:
    """Max abs difference of the frame tokens, and that over the tokens' scale (a trained
    projector's outputs reach tens, where fp32 rounding alone differs by ~1e-4)."""
    worst, scale = 0.0, 1.0
    for frames, want in zip(ref.vision_frames, ref.vision_tokens, strict=True):
        worst = max(worst, float(np.abs(b.encode_frames(frames) - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    return worst, worst / scale


def decoder_logit_diff(ref: Reference, b: Bundle) -> float:
    """Three appends of random embeddings (a prompt, a frame, one token) vs the PyTorch model."""
    dec = b.new_decoder(256)
    return max(float(np.abs(dec.append(e).logits - want).max())
               for e, want in zip(ref.appends, ref.append_logits, strict=True))


def compare_bundle(
    ref: Reference, bundle: Path, decoders: list[str], tol: Tolerance | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """The bundle side: each decoder run freely over the stream, replayed on the reference's
    history (export/shadow.py) and on fixed appends, against REF. A miss raises ToleranceError
    when `strict`, else it is recorded (`targets_met`, `misses`). Returns the figures for
    verify.json."""
    tol = tol or Tolerance()
    report: dict[str, Any] = {"decoders": {}}
    opened, _ = with_cached_vision(open_bundle(bundle, decoder=decoders[0], verify=False), None)
    report["vision_max_abs_diff"], report["vision_max_rel_diff"] = vision_diff(ref, opened)
    for name in decoders:
        b = replace(opened, decoder_name=name)  # one vision session, each frame encoded once
        got = list(StreamCore(b, ref.settings, ref.system, ref.knowledge).replay(ref.stream, ref.messages))
        report["decoders"][name] = {
            "max_abs_logit_diff": decoder_logit_diff(ref, b),
            **compare_streams(ref.results, got),
            "shadow": shadow_figures(ref.tape, b, ref.settings, ref.sep),
        }
    d = report["decoders"].values()
    shadow = [x["shadow"] for x in d]
    worst = {
        "max_abs_logit_diff": max(x["max_abs_logit_diff"] for x in d),
        "max_abs_p_not_talk_diff": max(x["max_abs_p_not_talk_diff"] for x in d),
        "decision_agreement": min(x["decision_agreement"] for x in d),
        "token_match_rate": min(x["token_match_rate"] for x in d),
        "shadow": {
            "decision_agreement": min(x["decision_agreement"] for x in shadow),
            "p_not_talk_mae": max(x["p_not_talk_mae"] for x in shadow),
            "logit_cosine": min(x["logit_cosine"] for x in shadow),
            "token_top1": min(x["token_top1"] for x in shadow),
        },
        "frames": len(ref.stream),
        "talk_frames_reference": sum(r.talk for r in ref.results),
        "resets_reference": sum(r.reset is not None for r in ref.results),
        "max_seq_len": ref.settings.max_seq_len,
        "max_reply_tokens": ref.settings.max_reply_tokens,
        "reference_dtype": ref.dtype,
    }
    report.update(worst)
    v_abs, v_rel = report["vision_max_abs_diff"], report["vision_max_rel_diff"]
    fails = tol.misses(worst, v_abs, v_rel)
    if fails and strict:
        raise ToleranceError("verification failed: " + "; ".join(fails) + f" (figures: {report})")
    report.update(targets_met=not fails, misses=fails)
    return report


def verify_bundle(
    ck: LoadedCheckpoint,
    bundle: Path,
    decoders: list[str],
    settings: StreamSettings,
    frames: int = 300,
    system: str = "",
    knowledge: str = "",
    tol: Tolerance | None = None,
    after_reset: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every check; raise ToleranceError on a miss; return the figures for verify.json.

    The stream is `frames` long, or with `after_reset` it ends that many frames after the first
    context reset (at most `frames`): the quick check, whose settings put the reset early."""
    ref = reference(ck, settings, frames, system, knowledge, after_reset, progress)
    return compare_bundle(ref, bundle, decoders, tol)
