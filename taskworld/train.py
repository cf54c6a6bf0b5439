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
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from proassist_edge.eval.metrics import DATASET_WINDOWS, Metrics, aggregate, compute_metrics
from proassist_edge.export.model import ProAssistModel
from proassist_edge.export.reference import ReferenceLoop
from proassist_edge.runtime.conversation import ConversationInputs, parse_conversation
from proassist_edge.runtime.episode import Episode
from proassist_edge.runtime.prompt import PromptBuilder, StreamSettings
from proassist_edge.taskworld.seeing import SeeingLoss, WrongItemLoss
from proassist_edge.taskworld.trainees import PRESETS, LiteTrainee, Preset, TinyTrainee, Trainee
from proassist_edge.taskworld.trainseq import (
    Schedule,
    SeqOptions,
    SequenceBuilder,
    TrainSequence,
    choose_window,
    epoch_order,
)

WINDOW = DATASET_WINDOWS["taskworld"]


def sequence_loss(
    trainee: Trainee, batch: list[tuple[TrainSequence, int]], seeing: SeeingLoss | None = None,
    see: float = 0.0, asking: WrongItemLoss | None = None, ask: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """LM loss at the labelled positions only (the vocabulary head is the costly part), plus
    BCE on the decision head in head mode, over a batch of (sequence, episode index) padded on
    the right. (Measured on the tiny preset: four sequences per step ran 1.17 s/step, about the
    sequences per second of one per step, so batch 1 stays the default.) SEEING, weighted by
    SEE: the frames-only item lesson (taskworld/seeing.py) on each sequence with frames; ASKING,
    weighted by ASK: the wrong-item question on a middle layer (likewise)."""
    model = trainee.model
    tokens = [trainee.frame_tokens(index, seq.frames) for seq, index in batch]
    embeds = [model.joint_embed(trainee.model_ids(seq.ids)[None], t, trainee.model_img_id)[0]
              for (seq, _), t in zip(batch, tokens, strict=True)]
    x = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)  # (B, S, H)
    mask = (torch.arange(x.shape[1])[None] < torch.tensor([len(e) for e in embeds])[:, None]).long()
    out = model.llm.model(inputs_embeds=x, attention_mask=mask, use_cache=False,
                          output_hidden_states=asking is not None)
    h = out.last_hidden_state.reshape(-1, x.shape[-1])  # (B * S, H)
    width = x.shape[1]
    lm_pos = torch.cat([seq.lm_pos + b * width for b, (seq, _) in enumerate(batch)])
    lm_tgt = torch.cat([seq.lm_tgt for seq, _ in batch])
    logits = trainee.head_logits(h[lm_pos])  # (L, V')
    # the mean over the labels, weighted where `correct_weight` weighs a sequence's corrections
    w = torch.cat([torch.ones(len(seq.lm_pos)) if seq.lm_w is None else seq.lm_w for seq, _ in batch])
    loss = (F.cross_entropy(logits, trainee.model_ids(lm_tgt), reduction="none") * w).sum() / w.sum()
    stats = {"lm": float(loss.detach())}
    asked = [] if asking is None else [  # the wrong-item question on a middle layer (seeing.py)
        asking(out.hidden_states[asking.layer][b], index, seq.frames, seq.frame_last)
        for b, (seq, index) in enumerate(batch)]
    answers = [a for a in asked if a is not None]
    if answers:
        aux = torch.stack(answers).mean()
        loss = loss + ask * aux
        stats["ask"] = float(aux.detach())
    w2t_pos = torch.cat([seq.w2t_pos + b * width for b, (seq, _) in enumerate(batch)])
    head = model.decision_head
    if head is not None and len(w2t_pos):
        z = head(h[w2t_pos]).squeeze(-1)
        bce = F.binary_cross_entropy_with_logits(z, torch.cat([seq.w2t_tgt for seq, _ in batch]))
        loss = loss + bce
        stats["bce"] = float(bce.detach())
    if seeing is not None:
        pairs = zip(batch, tokens, strict=True)
        seen = (seeing(model.llm, t, index, seq.frames) for (seq, index), t in pairs)
        parts = [s for s in seen if s is not None]  # None: nothing labelled (or no frames)
        if parts:
            aux = torch.stack(parts).mean()
            loss = loss + see * aux
            stats["see"] = float(aux.detach())
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
          data_seed: int = 0, ship: bool = False, command: str = "", threads: int = 1,
          init: Path | None = None) -> dict[str, Any]:
    """Train PRESET, write out/taskworld-<name>.{safetensors,json} (and copy them into
    taskworld/assets with ship); returns the run summary. INIT: a lite run's compact weights
    (or a shipped name's) to start from."""
    from tqdm import tqdm

    from proassist_edge.eval.textsim import ExactSimilarity
    from proassist_edge.taskworld.models import ship_run
    from proassist_edge.taskworld.splits import build_episode, make_episode

    # One thread by default: on a shared 2-core machine two runs side by side are far faster
    # than two threads each that wait for each other; a run alone may take both cores.
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    indices = list(range(preset.train_episodes)) + mistake_episodes(preset, data_seed)
    parts = [build_episode("train", i, data_seed) for i in indices]
    convs = [parse_conversation(p.conversation, 2.0) for p in parts]
    corrections = [tuple(int(e["frame"]) for e in p.metadata["events"] if e["type"] == "correct")
                   for p in parts]
    trainee: Trainee = (TinyTrainee if preset.name == "tiny" else LiteTrainee)(
        preset, convs, lambda i: make_episode("train", indices[i], data_seed).frames
    )
    if init is not None:
        trainee.load(init)
    batches = Batches(preset, trainee, convs, rng, corrections)
    val = [make_episode("val", i, data_seed) for i in range(preset.val_episodes)]
    params = [p for p in trainee.model.parameters() if p.requires_grad]
    seeing = None
    if preset.see:
        seeing = SeeingLoss(trainee.model.llm.config.hidden_size, [p.metadata for p in parts],
                            preset.see_layer)
        params += list(seeing.parameters())  # the head is not saved: a training-only lesson
    asking = None
    if preset.ask:
        asking = WrongItemLoss(trainee.model.llm.config.hidden_size, [p.metadata for p in parts],
                               preset.ask_layer)
        params += list(asking.parameters())  # likewise
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
    while step < preset.steps and sched.progress(step) < 1.0:
        batch = batches.draw()
        stats = optimizer_step(trainee, batch, optim, params, sched(step), seeing, preset.see,
                               asking, preset.ask)
        step += 1
        value = stats.pop("loss")
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
        "trainable_params": n_params, "threads": threads, "init": str(init) if init else None,
    }
    name = f"taskworld-{preset.name}"
    finish(trainee, out / name, summary, val, val_m, step % preset.val_every != 0)
    if ship:
        ship_run(out, name)
    tqdm.write(f"done: trained in {wall / 60:.1f} min: {out / name}.safetensors")
    log.close()
    return summary


def mistake_episodes(preset: Preset, data_seed: int) -> list[int]:
    """The `preset.mistakes` train-split episodes after the first `train_episodes` in which the
    user places a wrong item: a third of the episodes hold a correction, too few to learn to
    see a wrong item from (docs/taskworld.md)."""
    from proassist_edge.taskworld.splits import build_episode

    found: list[int] = []
    i = preset.train_episodes
    while len(found) < preset.mistakes:
        if build_episode("train", i, data_seed).metadata.get("mistakes"):
            found.append(i)
        i += 1
    return found


class Batches:
    """The training batches of a run: episodes in epoch order, each sequence from the builder;
    a dialogue-only draw takes `text_batch` of them (they are short and cheap)."""

    def __init__(self, preset: Preset, trainee: Trainee, convs: list[ConversationInputs],
                 rng: np.random.Generator, corrections: list[tuple[int, ...]] | None = None) -> None:
        self.preset, self.trainee, self.convs, self.rng = preset, trainee, convs, rng
        self.corrections = corrections or [() for _ in convs]
        self.builder = SequenceBuilder(PromptBuilder(trainee.tokenizer, trainee.chat), trainee.img_id,
                                       trainee.tokens_per_frame, trainee.not_talk_id)
        self.opts = SeqOptions(preset.neg_rate, preset.eos_drop, "lm" if preset.w2t == "lm" else "head",
                               preset.keep_after, bool(preset.prompt_loss), preset.text_only,
                               bool(preset.history), preset.slip, preset.correct_weight)
        self.text = replace(self.opts, text_only=1.0)
        self.order: Iterator[int] = epoch_order(len(convs), rng)

    def draw(self) -> list[tuple[TrainSequence, int]]:
        preset, convs, rng = self.preset, self.convs, self.rng
        batch = []
        for _ in range(preset.batch):
            idx = next(self.order)
            n = self.trainee.num_frames(idx)
            start, end = choose_window(n, preset.window, convs[idx], rng, self.corrections[idx],
                                       preset.focus)
            batch.append((self.builder.build(convs[idx], n, self.opts, rng, start, end,
                                             self.corrections[idx]), idx))
        if not len(batch[0][0].frames):  # a dialogue-only step takes text_batch of them
            for _ in range(preset.text_batch - 1):
                idx = next(self.order)
                n = self.trainee.num_frames(idx)
                batch.append((self.builder.build(convs[idx], n, self.text, rng, 0, n,
                                                 self.corrections[idx]), idx))
        return batch


def optimizer_step(
    trainee: Trainee, batch: list[tuple[TrainSequence, int]], optim: torch.optim.Optimizer,
    params: list[torch.nn.Parameter], lr: float, seeing: SeeingLoss | None = None, see: float = 0.0,
    asking: WrongItemLoss | None = None, ask: float = 0.0,
) -> dict[str, float]:
    """One AdamW step at learning rate LR; the loss ("loss") and its parts."""
    trainee.model.train()
    trainee.freeze_modes()
    loss, stats = sequence_loss(trainee, batch, seeing, see, asking, ask)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for g in optim.param_groups:
        g["lr"] = lr
    optim.step()
    return {"loss": float(loss.detach()), **stats}


def finish(trainee: Trainee, path: Path, summary: dict[str, Any], val: list[Episode],
           val_m: Metrics | None, stale: bool) -> None:
    """Pack the run (before anything else can fail), then validate it unless the last step
    just did (STALE: it did not) and pack again with the figures."""
    from tqdm import tqdm

    from proassist_edge.eval.textsim import ExactSimilarity

    trainee.pack(path, summary)  # saved before anything else can fail
    if val and (val_m is None or stale):
        val_m = validate(trainee, val, ExactSimilarity())
        tqdm.write(f"final val ({len(val)} episodes, exact match): {metrics_line(val_m)}")
    if val_m is not None:
        summary["val_exact"] = val_m.to_dict()
        trainee.pack(path, summary)


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
    p.add_argument("--ship", action="store_true", help="copy the result into taskworld/assets")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: leave a core to others)")
    p.add_argument("--init", help="lite: start from a compact checkpoint (a run's .safetensors or a "
                   "shipped name such as taskworld-lite)")
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
    init = None
    if args.init:
        from proassist_edge.taskworld.models import asset_paths

        shipped = asset_paths(args.init)[0]
        init = shipped if shipped.is_file() else Path(args.init)
    train(preset, args.out, args.seed, args.minutes, args.data_seed, args.ship, command, args.threads,
          init)
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
    # per-text cache: training scores often; the bits of a verbatim reply matter less here
    sim = SentenceSimilarity(authors_batches=False) if args.similarity == "minilm" else ExactSimilarity()
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
