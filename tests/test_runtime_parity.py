"""The runtime against the PyTorch reference loop: same decisions, same utterances, for every
context strategy and both decoder variants."""

from __future__ import annotations

import numpy as np
import pytest

from proassist_edge.errors import ContextOverflowError
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
# Two fixtures in the released layout: LoRA (two rounds, a linear decision head) and a fully
# fine-tuned LLM with the LM's own not-talk token (no LoRA, mm_projector.bin).
FIXTURES = {
    "lora2-head": dict(tokens_per_frame=5, w2t="head-linear", lora_rounds=2),
    "full-lm": dict(tokens_per_frame=5, w2t="lm", lora_rounds=0, train_mode="full"),
}


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


def dense_messages() -> list[TextMessage]:
    """User turns on two of every five frames from frame 35 to 159 (after the first reset, so
    that drop_middle first runs with no prefix), and task knowledge arriving mid-stream: resets
    fall on frames with a user turn before them, after them, or on them."""
    users = [TextMessage("user", "What's next?", i / 2) for i in range(35, 160) if i % 5 < 2]
    knowledge = TextMessage("system", "Task knowledge: stack the red block on the base.", 30.0)
    return sorted([*users, knowledge], key=lambda m: m.t)


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("strategy", CONTEXT_STRATEGIES)
def test_replay_matches_reference_loop(tiny_bundle, strategy: str, fixture: str) -> None:
    bundle, ckpt, thr = tiny_bundle(**FIXTURES[fixture])
    ck = load_checkpoint(ckpt)
    s = small_context(strategy, thr)
    frames, messages = synthetic_stream(300, seed=3), dense_messages()
    ref = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s, SYSTEM, KNOWLEDGE).run(frames, messages)
    resets = [r.index for r in ref if r.reset]
    user_frames = {round(m.t * 2) for m in messages if m.role == "user"}
    assert len(resets) >= 2 and {r.reset for r in ref} - {None} >= {strategy}, "resets happen"
    assert any(i - 1 in user_frames for i in resets), "a user turn on the frame before a reset"
    assert any(i + 1 in user_frames for i in resets), "a user turn on the frame after a reset"
    assert 0 < sum(r.talk for r in ref) < len(ref)
    if strategy == "summarize_and_drop":
        assert any(r.summary for r in ref), "a summary was generated"
    for decoder in ("decoder", "decoder_gqa"):
        core = StreamCore(open_bundle(bundle, decoder), s, SYSTEM, KNOWLEDGE)
        got = list(core.replay(frames, messages))
        for field in ("talk", "token_ids", "text", "reset", "summary", "summary_ids", "context_len"):
            assert [getattr(r, field) for r in got] == [getattr(r, field) for r in ref], (
                decoder, field
            )
        assert max(abs(a.p_not_talk - b.p_not_talk) for a, b in zip(got, ref, strict=True)) < 1e-4


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


def message_of_length(pb: PromptBuilder, n: int) -> str:
    """User text whose formatted message is exactly n tokens."""
    for k in range(1, 4 * n):
        text = " ".join(["block"] * k)
        if len(pb.message("user", text)) == n:
            return text
    raise AssertionError(f"no message of {n} tokens")


@pytest.mark.parametrize("decoder", ["decoder", "decoder_gqa"])
def test_worst_case_summary_fits_the_capacity(tiny_bundle, decoder: str) -> None:
    """A cache one short of the reduction point, then a step with the largest inputs the
    capacity provides for, a whole reply and a whole summary: it reaches exactly the capacity
    and nothing overflows. One token more of input is a typed error before anything runs."""
    bundle, _, _ = tiny_bundle(**FIXTURES["full-lm"])
    b = open_bundle(bundle, decoder)
    s = small_context("summarize_and_drop", threshold=1.0)  # P > 1 never: every step talks
    core = StreamCore(b, s, SYSTEM, KNOWLEDGE)
    frames = synthetic_stream(4, seed=8)
    core.step(frames[:1], 0, 0.0)
    reduce_at, tpf = s.max_seq_len - s.reserve, b.manifest.model.tokens_per_frame
    filler = np.random.default_rng(0).integers(1000, 2000, reduce_at - 1 - core.kv_len).tolist()
    core.dec.append(b.embed(filler))  # a hand-built cache: one position short
    assert core.kv_len == reduce_at - 1
    query = len(core.pb.summary_request())
    room = s.kv_capacity - s.max_seq_len - s.max_reply_tokens - s.max_summary_tokens
    n_msg = room + s.reserve + 3 - query - 2 * tpf  # inputs + query + frame = 2 * reserve + 3
    text = message_of_length(core.pb, n_msg)
    pending = list(core.pending)
    with pytest.raises(ContextOverflowError, match="KV capacity"):
        core.step(frames[1:2], 1, 0.5, [TextMessage("user", text + " block" * s.kv_capacity)])
    assert core.kv_len == reduce_at - 1 and core.pending == pending  # nothing changed
    r = core.step(frames[1:2], 1, 0.5, [TextMessage("user", text)])
    assert r.talk and len(r.token_ids) == s.max_reply_tokens and len(r.summary_ids) == 24
    assert r.context_len == reduce_at - 1 + n_msg + tpf + s.max_reply_tokens - 1
    peak = r.context_len + query + tpf + len(r.summary_ids) - 1
    assert peak == s.kv_capacity == b.new_decoder(s.kv_capacity).capacity
    assert r.reset == "summarize_and_drop" and core.kv_len == 0


def test_summary_restarts_from_one_system_message(tiny_bundle) -> None:
    """After the step that reached the reduction point (its own decision and reply kept), the
    next frame starts from "{opening} {summary} {knowledge}" with bos; the knowledge is the
    first system message holding "Task knowledge:", here one that came mid-stream."""
    bundle, _, _ = tiny_bundle(**FIXTURES["full-lm"])
    b = open_bundle(bundle)
    s = small_context("summarize_and_drop", threshold=1.0)  # every step talks
    core = StreamCore(b, s, SYSTEM, KNOWLEDGE)
    pb = PromptBuilder(b.tokenizer, b.manifest.model.chat_format)
    know = "Task knowledge: the red block goes first."
    frames = synthetic_stream(120, seed=5)
    results = []
    for i in range(len(frames)):
        msgs = [TextMessage("system", know, i / 2)] if i == 2 else []
        results.append(core.step(frames[i : i + 1], i, i / 2, msgs))
        if results[-1].reset:
            break
    else:
        pytest.fail("summarize_and_drop never triggered")
    r = results[-1]
    assert all(x.context_len < s.max_seq_len - s.reserve for x in results[:-1])
    assert r.context_len >= s.max_seq_len - s.reserve and r.talk and r.text, "its own reply kept"
    assert r.summary is not None and core.kv_len == 0
    opening = f"{SYSTEM}\n\n{KNOWLEDGE}"
    expected = pb.resume(opening, r.summary, know)
    assert core.pending == expected
    text = b.tokenizer.decode(expected, skip_special_tokens=False)
    assert text == (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{f'{opening} {r.summary} {know}'.strip()}<|eot_id|>"
    )
    assert pb.summary_request()[0] != b.manifest.model.bos_id  # mid-stream: no bos
    nxt = core.step(frames[i + 1 : i + 2], i + 1, (i + 1) / 2)
    assert nxt.context_len == len(expected) + 5 + len(nxt.token_ids) - 1


def test_drop_all_restarts_from_the_next_frame_alone(tiny_bundle) -> None:
    bundle, _, _ = tiny_bundle(5, "head-linear", 2)
    s = small_context("drop_all", threshold=1e-9)  # P > 1e-9 always: never talks, lengths exact
    core = StreamCore(open_bundle(bundle), s, SYSTEM, KNOWLEDGE)
    frames = synthetic_stream(80, seed=6)
    results = [core.step(frames[i : i + 1], i, i / 2) for i in range(80)]
    k = next(i for i, r in enumerate(results) if r.reset)
    assert results[k - 1].context_len < s.max_seq_len - s.reserve <= results[k].context_len
    assert results[k].context_len == results[k - 1].context_len + 5  # reduced after, not before
    assert results[k + 1].context_len == 5  # the system prompt went too (the authors' drop_all)


def test_a_conversation_without_an_opening_streams_none(tiny_bundle) -> None:
    """With no opening system turn the authors feed no opening: the first frame's messages begin
    with bos (their first turn's chat template), and a first frame without messages has no bos.
    The reference loop agrees with the core through summaries (initial system prompt "")."""
    bundle, ckpt, thr = tiny_bundle(**FIXTURES["full-lm"])
    b = open_bundle(bundle)
    pb = PromptBuilder(b.tokenizer, b.manifest.model.chat_format)
    never = small_context("drop_all", threshold=1e-9)  # never talks: lengths are exact
    frames = synthetic_stream(40, seed=8)
    hello = TextMessage("user", "Hello there.", 0.0)
    core = StreamCore(b, never, SYSTEM, KNOWLEDGE, opening=False)
    first = core.step(frames[:1], 0, 0.0, [hello])
    assert first.context_len == len(pb.ids(pb.chat.bos) + pb.message("user", hello.content)) + 5
    assert pb.ids(pb.chat.bos) == [b.manifest.model.bos_id]
    core = StreamCore(b, never, SYSTEM, KNOWLEDGE, opening=False)
    assert core.step(frames[:1], 0, 0.0).context_len == 5  # no messages: not even bos
    assert core.step(frames[1:2], 1, 0.5, [hello]).context_len == 5 + len(
        pb.message("user", hello.content)) + 5  # later messages never take bos
    s = small_context("summarize_and_drop", thr)
    frames, messages = synthetic_stream(200, seed=3), dense_messages()
    ck = load_checkpoint(ckpt)
    ref = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s, SYSTEM, KNOWLEDGE, opening=False).run(
        frames, messages)
    assert any(r.summary is not None for r in ref), "a summary restart happened"
    got = list(StreamCore(b, s, SYSTEM, KNOWLEDGE, opening=False).replay(frames, messages))
    for field in ("talk", "token_ids", "reset", "summary_ids", "context_len"):
        assert [getattr(r, field) for r in got] == [getattr(r, field) for r in ref], field


def test_drop_middle_keeps_the_first_user_steps_cache_and_the_tail(tiny_bundle) -> None:
    bundle, _, _ = tiny_bundle(5, "head-linear", 2)
    s = small_context("drop_middle", threshold=1e-9)
    core = StreamCore(open_bundle(bundle), s, SYSTEM, KNOWLEDGE)
    frames = synthetic_stream(80, seed=6)
    results = []
    for i in range(80):
        msgs = [TextMessage("user", "What's next?", i / 2)] if i in (3, 9) else []
        results.append(core.step(frames[i : i + 1], i, i / 2, msgs))
    assert core.prefix_len == results[3].context_len  # the first user turn's whole step
    k = next(i for i, r in enumerate(results) if r.reset)
    assert results[k].reset == "drop_middle"
    assert results[k + 1].context_len == core.prefix_len + s.drop_middle_tail + 5


def test_drop_middle_without_a_user_turn_drops_all(tiny_bundle) -> None:
    bundle, _, _ = tiny_bundle(5, "head-linear", 2)
    s = small_context("drop_middle", threshold=1e-9)
    core = StreamCore(open_bundle(bundle), s, SYSTEM, KNOWLEDGE)
    frames = synthetic_stream(60, seed=6)
    results = [core.step(frames[i : i + 1], i, i / 2) for i in range(60)]
    k = next(i for i, r in enumerate(results) if r.reset)
    assert results[k].reset == "drop_all" and results[k + 1].context_len == 5
    assert core.prefix_len is None


SEP = "<|reserved_special_token_2|>"


@pytest.mark.parametrize("strategy", CONTEXT_STRATEGIES)
def test_separator_model_feeds_each_steps_last_token(tiny_bundle, strategy: str) -> None:
    """A model with a frame separator (its not-talk token) feeds each step's last token before
    the next frame, through drop_all and drop_middle, but not after a summary (the authors)."""
    bundle, ckpt, thr = tiny_bundle(5, "lm", 1, sep_token=SEP)
    ck = load_checkpoint(ckpt)
    b = open_bundle(bundle)
    m = b.manifest.model
    assert m.sep_token_id == m.not_talk_id == b.tokenizer.token_to_id(SEP) != m.eos_id
    s = small_context(strategy, thr)
    frames, messages = synthetic_stream(200, seed=9), dense_messages()
    ref = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, s, SYSTEM, KNOWLEDGE).run(frames, messages)
    got = list(StreamCore(b, s, SYSTEM, KNOWLEDGE).replay(frames, messages))
    assert sum(r.reset is not None for r in ref) >= 2 and 0 < sum(r.talk for r in ref) < 200
    for field in ("talk", "token_ids", "reset", "summary_ids", "context_len"):
        assert [getattr(r, field) for r in got] == [getattr(r, field) for r in ref], field
    silent = StreamCore(b, small_context(strategy, 1e-9), SYSTEM, KNOWLEDGE)
    lens = [r.context_len for r in silent.replay(frames[:60])]
    k = next(i for i in range(60) if lens[i + 1] < lens[i])
    assert all(lens[i + 1] - lens[i] == 6 for i in range(k)), "the separator, then 5 tokens"
    if strategy != "summarize_and_drop":  # (drop_middle has no prefix here: it drops all)
        assert lens[k + 1] == 6  # the last step's separator survives the reset


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
