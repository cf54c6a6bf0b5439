"""The runtime against the PyTorch reference loop: same decisions, same utterances, for every
context strategy and both decoder variants."""

from __future__ import annotations

import numpy as np
import pytest

from proassist_edge.export.checkpoint import load_checkpoint
from proassist_edge.export.reference import ReferenceLoop
from proassist_edge.export.verify import synthetic_stream
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.messages import TextMessage
from proassist_edge.runtime.prompt import CONTEXT_STRATEGIES, PromptBuilder, StreamSettings

SYSTEM, KNOWLEDGE = "You guide the user.", "1. Take the red block. 2. Put it on the base."
MESSAGES = [
    TextMessage("user", "What's next?", 20.0),
    TextMessage("system", "The user looks lost.", 70.0),
]


def small_context(strategy: str, threshold: float) -> StreamSettings:
    return StreamSettings(
        threshold=threshold,
        context_strategy=strategy,
        max_seq_len=256,
        reserve=32,
        drop_middle_tail=64,
        max_reply_tokens=6,
        max_summary_tokens=24,
    )


@pytest.mark.parametrize("strategy", CONTEXT_STRATEGIES)
def test_replay_matches_reference_loop(tiny_bundle, strategy: str) -> None:
    bundle, ckpt, thr = tiny_bundle(5, "head-linear", 2)
    ck = load_checkpoint(ckpt)
    s = small_context(strategy, thr)
    frames = synthetic_stream(300, seed=3)
    ref = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s, SYSTEM, KNOWLEDGE).run(frames, MESSAGES)
    resets = [r for r in ref if r.reset]
    assert resets and all(r.reset == strategy for r in resets), "the strategy must trigger"
    assert 0 < sum(r.talk for r in ref) < len(ref)
    for decoder in ("decoder", "decoder_gqa"):
        core = StreamCore(open_bundle(bundle, decoder), s, SYSTEM, KNOWLEDGE)
        got = list(core.replay(frames, MESSAGES))
        assert [r.talk for r in got] == [r.talk for r in ref], decoder
        assert [r.token_ids for r in got] == [r.token_ids for r in ref], decoder
        assert [r.text for r in got] == [r.text for r in ref], decoder
        assert [r.reset for r in got] == [r.reset for r in ref], decoder
        assert max(abs(a.p_not_talk - b.p_not_talk) for a, b in zip(got, ref, strict=True)) < 1e-4
        assert max(r.context_len for r in got) <= s.max_seq_len


@pytest.mark.parametrize("tpf,w2t,rounds", [(1, "lm", 1), (10, "head-mlp", 1)])
def test_reference_loop_runs_300_frames_on_each_fixture(
    tiny_bundle, tpf: int, w2t: str, rounds: int
) -> None:
    bundle, ckpt, thr = tiny_bundle(tpf, w2t, rounds)
    ck = load_checkpoint(ckpt)
    s = StreamSettings(threshold=thr, max_reply_tokens=6)
    frames = synthetic_stream(300, seed=4)
    ref = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s, SYSTEM, KNOWLEDGE).run(frames, MESSAGES)
    got = list(StreamCore(open_bundle(bundle), s, SYSTEM, KNOWLEDGE).replay(frames, MESSAGES))
    assert len(ref) == 300 and all(0.0 <= r.p_not_talk <= 1.0 for r in ref)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    talks = [r for r in ref if r.talk]
    assert talks and all(r.token_ids and r.token_ids[0] != ck.model.not_talk_id for r in talks)


def test_summary_is_fed_back_as_system_message(tiny_bundle) -> None:
    bundle, ckpt, thr = tiny_bundle(5, "head-linear", 2)
    b = open_bundle(bundle)
    s = small_context("summarize_and_drop", thr)
    core = StreamCore(b, s, SYSTEM, KNOWLEDGE)
    pb = PromptBuilder(b.tokenizer, b.manifest.model.chat_format)
    frames = synthetic_stream(120, seed=5)
    for i in range(len(frames)):
        r = core.step(frames[i : i + 1], i, i / 2)
        if r.summary is not None:
            break
    else:
        pytest.fail("summarize_and_drop never triggered")
    assert core.kv_len == 0
    expected = pb.resume(SYSTEM, r.summary, KNOWLEDGE)
    assert core.pending == expected
    text = b.tokenizer.decode(expected, skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert r.summary in text and KNOWLEDGE in text and SYSTEM in text
    nxt = core.step(frames[i + 1 : i + 2], i + 1, (i + 1) / 2)
    frame_tokens = b.manifest.model.tokens_per_frame
    assert nxt.context_len == len(expected) + frame_tokens + max(len(nxt.token_ids) - 1, 0)


def test_drop_all_restarts_from_frame_tokens_alone(tiny_bundle) -> None:
    bundle, _, _ = tiny_bundle(5, "head-linear", 2)
    s = small_context("drop_all", threshold=-1.0)  # P > -1 always: never talks, lengths are exact
    core = StreamCore(open_bundle(bundle), s, SYSTEM, KNOWLEDGE)
    frames = synthetic_stream(80, seed=6)
    results = [core.step(frames[i : i + 1], i, i / 2) for i in range(80)]
    reset = next(r for r in results if r.reset)
    assert reset.context_len == 5  # the system prompt went too (the authors' drop_all)


def test_drop_middle_keeps_prefix_and_tail(tiny_bundle) -> None:
    bundle, _, _ = tiny_bundle(5, "head-linear", 2)
    s = small_context("drop_middle", threshold=-1.0)
    core = StreamCore(open_bundle(bundle), s, SYSTEM, KNOWLEDGE)
    frames = synthetic_stream(80, seed=6)
    results = [core.step(frames[i : i + 1], i, i / 2) for i in range(80)]
    reset = next(r for r in results if r.reset)
    assert reset.context_len == core.prefix_len + s.drop_middle_tail + 5


def test_frame_of_wrong_shape_is_a_typed_error(tiny_bundle) -> None:
    from proassist_edge.errors import FrameError

    core = StreamCore(open_bundle(tiny_bundle(1, "lm", 1)[0]))
    with pytest.raises(FrameError, match="channels last"):
        core.step(np.zeros((1, 3, 64, 64), np.uint8), 0, 0.0)
    with pytest.raises(FrameError, match="uint8"):
        core.step(np.zeros((1, 64, 64, 3), np.float32), 0, 0.0)


def test_sessions_set_their_thread_count_and_decode_into_aligned_logits(tiny_bundle) -> None:
    from proassist_edge.runtime.backend import GqaDecoder, physical_cores

    b = open_bundle(tiny_bundle(5, "lm", 2)[0], decoder="decoder_gqa")
    # 0 resolves to one thread per core, set explicitly (onnxruntime pins its workers otherwise)
    assert b.vision.get_session_options().intra_op_num_threads == physical_cores()
    dec = b.new_decoder(64)
    assert isinstance(dec, GqaDecoder) and dec.step_logits is not None
    assert dec.step_logits.ctypes.data % 64 == 0
    first = dec.append(b.embed([1, 2, 3]))
    step = dec.append(b.embed([4]))
    assert step.logits.shape == first.logits.shape and np.isfinite(step.logits).all()
    assert np.shares_memory(step.logits, dec.step_logits)
    assert open_bundle(b.root, threads=1).vision.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("w2t", ["lm", "head-mlp"])
def test_short_appends_write_into_kept_buffers_with_the_allocated_outputs(tiny_bundle, w2t) -> None:
    """One-token steps and frame-length appends reuse bound buffers; prompts let onnxruntime
    allocate. Every length, in any order, gives the outputs of a decoder that always allocates."""
    from proassist_edge.runtime.backend import IN_PLACE_MAX, GqaDecoder

    b = open_bundle(tiny_bundle(5, w2t, 1)[0], decoder="decoder_gqa")
    kept, fresh = b.new_decoder(128), b.new_decoder(128)
    assert isinstance(kept, GqaDecoder) and isinstance(fresh, GqaDecoder)
    fresh.io_dims = None  # no kept buffers: every run's outputs come back from onnxruntime
    rng = np.random.default_rng(3)
    for s in (3, 1, 5, 1, 1, IN_PLACE_MAX + 4, 5, 2, 1, 5):
        x = b.embed(rng.integers(10, 60, s).tolist())
        a, ref = kept.append(x), fresh.append(x)
        np.testing.assert_array_equal(a.logits, ref.logits)
        np.testing.assert_array_equal(a.hidden, ref.hidden)
        assert (a.hidden.size > 0) == (w2t != "lm")
        assert (s in kept.buffers) == (s <= IN_PLACE_MAX)
        assert 1 in kept.buffers and len(kept.buffers) <= 2  # one token and one other length
    assert kept.kv_len == fresh.kv_len == 44
