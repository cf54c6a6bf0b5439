"""Training sequences for ProAssist, built exactly the way the streaming loops feed the model.

One episode (or a window of its frames) becomes one token sequence, read through
`parse_conversation` (the reading replay and evaluation use) and assembled with `PromptBuilder`:

    opening(system)  then per frame f:  [messages due at f]  I x <image>  [reply to f]

where a reply is ids(assistant_prefix + text) + eos. Labels follow the paper:

* the LAST placeholder of every frame predicts the "not talk" token on a silent frame (kept with
  probability `neg_rate`, the paper's negative-frame sampling) and the first token of the
  assistant prefix on a talk frame;
* the `keep_after` silent frames right after a reply always keep their label: the step just
  confirmed is still in view there, and a model trained with them sampled away speaks twice in
  a row (measured on the task world: most of the lite model's errors began with such a repeat);
* every reply token predicts the next one, the last text token predicts eos;
* the streaming loop does not feed a reply's final eos back (the authors' behaviour), so with
  probability `eos_drop` the eos is left out of the INPUT while its label stays;
* with a binary decision head, the frame labels are BCE targets on the last placeholder instead
  (1 = not talk, the authors' convention); talk frames keep their LM label for the reply's start;
* `prompt_loss` (ours, not the paper's, for models trained from scratch): the opening's tokens
  predict each other too. The task knowledge repeats its own items ("2. Put the red block to
  the right of the purple block."), dense practice at the copying the replies need.
* `text_only` (ours, likewise): with this probability a sequence is the dialogue alone, frames
  left out. Without the ~500 frame tokens a step costs a fraction of a full one, and the replies
  are still fixed by the knowledge and the turns before them ("next is X" ... "X is on, now Y"),
  so the model gets many more lookups in the knowledge for the same time (train.py batches
  several per step). Measured on the tiny model: full episodes only, it never copied an item
  from the knowledge in 10 minutes; with 70% dialogue-only steps of 4 it does.
* `history` (ours, likewise): a window that starts mid-episode gets the dialogue before it
  (messages and replies, supervised) as text between the opening and its first frame. The
  streaming loop always has that history in its context; without it a window's model must guess
  the step from the picture alone, and the lite model trained that way named the wrong step in
  a fifth of its replies (docs/taskworld.md).
* `slip` (ours, likewise; a DAgger-style recovery lesson): with this probability a correction's
  reply is replaced by the slip the streaming model makes there, confirming the step it expected
  (the text of that step's later confirmation), and the words of the slip are not supervised;
  the replies after it keep the reference's. The streaming loop feeds the model its own replies,
  and a model trained only on the reference's never saw its own missed correction in its
  context: measured on the lite model, it then counted the steps one ahead for the rest of the
  task (a missed correction cost three to five replies). With the slip in its context, the
  reference teaches it to confirm the same step again when the wrong item is removed and the
  right one placed.
* `correct_weight` (ours, likewise): the LM loss of a correction's reply, and of the reply after
  it (the confirmation once the right item is placed), weighs this much in the sequence's mean,
  where its frames are in the sequence. Those are the few replies that need the frames to see a
  wrong item; at every other placement counting the dialogue's steps gives the words.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from proassist_edge.runtime.conversation import ConversationInputs
from proassist_edge.runtime.prompt import PromptBuilder


@dataclass(frozen=True)
class SeqOptions:
    neg_rate: float = 1.0  # probability of keeping a silent frame's label
    eos_drop: float = 0.5  # probability of leaving a reply's eos out of the input
    w2t: str = "lm"  # "lm": not-talk token via the LM head; "head": BCE on a decision head
    keep_after: int = 0  # silent frames right after a reply that always keep their label
    prompt_loss: bool = False  # the opening's tokens are supervised too (module docstring)
    text_only: float = 0.0  # probability that a sequence leaves its frames out (module docstring)
    history: bool = False  # a window's earlier dialogue goes before it as text (module docstring)
    slip: float = 0.0  # probability that a correction is replaced by the model's slip (docstring)
    correct_weight: float = 1.0  # LM-loss weight of a correction and the reply after it (docstring)


@dataclass
class TrainSequence:
    ids: torch.Tensor  # (S,) long; <image> placeholders where frame tokens go
    frames: torch.Tensor  # (F,) episode frame index of each frame in the sequence, in order
    frame_last: torch.Tensor  # (F,) position of each frame's last placeholder
    lm_pos: torch.Tensor  # (L,) positions whose next token is supervised
    lm_tgt: torch.Tensor  # (L,) the supervised next tokens
    w2t_pos: torch.Tensor  # (K,) head mode: frame positions with a BCE target
    w2t_tgt: torch.Tensor  # (K,) float, 1.0 = not talk
    lm_w: torch.Tensor | None = None  # (L,) float loss weight of each label; None = all 1

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class SequenceBuilder:
    """Turns a parsed conversation (and a frame window) into a labelled TrainSequence."""

    def __init__(self, pb: PromptBuilder, img_id: int, tokens_per_frame: int, not_talk_id: int) -> None:
        eos = pb.tok.token_to_id(pb.chat.eos)
        if eos is None:
            raise ValueError(f"eos token {pb.chat.eos!r} missing from the tokenizer")
        self.pb, self.img_id, self.tpf, self.not_talk_id, self.eos_id = (
            pb, img_id, tokens_per_frame, not_talk_id, eos
        )
        self._reply_cache: dict[str, list[int]] = {}

    def reply_ids(self, text: str) -> list[int]:
        """The reply as the model writes it: assistant header + text (eos not included)."""
        if text not in self._reply_cache:
            self._reply_cache[text] = self.pb.ids(self.pb.chat.assistant_prefix + text)
        return self._reply_cache[text]

    def build(
        self,
        conv: ConversationInputs,
        num_frames: int,
        opts: SeqOptions,
        rng: np.random.Generator,
        start: int = 0,
        end: int | None = None,
        corrections: tuple[int, ...] = (),
    ) -> TrainSequence:
        """Frames [start, end) of the episode; the messages and replies due before `start` are
        left out (their answers lie before the window too), or with `opts.history` put before
        the window as text. CORRECTIONS: the frames of the episode's corrections, which
        `opts.slip` may turn into slips."""
        end = num_frames if end is None else min(end, num_frames)
        lo = 0 if opts.history else start
        due: dict[int, list[int]] = {}
        for m, f in zip(conv.messages, conv.message_frames, strict=True):
            if lo <= f < end:
                due.setdefault(f, []).extend(self.pb.message(m.role, m.content))
        text = opts.text_only > 0 and rng.random() < opts.text_only
        # a dialogue-only sequence gets no slips: without the frames, a slip and the confirmation
        # that repeats it would teach the model to repeat itself
        replies, slipped, echoes = self.slips(conv, () if text else corrections, opts.slip, rng)
        heavy = set() if opts.correct_weight == 1 or text else (  # corrections, the replies after
            set(corrections) | {self.reply_after(conv, fc) for fc in corrections}) - {None}
        heavy_spans: list[tuple[int, int]] = []  # [a, b) of lm_pos: the labels of a heavy reply
        ids = list(self.pb.opening(conv.system, ""))
        lm_pos: list[int] = list(range(len(ids) - 1)) if opts.prompt_loss else []
        lm_tgt: list[int] = ids[1:] if opts.prompt_loss else []
        w2t_pos: list[int] = []
        w2t_tgt: list[float] = []
        frame_last: list[int] = []
        last_talk = -(10**9)
        for f in range(lo, end):
            ids += due.get(f, [])
            reply = replies.get(f)
            if text or f < start:  # the dialogue alone: no placeholders, no frame labels
                taught = f not in slipped and f not in echoes
                if reply:
                    last_talk = f
                    r = self.reply_ids(reply)
                    if taught:
                        lm_pos += range(len(ids) - 1, len(ids) + len(r))
                        lm_tgt += r + [self.eos_id]
                    ids += r + [self.eos_id]
                continue
            ids += [self.img_id] * self.tpf
            last = len(ids) - 1
            frame_last.append(last)
            if reply:
                last_talk = f
                r = self.reply_ids(reply)
                first = len(lm_pos)
                lm_pos.append(last)
                lm_tgt.append(r[0])
                if opts.w2t == "head":
                    w2t_pos.append(last)
                    w2t_tgt.append(0.0)
                base = len(ids)
                ids += r
                if f not in slipped:  # a slip's decision to talk is right, its words are not
                    lm_pos += range(base, base + len(r))
                    lm_tgt += r[1:] + [self.eos_id]
                if f in heavy:
                    heavy_spans.append((first, len(lm_pos)))
                if rng.random() >= opts.eos_drop:
                    ids.append(self.eos_id)
            elif f - last_talk <= opts.keep_after or rng.random() < opts.neg_rate:
                if opts.w2t == "head":
                    w2t_pos.append(last)
                    w2t_tgt.append(1.0)
                else:
                    lm_pos.append(last)
                    lm_tgt.append(self.not_talk_id)
        lm_w = None
        if heavy_spans:
            lm_w = torch.ones(len(lm_pos))
            for a, b in heavy_spans:
                lm_w[a:b] = opts.correct_weight
        return TrainSequence(
            ids=torch.tensor(ids, dtype=torch.long),
            frames=torch.arange(start, start if text else end, dtype=torch.long),
            frame_last=torch.tensor(frame_last, dtype=torch.long),
            lm_pos=torch.tensor(lm_pos, dtype=torch.long),
            lm_tgt=torch.tensor(lm_tgt, dtype=torch.long),
            w2t_pos=torch.tensor(w2t_pos, dtype=torch.long),
            w2t_tgt=torch.tensor(w2t_tgt, dtype=torch.float32),
            lm_w=lm_w,
        )

    @staticmethod
    def reply_after(conv: ConversationInputs, frame: int) -> int | None:
        """The frame of the first reply after FRAME (after a correction: the confirmation once the
        right item is placed; task-world episodes say nothing between the two)."""
        return min((f for f in conv.replies if f > frame), default=None)

    @staticmethod
    def slips(conv: ConversationInputs, corrections: tuple[int, ...], rate: float,
              rng: np.random.Generator) -> tuple[dict[int, str], set[int], set[int]]:
        """(the replies with some corrections turned into slips, the frames of the slips, the
        frames of the replies they echo). A slip says what the next reply after the correction
        says: the confirmation of the step the user got wrong (task-world episodes say nothing
        between the two). That echo is supervised only where its frames are in the sequence:
        the removal and the placing again are what tell it from a repetition."""
        if rate <= 0 or not corrections:
            return conv.replies, set(), set()
        replies, slipped, echoes = dict(conv.replies), set(), set()
        for fc in corrections:
            nxt = SequenceBuilder.reply_after(conv, fc)
            if fc in replies and nxt is not None and rng.random() < rate:
                replies[fc] = conv.replies[nxt]
                slipped.add(fc)
                echoes.add(nxt)
        return replies, slipped, echoes


def choose_window(
    num_frames: int, window: int, conv: ConversationInputs, rng: np.random.Generator,
    focus: tuple[int, ...] = (), focus_rate: float = 0.0,
) -> tuple[int, int]:
    """A window of `window` frames (0 = the whole episode); a third of the time it starts at 0
    (where the greeting and the opening request are), otherwise anywhere. With probability
    `focus_rate` it holds one of the `focus` frames (the episode's corrections) and the frames
    after it: a missed correction costs every later step of the task (docs/taskworld.md), and
    corrections are a few percent of the replies."""
    if window <= 0 or num_frames <= window:
        return 0, num_frames
    if focus and rng.random() < focus_rate:
        f = int(focus[int(rng.integers(0, len(focus)))])
        start = min(max(0, f - int(rng.integers(2, max(3, window // 3)))), num_frames - window)
        return start, start + window
    if rng.random() < 1 / 3:
        return 0, window
    start = int(rng.integers(0, num_frames - window + 1))
    return start, start + window


def used_token_ids(pb: PromptBuilder, convs: list[ConversationInputs], not_talk: int) -> torch.Tensor:
    """Every token id a training sequence can hold or predict (sorted)."""
    used = {not_talk, *pb.ids(pb.chat.eos), *pb.ids(pb.chat.assistant_prefix)}
    for conv in convs:
        used.update(pb.opening(conv.system, ""))
        for m in conv.messages:
            used.update(pb.message(m.role, m.content))
        for text in conv.replies.values():
            used.update(pb.ids(pb.chat.assistant_prefix + text))
    return torch.tensor(sorted(used), dtype=torch.long)


def epoch_order(n: int, rng: np.random.Generator) -> Iterator[int]:
    while True:
        yield from (int(i) for i in rng.permutation(n))


class Schedule:
    """Linear warmup, then cosine to 10% of the peak, over progress = max(step / steps,
    elapsed / budget): deterministic as long as the step fraction stays ahead of the time
    fraction (`time_driven` records whether it ever fell behind)."""

    def __init__(self, lr: float, warmup: int, steps: int, seconds: float | None) -> None:
        self.lr, self.warmup, self.steps, self.seconds = lr, warmup, steps, seconds
        self.time_driven = False
        self.t0 = time.monotonic()

    def progress(self, step: int) -> float:
        p = step / self.steps
        if self.seconds:
            t = (time.monotonic() - self.t0) / self.seconds
            self.time_driven |= t > p + 1 / self.steps and step < self.steps
            p = max(p, t)
        return min(p, 1.0)

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(self.warmup, 1))
        return self.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * self.progress(step))))
