"""The talk rule's options, runtime against the PyTorch reference loop: the authors' "diff" rule
(`StreamSettings.diff_margin`) and feeding a reply's final eos back (`feed_eos`). Each gives the
same decisions and tokens in both loops, and each changes what the stream does."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from proassist_edge.export.checkpoint import load_checkpoint
from proassist_edge.export.reference import ReferenceLoop
from proassist_edge.export.verify import synthetic_stream
from proassist_edge.manifest import DEFAULT_THRESHOLD
from proassist_edge.runtime.backend import StepOut
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore, decision_probability
from proassist_edge.runtime.messages import FrameResult
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.stages import DECISIONS, Stage, StageObserver

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


class DecisionP(StageObserver):
    """The P(not talk) of each decision append of a core, in order: ("append" or "summary", P)."""

    def __init__(self, core: StreamCore) -> None:
        self.core = core
        self.p: list[tuple[str, float]] = []

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        if stage.name in DECISIONS:
            assert isinstance(out, StepOut)
            self.p.append((stage.name, decision_probability(self.core.b, out, self.core.head_mode)))


def test_diff_rule_after_a_summary_compares_with_the_summary_request(tiny_bundle) -> None:
    """The authors' model keeps the P of its last call, and the summary is a call: the frame after
    a summary compares its P with the summary request's, in both loops. (On this fixture the
    summary request's P is within 1e-3 of its frame's, the frame being last in both: the
    decisions cannot tell them apart, the kept P can.)"""
    bundle, ckpt, _ = tiny_bundle(10, "head-mlp", 1)
    margin = 0.02
    s = StreamSettings(diff_margin=margin, context_strategy="summarize_and_drop", max_seq_len=256,
                       reserve=32, max_reply_tokens=6, max_summary_tokens=24)
    frames = synthetic_stream(60, seed=3)
    ck = load_checkpoint(ckpt)
    loop = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s, SYSTEM, KNOWLEDGE)
    core = StreamCore(open_bundle(bundle, "decoder"), s, SYSTEM, KNOWLEDGE)
    seen = DecisionP(core)
    core.observers.append(seen)
    got, ref = [], []
    for i in range(len(frames)):
        r, lr = core.step(frames[i : i + 1], i, i / 2), loop.step(frames[i : i + 1], i, i / 2)
        got.append(r)
        ref.append(lr)
        kind, p = seen.p[-1]
        assert core.prev_p == p and abs(loop.prev_p - p) < 1e-4  # type: ignore[operator]
        assert kind == ("summary" if r.reset == "summarize_and_drop" else "append")
        if kind == "summary":
            assert core.prev_p != r.p_not_talk and loop.prev_p != lr.p_not_talk
    assert sum(r.reset == "summarize_and_drop" for r in ref) >= 2
    assert_same(got, ref, "decoder")
    gqa = StreamCore(open_bundle(bundle, "decoder_gqa"), s, SYSTEM, KNOWLEDGE)
    assert_same(list(gqa.replay(frames)), ref, "decoder_gqa")
    rule, prev = [], None
    for name, p in seen.p:
        if name == "append":
            rule.append((prev is not None and prev - p > margin) or not p > DEFAULT_THRESHOLD)
        prev = p
    assert rule == [r.talk for r in ref]


def test_a_full_memory_ends_a_reply_and_takes_no_eos_in_either_loop(eos_model) -> None:
    """With feed_eos a reply's final eos is fed unless the memory is full (the runtime's buffer
    holds `kv_capacity`; the reference loop applies the same bound): an eos that comes when the
    memory is full ends the reply unfed in both loops. Within the capacity this never happens
    (`kv_capacity` keeps room for a fed eos, test_worst_case_summary_fits_the_capacity)."""
    bundle, ckpt, eos = eos_model
    b, ck = open_bundle(bundle), load_checkpoint(ckpt)
    s = StreamSettings(threshold=1.0, context_strategy="drop_all", max_seq_len=256, reserve=32,
                       max_reply_tokens=6, max_summary_tokens=24, feed_eos=True)
    assert s.kv_capacity == replace(s, feed_eos=False).kv_capacity + 2  # a reply's and a summary's
    frames = synthetic_stream(2, seed=3)
    tpf = b.manifest.model.tokens_per_frame
    filler = np.random.default_rng(0).integers(1000, 2000, s.kv_capacity).tolist()

    def runtime(n: int) -> tuple[int, FrameResult]:
        core = StreamCore(b, s, SYSTEM, KNOWLEDGE)
        core.step(frames[:1], 0, 0.0)
        if n:
            core.dec.append(b.embed(filler[:n]))  # a hand-built cache of n more positions
        return core.kv_len, core.step(frames[1:2], 1, 0.5)

    def reference(n: int) -> FrameResult:
        loop = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s, SYSTEM, KNOWLEDGE)
        loop.step(frames[:1], 0, 0.0)
        with torch.no_grad():
            loop._forward(loop.model.embed_ids(torch.tensor([filler[:n]])))
        return loop.step(frames[1:2], 1, 0.5)

    base, _ = runtime(0)
    for n in range(s.kv_capacity - base - tpf - 5, s.kv_capacity - base - tpf):
        before, r = runtime(n)
        k = len(r.token_ids) - 1  # the last token came with k reply tokens in the memory
        if r.token_ids[-1] == eos and before + tpf + k == s.kv_capacity:
            break
    else:
        pytest.fail("no filler length puts an eos at the full memory")
    assert r.context_len == s.kv_capacity and r.reset == "drop_all"  # the eos was not fed
    ref = reference(n)
    assert (ref.token_ids, ref.context_len) == (r.token_ids, r.context_len)
    # one position earlier the same eos is fed (and the reply is the same)
    _, r1 = runtime(n - 1)
    assert r1.token_ids == r.token_ids and r1.context_len == s.kv_capacity


def edited_bundle(bundle: Path, root: Path, **model: object) -> Path:
    """A copy of `bundle` whose manifest's model facts are updated by `model` (None: removed)."""
    copy = root / "bundle"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    for key, value in model.items():
        if value is None:
            data["model"].pop(key, None)
        else:
            data["model"][key] = value
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def replay_records(path: Path) -> tuple[dict, list[dict]]:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    return start["settings"], [e for e in events if e["type"] == "frame"]


def test_manifest_and_replay_cli_carry_the_talk_rule(tiny_bundle, tmp_path: Path) -> None:
    from proassist_edge.cli import main
    from proassist_edge.runtime.core import settings_from_manifest
    from proassist_edge.runtime.episode import episode_inputs, load_episode

    bundle, _, _ = tiny_bundle(10, "head-mlp", 1)
    old = edited_bundle(bundle, tmp_path / "old", diff_margin=None, feed_eos=None)
    assert "diff_margin" not in json.loads((old / "manifest.json").read_text())["model"]
    s = settings_from_manifest(open_bundle(old))  # a bundle from before the fields: the defaults
    assert s.diff_margin is None and s.feed_eos is False
    new = edited_bundle(bundle, tmp_path / "new", diff_margin=0.02, feed_eos=True)
    s = settings_from_manifest(open_bundle(new))
    assert (s.diff_margin, s.feed_eos) == (0.02, True)

    ep = tmp_path / "episode"
    ep.mkdir()
    frames = synthetic_stream(30, seed=3)
    np.save(ep / "frames.npy", frames)
    conv = [{"role": "system", "content": SYSTEM}, {"role": "frames", "start": 0, "end": 30}]
    (ep / "conversation.json").write_text(json.dumps(conv))
    events = tmp_path / "events.jsonl"
    args = ["replay", str(new), "--episode", str(ep), "--events", str(events), "--quiet"]
    assert main(args) == 0
    settings, records = replay_records(events)
    assert (settings["diff_margin"], settings["feed_eos"]) == (0.02, True)  # the manifest's
    inputs = episode_inputs(load_episode(ep))
    direct = StreamCore(open_bundle(new), s, inputs.system, inputs.knowledge).replay(frames)
    assert [r["talk"] for r in records] == [r.talk for r in direct]
    assert any(r["talk"] for r in records), "the diff rule talks on this fixture"
    assert main([*args, "--diff-margin", "0.5", "--no-feed-eos"]) == 0
    settings, records = replay_records(events)
    assert (settings["diff_margin"], settings["feed_eos"]) == (0.5, False)  # the flags win
    with pytest.raises(SystemExit):  # one rule: a threshold or a diff margin
        main([*args, "--threshold", "0.5", "--diff-margin", "0.1"])
    with pytest.raises(SystemExit):
        main([*args, "--diff-margin", "1.5"])


def test_eval_cli_runs_the_diff_rule(tiny_bundle, tmp_path: Path) -> None:
    from proassist_edge.cli import main
    from proassist_edge.eval.evaluate import iter_data, run_episode
    from proassist_edge.taskworld import generate_split

    bundle, _, _ = tiny_bundle(10, "head-mlp", 1)
    split = generate_split("test", tmp_path / "split", episodes=1)
    out = tmp_path / "eval.json"
    rc = main(["eval", str(bundle), "--data", str(split), "--diff-margin", "0.02", "--feed-eos",
               "--embedder", "exact", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"] == {"diff_margin": 0.02, "feed_eos": True}
    b = open_bundle(bundle)
    said = [run_episode(b, ep, diff_margin=0.02, feed_eos=True) for ep in iter_data(split)]
    assert report["num_gen"] == sum(bool(t) for gen in said for t in gen) > 0
    plain = [run_episode(b, ep, threshold=DEFAULT_THRESHOLD) for ep in iter_data(split)]
    assert not any(t for gen in plain for t in gen), "the plain rule at 0.5 never talks here"
