"""The talk rule's options, runtime against the PyTorch reference loop: the authors' "diff" rule
(`StreamSettings.diff_margin`) and feeding a reply's final eos back (`feed_eos`). Each gives the
same decisions and tokens in both loops, and each changes what the stream does."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from proassist_edge.export.checkpoint import load_checkpoint
from proassist_edge.export.reference import ReferenceLoop
from proassist_edge.export.verify import synthetic_stream
from proassist_edge.manifest import DEFAULT_THRESHOLD
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.messages import FrameResult
from proassist_edge.runtime.prompt import StreamSettings

SYSTEM, KNOWLEDGE = "You guide the user.", "1. Take the red block. 2. Put it on the base."
DECODERS = ("decoder", "decoder_gqa")
FIELDS = ("talk", "token_ids", "text", "context_len", "reset")


def assert_same(got: list[FrameResult], ref: list[FrameResult], label: str) -> None:
    for field in FIELDS:
        assert [getattr(r, field) for r in got] == [getattr(r, field) for r in ref], (label, field)
    assert max(abs(a.p_not_talk - b.p_not_talk) for a, b in zip(got, ref, strict=True)) < 1e-4, label


def both_loops(bundle: Path, ckpt: Path, s: StreamSettings, frames: np.ndarray) -> list[FrameResult]:
    """The reference loop's results, after checking every runtime decoder gives the same."""
    ck = load_checkpoint(ckpt)
    ref = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s, SYSTEM, KNOWLEDGE).run(frames)
    for decoder in DECODERS:
        got = list(StreamCore(open_bundle(bundle, decoder), s, SYSTEM, KNOWLEDGE).replay(frames))
        assert_same(got, ref, decoder)
    return ref


def test_diff_rule_matches_reference_and_talks_on_drops(tiny_bundle) -> None:
    """The MLP decision head of this fixture puts P(not talk) near 0.8 on every frame, so the
    plain rule at the authors' 0.5 never talks; the diff rule talks where P drops by more
    than the margin since the previous frame."""
    bundle, ckpt, _ = tiny_bundle(10, "head-mlp", 1)
    frames = synthetic_stream(80, seed=3)
    margin = 0.02
    diff = both_loops(bundle, ckpt, StreamSettings(diff_margin=margin, max_reply_tokens=6), frames)
    plain = both_loops(bundle, ckpt, StreamSettings(threshold=DEFAULT_THRESHOLD, max_reply_tokens=6), frames)
    p = [r.p_not_talk for r in diff]
    # no reset in 80 frames: each P is compared with the previous frame's
    assert not any(r.reset for r in diff)
    assert [r.talk for r in diff] == [
        (i > 0 and p[i - 1] - p[i] > margin) or not p[i] > DEFAULT_THRESHOLD for i in range(len(p))
    ]
    talked_over = [r.index for r in diff if r.talk and r.p_not_talk > DEFAULT_THRESHOLD]
    assert talked_over, "the diff rule talks where the threshold alone stays silent"
    assert all(r.token_ids for r in diff if r.talk)
    assert [r.talk for r in plain] != [r.talk for r in diff]
    # the drops the rule acted on are not near-ties with the margin (the loops agree anyway)
    assert min(abs((p[i - 1] - p[i]) - margin) for i in range(1, len(p))) > 1e-4


def growth_past_reply(results: list[FrameResult], tokens_per_frame: int) -> list[int]:
    """Per step after the first: how much more the cache grew than the frame's tokens and the
    reply minus its last token (the authors keep a reply's last token out of the cache)."""
    return [
        b.context_len - a.context_len - tokens_per_frame - max(len(b.token_ids) - 1, 0)
        for a, b in zip(results, results[1:], strict=False)
    ]


@pytest.fixture(scope="module")
def eos_model(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(bundle, checkpoint, eos id) of the fully fine-tuned fixture whose LM-head row for eos is
    1.5x the row of a token found in about half of its replies: replies then end in eos there,
    and at the token cap elsewhere. (The random fixture itself never decodes eos.)"""
    from safetensors.torch import load_file, save_file

    from proassist_edge.export.bundle import ExportOptions, export_bundle

    src = tiny_ckpt(5, "lm", 0, "full")
    ck = load_checkpoint(src)
    eos = ck.tokenizer.token_to_id(ck.chat.eos)
    s = StreamSettings(max_reply_tokens=6)
    replies = [r.token_ids for r in ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s).run(
        synthetic_stream(40, seed=3)) if r.talk]
    assert not any(eos in ids for ids in replies), "the random fixture decodes eos: use it as it is"
    seen = Counter(t for ids in replies for t in set(ids[1:-1]))
    token = min(seen, key=lambda t: abs(seen[t] - len(replies) / 2))
    root = tmp_path_factory.mktemp("eos")
    ckpt = root / "checkpoint"
    shutil.copytree(src, ckpt)  # config.json still names the fixture's base folders
    weights = load_file(ckpt / "model.safetensors")
    weights["lm_head.weight"][eos] = 1.5 * weights["lm_head.weight"][token]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    bundle = root / "bundle"
    export_bundle(ckpt, bundle, options=ExportOptions(verify_frames=20, max_reply_tokens=6))
    return bundle, ckpt, eos


def test_feed_eos_changes_nothing_when_no_reply_ends_in_eos(tiny_ckpt) -> None:
    ck = load_checkpoint(tiny_ckpt(5, "lm", 0, "full"))
    frames = synthetic_stream(30, seed=3)
    runs = [ReferenceLoop(ck.model, ck.tokenizer, ck.chat, StreamSettings(max_reply_tokens=6, feed_eos=fe),
                          SYSTEM, KNOWLEDGE).run(frames) for fe in (False, True)]
    assert any(r.talk for r in runs[0])
    for field in FIELDS:
        assert [getattr(r, field) for r in runs[0]] == [getattr(r, field) for r in runs[1]], field


def test_feed_eos_matches_reference_and_feeds_one_more_per_eos_reply(eos_model) -> None:
    bundle, ckpt, eos = eos_model
    frames = synthetic_stream(40, seed=3)
    tpf = open_bundle(bundle).manifest.model.tokens_per_frame
    runs = {}
    for feed in (False, True):
        res = runs[feed] = both_loops(bundle, ckpt, StreamSettings(max_reply_tokens=6, feed_eos=feed), frames)
        assert not any(r.reset for r in res)
        ended = [bool(r.token_ids) and r.token_ids[-1] == eos for r in res]
        assert any(ended) and any(r.talk and not e for r, e in zip(res, ended, strict=True)), (
            "replies end in eos and at the cap"
        )
        # one position more for each reply that ended in eos, and only with feed_eos
        assert growth_past_reply(res, tpf) == [int(feed and e) for e in ended[1:]]
    # the same stream up to the first reply that ends in eos; from the next frame on the
    # cache holds one more position
    first = next(i for i, r in enumerate(runs[False]) if r.token_ids and r.token_ids[-1] == eos)
    off, on = runs[False], runs[True]
    assert [r.token_ids for r in off[: first + 1]] == [r.token_ids for r in on[: first + 1]]
    assert on[first].context_len == off[first].context_len + 1
