"""Train ProAssist-architecture checkpoints on the procedural task world (the paper's recipe).

Two presets:
* tiny: from scratch, a few minutes on 2 CPU cores. Tiny SigLIP-style tower (trained too),
  projector, tiny Llama with the real Llama-3 tokenizer and its full 128256-token vocabulary,
  I = 5, when-to-talk through the LM. Rows of tokens never seen in training start at zero and stay
  identical (the embedding rows of used tokens start random): training runs on a compact table
  of the used rows plus one "common" row whose logit counts (vocab - used) times in the softmax,
  which is exactly the full-vocabulary loss (Adam sees the common row's summed gradient, the same
  update up to its epsilon), and the shipped file stays small. The LM head is the embedding
  table (`tie`; the released layout still stores both): an attention head that moves a token's
  embedding to the current position then raises that token's logit, for every item name at
  once, which is the copying from the task knowledge the replies need. Most steps are
  dialogue-only sequences, several per step (`text_only`, `text_batch`, see trainseq): measured,
  a model trained on full episodes only never learned to read the knowledge in 10 minutes.
* lite: SmolLM2-135M-Instruct + LoRA (q/k/v/o/gate/up/down; NOT lm_head, unlike the authors'
  regex, because peft would then store the 113 MB tied head in every adapter file), frozen
  MobileNetV2 (features computed once per episode, as the authors trained on features), the
  projector trained and saved inside the adapter; windows of frames bound the sequence length.

    python -m proassist_edge.taskworld.train --preset tiny --out /tmp/tiny --minutes 10 --seed 2 --threads 2
    python -m proassist_edge.taskworld.train --evaluate taskworld-tiny --similarity minilm
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from proassist_edge.eval.metrics import DATASET_WINDOWS, Metrics, aggregate, compute_metrics
from proassist_edge.export.model import (
    ProAssistConfig,
    ProAssistModel,
    VisionTower,
    attach_multimodal_modules,
)
from proassist_edge.export.reference import ReferenceLoop
from proassist_edge.runtime.conversation import ConversationInputs, parse_conversation
from proassist_edge.runtime.episode import Episode
from proassist_edge.runtime.prompt import PromptBuilder, StreamSettings
from proassist_edge.taskworld.trainseq import (
    Schedule,
    SeqOptions,
    SequenceBuilder,
    TrainSequence,
    choose_window,
    epoch_order,
    used_token_ids,
)

WINDOW = DATASET_WINDOWS["taskworld"]


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int = 750
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    neg_rate: float = 0.5
    eos_drop: float = 0.5
    keep_after: int = 2  # silent frames after a reply that always keep their label (trainseq)
    window: int = 0  # frames per training sequence; 0 = the whole episode
    batch: int = 1  # sequences per optimizer step
    train_episodes: int = 400
    val_episodes: int = 3
    val_every: int = 250
    w2t: str = "lm"  # lm | head-linear | head-mlp
    hidden: int = 128  # tiny LLM width
    layers: int = 4
    vision_width: int = 64
    vision_layers: int = 2
    vision_patch: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    embed_init: float = 0.02  # tiny: std of the used embedding rows at the start (0: all zero)
    prompt_loss: int = 0  # 1: LM loss on the system prompt's tokens too (trainseq)
    text_only: float = 0.0  # probability of a frameless dialogue-only sequence (trainseq)
    text_batch: int = 1  # dialogue-only sequences per such step (they are short and cheap)
    tie: int = 0  # tiny, 1: the LM head is the embedding table (module docstring)


PRESETS = {
    # tiny: the dialogue-only steps (text_only, text_batch) and the tied head are what make it
    # read the task knowledge within 10 minutes (README, task world)
    "tiny": Preset("tiny", steps=4000, val_every=100000, val_episodes=0, prompt_loss=1, tie=1,
                   text_only=0.7, text_batch=4),
    "lite": Preset("lite", steps=300, lr=1e-3, warmup=20, window=24, train_episodes=24,
                   val_episodes=2, val_every=300),
}


LITE_LORA_TARGETS = r"model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def run_fields(preset: Preset, llm_dir: str, vision_dir: str, width: int, mode: str) -> dict[str, Any]:
    from proassist_edge.export.fixture import proassist_fields
    from proassist_edge.taskworld import SYSTEM_PROMPT

    d = proassist_fields(llm_dir, vision_dir, width, 5, preset.w2t, mode)
    d.pop("training_args")
    d.update(system_prompt=SYSTEM_PROMPT, exceed_context_handling="drop_middle")
    return d


class Trainee:
    """What the loop needs from a model family: ids as the model reads them, frame tokens,
    the LM head at chosen positions, an inference-ready model, and packing for shipping."""

    model: ProAssistModel
    tokenizer: Any
    chat: Any
    img_id: int  # ids in sequences are the tokenizer's
    not_talk_id: int
    model_img_id: int
    tokens_per_frame = 5

    def model_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.llm.lm_head(h)

    def freeze_modes(self) -> None:
        pass

    def num_frames(self, index: int) -> int:
        raise NotImplementedError

    def frame_tokens(self, index: int, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eval_model(self) -> tuple[ProAssistModel, Any, Any]:
        return self.model, self.tokenizer, self.chat

    def pack(self, path: Path, summary: dict[str, Any]) -> None:
        raise NotImplementedError


def _tokenizer(path: Path) -> tuple[Any, Any, int, int]:
    from tokenizers import Tokenizer

    from proassist_edge.export.checkpoint import chat_format_for

    tok = Tokenizer.from_file(str(path))
    chat = chat_format_for(tok)
    tok.add_special_tokens(["<image>"])
    img, not_talk = tok.token_to_id("<image>"), tok.token_to_id(chat.not_talk)
    if img is None or not_talk is None:
        raise ValueError(f"{path}: the tokenizer lacks <image> or {chat.not_talk!r}")
    return tok, chat, img, not_talk


class TinyTrainee(Trainee):
    """From scratch, on a compact vocabulary: the used rows + one common row (module docstring)."""

    def __init__(self, preset: Preset, convs: list[ConversationInputs], render: Any) -> None:
        from transformers import LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

        from proassist_edge.export.fixture import llama3_tokenizer_json, tiny_llama_config

        self.tokenizer, self.chat, self.img_id, self.not_talk_id = _tokenizer(llama3_tokenizer_json())
        self.render = render
        self._frames: dict[int, np.ndarray] = {}
        self.full_cfg = tiny_llama_config(hidden=preset.hidden, layers=preset.layers)
        vocab = self.full_cfg.vocab_size
        self.used = used_token_ids(PromptBuilder(self.tokenizer, self.chat), convs, self.not_talk_id)
        n_used = len(self.used)
        self.lookup = torch.full((max(vocab, self.img_id) + 1,), n_used, dtype=torch.long)
        self.lookup[self.used] = torch.arange(n_used)
        self.lookup[self.img_id] = self.model_img_id = n_used + 1  # past the table, as <image> is
        self.offset = torch.zeros(n_used + 1)
        self.offset[-1] = math.log(vocab - n_used)  # the common row stands for vocab - used rows
        compact_cfg = tiny_llama_config(hidden=preset.hidden, layers=preset.layers)
        compact_cfg.vocab_size = n_used + 1
        llm = LlamaForCausalLM(compact_cfg)
        with torch.no_grad():
            # the rows training sees start random (tokens tell apart from the first step, which a
            # zero start delays); the common row and an untied LM head start at zero
            llm.model.embed_tokens.weight.normal_(0.0, preset.embed_init)
            llm.model.embed_tokens.weight[-1].zero_()
            llm.lm_head.weight.zero_()
        if preset.tie:  # one parameter from here on (pack_tiny still writes both tables)
            llm.lm_head.weight = llm.model.embed_tokens.weight
        self.vcfg = SiglipVisionConfig(
            hidden_size=preset.vision_width, intermediate_size=preset.vision_width * 2,
            num_hidden_layers=preset.vision_layers, num_attention_heads=2, image_size=64,
            patch_size=preset.vision_patch,
        )
        self.vision = SiglipVisionModel(self.vcfg)
        self.fields = run_fields(preset, "base_llm", "base_vision", preset.vision_width, "full")
        self.cfg = ProAssistConfig.from_json(self.fields)
        attach_multimodal_modules(llm, self.cfg)
        self.model = ProAssistModel(self.cfg, VisionTower(self.cfg, self.vision, 64), llm,
                                    int(self.lookup[self.not_talk_id]))

    def frames(self, index: int) -> np.ndarray:
        if index not in self._frames:
            self._frames[index] = self.render(index)
        return self._frames[index]

    def num_frames(self, index: int) -> int:
        return int(self.frames(index).shape[0])

    def model_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup[ids]

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.llm.lm_head(h) + self.offset

    def frame_tokens(self, index: int, frames: torch.Tensor) -> torch.Tensor:
        if not len(frames):  # a dialogue-only sequence
            return torch.zeros(0, self.tokens_per_frame, self.model.llm.config.hidden_size)
        return self.model.encode_frames(torch.from_numpy(self.frames(index)[frames.numpy()]))

    def full_llm(self) -> Any:
        """The full-vocabulary LLM this compact one stands for (shares nothing mutable)."""
        from transformers import LlamaForCausalLM

        from proassist_edge.taskworld.models import full_table, split_rows

        compact = self.model.llm
        state = {k: v for k, v in compact.state_dict().items()
                 if not k.startswith(("mm_projector.", "binary_decision_head."))}
        vocab = self.full_cfg.vocab_size
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            state[key] = full_table(**split_rows(state[key], self.used), vocab=vocab)
        full = LlamaForCausalLM(self.full_cfg)
        full.load_state_dict(state, strict=True)
        full.mm_projector = compact.mm_projector
        if self.model.decision_head is not None:
            full.binary_decision_head = self.model.decision_head
        return full

    def eval_model(self) -> tuple[ProAssistModel, Any, Any]:
        model = ProAssistModel(self.cfg, self.model.vision, self.full_llm(), self.not_talk_id)
        return model, self.tokenizer, self.chat

    def pack(self, path: Path, summary: dict[str, Any]) -> None:
        from proassist_edge.taskworld.models import pack_tiny

        meta = {"llm_config": self.full_cfg.to_dict(), "vision_config": self.vcfg.to_dict(),
                "proassist": self.fields, "training": summary}
        pack_tiny(path, self.model.llm, self.vision, self.used, meta)


class LiteTrainee(Trainee):
    """SmolLM2-135M-Instruct + LoRA, frozen MobileNetV2 whose features are computed once."""

    def __init__(self, preset: Preset, convs: list[ConversationInputs], render: Any) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        from proassist_edge.export.mobilenet import load_mobilenet_v2, write_mobilenet_v2_dir
        from proassist_edge.export.smollm import smollm2_llm_dir
        from proassist_edge.paths import cache_dir

        llm_dir = smollm2_llm_dir()
        self.tokenizer, self.chat, self.img_id, self.not_talk_id = _tokenizer(llm_dir / "tokenizer.json")
        self.model_img_id = self.img_id
        self.render = render
        self._features: dict[int, torch.Tensor] = {}
        self.feature_dir = cache_dir() / "taskworld-features"
        vis_dir = write_mobilenet_v2_dir(cache_dir() / "mobilenet_v2")
        backbone, size = load_mobilenet_v2(vis_dir)
        llm = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
        self.fields = run_fields(preset, str(llm_dir), str(vis_dir), backbone.out_channels, "lora")
        self.fields["vision_type"] = "mobilenet_v2"
        self.cfg = ProAssistConfig.from_json(self.fields)
        attach_multimodal_modules(llm, self.cfg)
        self.model = ProAssistModel(self.cfg, VisionTower(self.cfg, backbone, size), llm,
                                    self.not_talk_id)
        saved = ["mm_projector"] + (["binary_decision_head"] if preset.w2t != "lm" else [])
        lcfg = LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=0.05,
                          target_modules=LITE_LORA_TARGETS, modules_to_save=saved)
        self.peft = get_peft_model(llm, lcfg)
        for p in self.model.vision.parameters():
            p.requires_grad_(False)

    def freeze_modes(self) -> None:
        self.model.vision.eval()  # BatchNorm keeps its ImageNet statistics

    def features(self, index: int) -> torch.Tensor:
        """MobileNetV2 tokens (N, I, 1280) of a training episode, cached on disk."""
        import hashlib

        if index not in self._features:
            frames = self.render(index)
            key = hashlib.sha256(frames.tobytes()).hexdigest()[:16]
            path = self.feature_dir / f"{key}.pt"
            if path.is_file():
                feats = torch.load(path, weights_only=True)
            else:
                self.model.vision.eval()
                with torch.no_grad():
                    feats = torch.cat([self.model.vision(torch.from_numpy(frames[i : i + 16]))
                                       for i in range(0, len(frames), 16)])
                self.feature_dir.mkdir(parents=True, exist_ok=True)
                torch.save(feats, path)
            self._features[index] = feats
        return self._features[index]

    def num_frames(self, index: int) -> int:
        return int(self.features(index).shape[0])

    def frame_tokens(self, index: int, frames: torch.Tensor) -> torch.Tensor:
        return self.model.projector(self.features(index)[frames])

    def pack(self, path: Path, summary: dict[str, Any]) -> None:
        import tempfile

        from proassist_edge.taskworld.models import pack_lite

        with tempfile.TemporaryDirectory() as tmp:
            self.peft.save_pretrained(tmp)
            pack_lite(path, Path(tmp), {"proassist": self.fields, "training": summary})


def sequence_loss(
    trainee: Trainee, batch: list[tuple[TrainSequence, int]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """LM loss at the labelled positions only (the vocabulary head is the costly part), plus
    BCE on the decision head in head mode, over a batch of (sequence, episode index) padded on
    the right. (Measured on the tiny preset: four sequences per step ran 1.17 s/step, about the
    sequences per second of one per step, so batch 1 stays the default.)"""
    model = trainee.model
    embeds = [model.joint_embed(trainee.model_ids(seq.ids)[None], trainee.frame_tokens(index, seq.frames),
                                trainee.model_img_id)[0] for seq, index in batch]
    x = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)  # (B, S, H)
    mask = (torch.arange(x.shape[1])[None] < torch.tensor([len(e) for e in embeds])[:, None]).long()
    h = model.llm.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
    h = h.reshape(-1, h.shape[-1])  # (B * S, H)
    width = x.shape[1]
    lm_pos = torch.cat([seq.lm_pos + b * width for b, (seq, _) in enumerate(batch)])
    lm_tgt = torch.cat([seq.lm_tgt for seq, _ in batch])
    logits = trainee.head_logits(h[lm_pos])  # (L, V')
    loss = F.cross_entropy(logits, trainee.model_ids(lm_tgt))
    stats = {"lm": float(loss.detach())}
    w2t_pos = torch.cat([seq.w2t_pos + b * width for b, (seq, _) in enumerate(batch)])
    head = model.decision_head
    if head is not None and len(w2t_pos):
        z = head(h[w2t_pos]).squeeze(-1)
        bce = F.binary_cross_entropy_with_logits(z, torch.cat([seq.w2t_tgt for seq, _ in batch]))
        loss = loss + bce
        stats["bce"] = float(bce.detach())
    return loss, stats


def evaluate(
    model: ProAssistModel, tokenizer: Any, chat: Any, episodes: Iterable[Episode], similarity: Any,
    settings: StreamSettings | None = None,
) -> tuple[Metrics, list[dict[str, Any]]]:
    """Run the reference streaming loop on each episode; the paper's metrics over all of them."""
    settings = settings or StreamSettings(context_strategy="drop_middle")
    per_episode, rows = [], []
    for ep in episodes:
        conv = parse_conversation(ep.conversation, ep.fps)
        loop = ReferenceLoop(model, tokenizer, chat, settings, system=conv.system)
        results = loop.run(ep.frames, conv.messages, ep.fps)
        gen = [r.text if r.talk else "" for r in results]
        m = compute_metrics(gen, ep.reference(), similarity, fps=ep.fps, window=WINDOW)
        per_episode.append(m)
        ref = ep.reference()
        rows.append({"episode": ep.uid, "f1": m.f1, "gen": m.num_gen, "ref": m.num_ref,
                     "talk": [(r.index, r.text) for r in results if r.talk],
                     "ref_talk": [(i, t) for i, t in enumerate(ref) if t]})
    return aggregate(per_episode), rows


def metrics_line(m: Metrics) -> str:
    return (f"F1 {m.f1:.3f} P {m.precision:.3f} R {m.recall:.3f} sem {m.semantic_score:.3f} "
            f"gen {m.num_gen} ref {m.num_ref}")


def train(preset: Preset, out: Path, seed: int = 0, minutes: float | None = None,
          data_seed: int = 0, ship: bool = False, command: str = "", threads: int = 1) -> dict[str, Any]:
    """Train PRESET, write out/taskworld-<name>.{safetensors,json} (and copy them into
    bench/assets with ship); returns the run summary."""
    from tqdm import tqdm

    from proassist_edge.eval.textsim import ExactSimilarity
    from proassist_edge.taskworld.models import ASSETS
    from proassist_edge.taskworld.splits import build_episode, make_episode

    # One thread by default: on a shared 2-core machine two runs side by side are far faster
    # than two threads each that wait for each other; a run alone may take both cores.
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    convs = [parse_conversation(build_episode("train", i, data_seed).conversation, 2.0)
             for i in range(preset.train_episodes)]
    trainee: Trainee = (TinyTrainee if preset.name == "tiny" else LiteTrainee)(
        preset, convs, lambda i: make_episode("train", i, data_seed).frames
    )
    builder = SequenceBuilder(PromptBuilder(trainee.tokenizer, trainee.chat), trainee.img_id,
                              trainee.tokens_per_frame, trainee.not_talk_id)
    opts = SeqOptions(preset.neg_rate, preset.eos_drop, "lm" if preset.w2t == "lm" else "head",
                      preset.keep_after, bool(preset.prompt_loss), preset.text_only)
    text = replace(opts, text_only=1.0)
    val = [make_episode("val", i, data_seed) for i in range(preset.val_episodes)]
    params = [p for p in trainee.model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=preset.lr, betas=(0.9, 0.98),
                              weight_decay=preset.weight_decay)
    sched = Schedule(preset.lr, preset.warmup, preset.steps, minutes * 60 if minutes else None)
    log_path = out / f"train-{preset.name}.jsonl"
    log = log_path.open("w")
    n_params = sum(p.numel() for p in params)
    tqdm.write(f"{preset.name}: {n_params / 1e6:.2f} M trainable parameters, "
               f"{len(convs)} train episodes, setup {time.monotonic() - t_start:.0f} s")
    bar = tqdm(total=preset.steps, desc=f"train {preset.name}", unit="step", file=sys.stdout,
               mininterval=5)
    running, step, val_m = None, 0, None
    order = epoch_order(len(convs), rng)
    while step < preset.steps and sched.progress(step) < 1.0:
        batch = []
        for _ in range(preset.batch):
            idx = next(order)
            n = trainee.num_frames(idx)
            start, end = choose_window(n, preset.window, convs[idx], rng)
            batch.append((builder.build(convs[idx], n, opts, rng, start, end), idx))
        if not len(batch[0][0].frames):  # a dialogue-only step takes text_batch of them
            for _ in range(preset.text_batch - 1):
                idx = next(order)
                batch.append((builder.build(convs[idx], trainee.num_frames(idx), text, rng), idx))
        trainee.model.train()
        trainee.freeze_modes()
        loss, stats = sequence_loss(trainee, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in optim.param_groups:
            g["lr"] = sched(step)
        optim.step()
        step += 1
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.update()
        tokens = sum(len(seq) for seq, _ in batch)
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{sched(step):.1e}", tokens=tokens)
        log.write(json.dumps({"step": step, "loss": value, **stats, "tokens": tokens}) + "\n")
        if val and (step % preset.val_every == 0):
            val_m = validate(trainee, val, ExactSimilarity())
            tqdm.write(f"step {step} val ({len(val)} episodes, exact match): {metrics_line(val_m)}")
            log.write(json.dumps({"step": step, "val": val_m.to_dict()}) + "\n")
        log.flush()
    bar.close()
    wall = time.monotonic() - t_start
    summary = {
        "command": command, "seed": seed, "data_seed": data_seed, "preset": asdict(preset),
        "steps_done": step, "stopped_by": "steps" if step >= preset.steps else "minutes",
        "schedule_time_driven": sched.time_driven, "wall_clock_s": round(wall, 1),
        "trainable_params": n_params, "threads": threads,
    }
    name = f"taskworld-{preset.name}"
    trainee.pack(out / name, summary)  # saved before anything else can fail
    if val and (val_m is None or step % preset.val_every):
        val_m = validate(trainee, val, ExactSimilarity())
        tqdm.write(f"final val ({len(val)} episodes, exact match): {metrics_line(val_m)}")
    if val_m is not None:
        summary["val_exact"] = val_m.to_dict()
        trainee.pack(out / name, summary)
    if ship:
        ASSETS.mkdir(exist_ok=True)
        for suffix in (".safetensors", ".json"):
            (ASSETS / (name + suffix)).write_bytes((out / (name + suffix)).read_bytes())
    tqdm.write(f"done: trained in {wall / 60:.1f} min: {out / name}.safetensors")
    log.close()
    return summary


def validate(trainee: Trainee, episodes: list[Episode], similarity: Any) -> Metrics:
    model, tok, chat = trainee.eval_model()
    settings = StreamSettings(context_strategy="drop_middle", max_reply_tokens=40)
    m, rows = evaluate(model, tok, chat, episodes, similarity, settings)
    first = rows[0]
    talk = ", ".join(f"{i}:{t[:40]!r}" for i, t in first["talk"][:4])
    ref = ", ".join(f"{i}:{t[:40]!r}" for i, t in first["ref_talk"][:4])
    print(f"  {first['episode']} said [{talk}]\n  reference [{ref}]", flush=True)
    return m


# --- the CLI -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", type=Path, help="run folder (compact checkpoint, log)")
    p.add_argument("--minutes", type=float, help="wall-clock budget; the schedule ends with it")
    p.add_argument("--seed", type=int, default=0, help="model init and sampling seed")
    p.add_argument("--data-seed", type=int, default=0, help="task-world split seed")
    p.add_argument("--ship", action="store_true", help="copy the result into bench/assets")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: leave a core to others)")
    for f in fields(Preset):
        if f.name != "name":
            p.add_argument("--" + f.name.replace("_", "-"), type=type(PRESETS["tiny"].__dict__[f.name]),
                           dest=f.name, help=f"override the preset's {f.name}")
    p.add_argument("--evaluate", metavar="CKPT",
                   help="skip training: evaluate a checkpoint folder or shipped name instead")
    p.add_argument("--split", default="test", help="split for --evaluate")
    p.add_argument("--episodes", type=int, default=20, help="episodes for --evaluate")
    p.add_argument("--similarity", choices=["minilm", "exact"], default="minilm")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--record", action="store_true",
                   help="with --evaluate of a shipped name: store the metrics in its asset json")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a ProAssist checkpoint on the task world")
    add_arguments(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    if args.evaluate:
        return run_evaluate(args)
    if args.out is None:
        print("--out DIR is required to train", file=sys.stderr)
        return 2
    over = {f.name: getattr(args, f.name) for f in fields(Preset)
            if f.name != "name" and getattr(args, f.name, None) is not None}
    preset = replace(PRESETS[args.preset], **over)
    command = "python -m proassist_edge.taskworld.train " + shlex.join(sys.argv[1:])
    train(preset, args.out, args.seed, args.minutes, args.data_seed, args.ship, command, args.threads)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from proassist_edge.eval.textsim import ExactSimilarity, SentenceSimilarity
    from proassist_edge.export.checkpoint import load_checkpoint
    from proassist_edge.taskworld.models import asset_paths, materialise, shipped_checkpoint
    from proassist_edge.taskworld.splits import iter_episodes

    torch.set_num_threads(1)
    ckpt = shipped_checkpoint(args.evaluate) or Path(args.evaluate)
    compact = Path(args.evaluate).with_suffix(".safetensors")
    if compact.is_file() and compact.with_suffix(".json").is_file():  # a run's compact output
        ckpt = materialise(compact, compact.with_suffix(".json"))
    ck = load_checkpoint(ckpt)
    sim = SentenceSimilarity() if args.similarity == "minilm" else ExactSimilarity()
    settings = StreamSettings(threshold=args.threshold, context_strategy="drop_middle")
    t0 = time.monotonic()
    m, rows = evaluate(ck.model, ck.tokenizer, ck.chat,
                       iter_episodes(args.split, args.episodes, args.data_seed), sim, settings)
    print(f"{args.evaluate} on {args.split} ({args.episodes} episodes, {args.similarity}, "
          f"threshold {args.threshold}, window {WINDOW}): {metrics_line(m)} "
          f"[{time.monotonic() - t0:.0f} s]")
    print(json.dumps(m.to_dict(), indent=1))
    if args.record and asset_paths(args.evaluate)[1].is_file():
        meta_path = asset_paths(args.evaluate)[1]
        meta = json.loads(meta_path.read_text())
        meta.setdefault("metrics", {})[f"{args.split}-{args.episodes}-{args.similarity}"] = {
            **m.to_dict(), "threshold": args.threshold, "window_s": list(WINDOW), "per_episode": rows,
        }
        meta_path.write_text(json.dumps(meta, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proassist_edge.taskworld.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
