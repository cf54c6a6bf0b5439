"""Verification: every exported graph against the PyTorch model, on random inputs and on a
stream run through the reference loop and the runtime side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proassist_edge.errors import ToleranceError
from proassist_edge.export.checkpoint import LoadedCheckpoint
from proassist_edge.export.reference import ReferenceLoop
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.messages import FrameResult, TextMessage
from proassist_edge.runtime.prompt import StreamSettings


@dataclass(frozen=True)
class Tolerance:
    logits: float = 1e-3
    vision: float = 1e-3  # relative: max |diff| / max(1, max |reference|) of the frame tokens
    p_not_talk: float = 1e-4
    decisions: float = 1.0
    tokens: float = 1.0


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


def vision_diff(ck: LoadedCheckpoint, bundle: Path) -> tuple[float, float]:
    """Max abs difference of the frame tokens, and that over the tokens' scale (a trained
    projector's outputs reach tens, where fp32 rounding alone differs by ~1e-4)."""
    b = open_bundle(bundle, verify=False)
    rng = np.random.default_rng(1)
    worst, scale = 0.0, 1.0
    for n, h, w in ((1, 64, 64), (2, 48, 80), (5, 96, 96)):
        frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        with torch.no_grad():
            ref = ck.model.encode_frames(torch.from_numpy(frames)).numpy()
        worst = max(worst, float(np.abs(b.encode_frames(frames) - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return worst, worst / scale


def decoder_logit_diff(ck: LoadedCheckpoint, bundle: Path, decoder: str) -> float:
    """Three appends of random embeddings (a prompt, a frame, one token) vs the PyTorch model."""
    b = open_bundle(bundle, decoder=decoder, verify=False)
    dec = b.new_decoder(256)
    g = torch.Generator().manual_seed(2)
    hidden = ck.model.llm.config.hidden_size
    past, worst = None, 0.0
    for s in (7, ck.config.tokens_per_frame, 1):
        e = torch.randn(1, s, hidden, generator=g) * 0.05
        with torch.no_grad():
            out = ck.model(e, past)
        past = out.past
        got = dec.append(e.numpy())
        worst = max(worst, float(np.abs(got.logits - out.logits[0, -1].numpy()).max()))
    return worst


def reference_stream(
    ck: LoadedCheckpoint, settings: StreamSettings, system: str, knowledge: str,
    stream: np.ndarray, messages: list[TextMessage], after_reset: int | None, progress: bool,
    fps: float = 2.0,
) -> list[FrameResult]:
    """The PyTorch reference loop over STREAM, stopped `after_reset` frames after its first
    context reset when that is given."""
    from tqdm import tqdm

    loop = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, settings, system, knowledge)
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
    tol = tol or Tolerance()
    stream = synthetic_stream(frames)
    messages = [TextMessage("user", "What should I do next?", t=min(5.0, frames / 4))]
    ref = reference_stream(ck, settings, system, knowledge, stream, messages, after_reset, progress)
    stream = stream[: len(ref)]
    v_abs, v_rel = vision_diff(ck, bundle)
    report: dict[str, Any] = {"vision_max_abs_diff": v_abs, "vision_max_rel_diff": v_rel, "decoders": {}}
    for name in decoders:
        core = StreamCore(
            open_bundle(bundle, decoder=name, verify=False), settings, system, knowledge
        )
        got = list(core.replay(stream, messages))
        figures = {
            "max_abs_logit_diff": decoder_logit_diff(ck, bundle, name),
            **compare_streams(ref, got),
        }
        report["decoders"][name] = figures
    frames = len(stream)
    worst = {
        "max_abs_logit_diff": max(d["max_abs_logit_diff"] for d in report["decoders"].values()),
        "max_abs_p_not_talk_diff": max(
            d["max_abs_p_not_talk_diff"] for d in report["decoders"].values()
        ),
        "decision_agreement": min(d["decision_agreement"] for d in report["decoders"].values()),
        "token_match_rate": min(d["token_match_rate"] for d in report["decoders"].values()),
        "frames": frames,
        "talk_frames_reference": sum(r.talk for r in ref),
        "resets_reference": sum(r.reset is not None for r in ref),
        "max_seq_len": settings.max_seq_len,
        "max_reply_tokens": settings.max_reply_tokens,
        "reference_dtype": str(next(ck.model.parameters()).dtype).removeprefix("torch."),
    }
    report.update(worst)
    fails = []
    if worst["max_abs_logit_diff"] > tol.logits:
        fails.append(f"max abs logit diff {worst['max_abs_logit_diff']:.2e} > {tol.logits}")
    if v_rel > tol.vision:
        fails.append(f"vision frame-token diff {v_abs:.2e} ({v_rel:.2e} of their scale) > {tol.vision}")
    if worst["max_abs_p_not_talk_diff"] > tol.p_not_talk:
        fails.append(f"P(not talk) diff {worst['max_abs_p_not_talk_diff']:.2e} > {tol.p_not_talk}")
    if worst["decision_agreement"] < tol.decisions:
        fails.append(f"decision agreement {worst['decision_agreement']:.3f} < {tol.decisions}")
    if worst["token_match_rate"] < tol.tokens:
        fails.append(f"token match rate {worst['token_match_rate']:.3f} < {tol.tokens}")
    if fails:
        raise ToleranceError("verification failed: " + "; ".join(fails) + f" (figures: {report})")
    return report
