"""Can the lite model's frame tokens tell which item was just placed? A linear probe.

For every placement in the first N train episodes (the right items and the wrong ones), the
MobileNetV2 tokens the lite model gets (5 x 1280, cached as training caches them) are classified
into the item placed, by a multinomial logistic regression (torch, L2, LBFGS) fit on 75% of the
placements and scored on the rest, from (a) the frame after the placement alone and (b) its
difference from the frame before the hand reached. With --hidden, the probe reads instead the
LM's last hidden state at the placement's frame after a frames-only pass of a lite checkpoint
(what `train --see` trains a head on, taskworld/seeing.py). With --wrong, the question is the
one a reply needs: was the item just placed the wrong one? It is asked at the frame of the
reference's reply to each placement (a confirmation or a correction), of the frame tokens and of
the LM's hidden states (several layers) in the streaming context, the reference dialogue before
it included; right and wrong placements weigh the same. With --grid, (a) and (b) are asked of
the MobileNetV2 feature grid pooled finer or coarser than the lite model's tokens. docs/taskworld.md
has the figures.

    python scripts/item_probe.py --episodes 128
    python scripts/item_probe.py --episodes 64 --hidden taskworld-lite
    python scripts/item_probe.py --episodes 64 --wrong taskworld-lite
    python scripts/item_probe.py --episodes 128 --grid 1 2 3 4 7
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import numpy as np
import torch


def probe_frames(meta: dict[str, Any], n: int) -> list[tuple[int, int, str, int]]:
    """(frame after the placement, frame before the reach, "family:item", 1 if the item was
    wrong) of every placement of an episode of N frames, the steps then the mistakes."""
    from proassist_edge.taskworld.seeing import placements

    return [(min(placed + 1, n - 1), max(before, 0), f"{meta['family']}:{item}", int(k >= len(meta["steps"])))
            for k, (before, placed, item) in enumerate(placements(meta))]


def placement_tokens(episodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(after-frame tokens, after - before tokens, item labels, 1 where the item was wrong)."""
    from proassist_edge.taskworld.splits import build_episode, make_episode
    from proassist_edge.taskworld.trainees import PRESETS, LiteTrainee

    trainee = LiteTrainee(PRESETS["lite"], [], lambda i: make_episode("train", i).frames)
    after, diff, items, wrong = [], [], [], []
    for i in range(episodes):
        meta = build_episode("train", i).metadata  # the frames: rendered once, by features
        f = trainee.features(i).numpy()
        trainee._features.clear()
        for a, b, item, bad in probe_frames(meta, len(f)):
            after.append(f[a].ravel())
            diff.append((f[a] - f[b]).ravel())
            items.append(item)
            wrong.append(bad)
    return np.array(after), np.array(diff), np.array(items), np.array(wrong)


def placement_grids(episodes: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(after, before) MobileNetV2 feature grids (N, 1280, 7, 7) of every placement, and its
    item: what tokens pooled finer than the lite model's 2 x 2 would hold (--grid)."""
    from proassist_edge.taskworld.splits import build_episode, make_episode
    from proassist_edge.taskworld.trainees import PRESETS, LiteTrainee

    vision = LiteTrainee(PRESETS["lite"], [], lambda i: make_episode("train", i).frames).model.vision
    after, before, items = [], [], []
    for i in range(episodes):
        meta, frames = build_episode("train", i).metadata, make_episode("train", i).frames
        pairs = probe_frames(meta, len(frames))
        index = sorted({f for a, b, _, _ in pairs for f in (a, b)})
        with torch.no_grad():
            grids = vision.features(vision.preprocess(torch.from_numpy(frames[index])))[1]
        grid = dict(zip(index, grids, strict=True))
        for a, b, item, _ in pairs:
            after.append(grid[a])
            before.append(grid[b])
            items.append(item)
    return torch.stack(after), torch.stack(before), np.array(items)


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, scored rows): a fixed 75% / 25% shuffle of N rows."""
    order = np.random.default_rng(0).permutation(n)
    return order[: int(0.75 * n)], order[int(0.75 * n) :]


def hidden_states(episodes: int, weights: str) -> tuple[np.ndarray, np.ndarray]:
    """(last hidden state at each placement's frame, item): the window runs from 8 frames before
    the reach to the placement, frames only, through the lite checkpoint WEIGHTS."""
    from pathlib import Path

    from proassist_edge.taskworld.models import asset_paths
    from proassist_edge.taskworld.seeing import placements
    from proassist_edge.taskworld.splits import build_episode, make_episode
    from proassist_edge.taskworld.trainees import PRESETS, LiteTrainee

    shipped = asset_paths(weights)[0]
    trainee = LiteTrainee(PRESETS["lite"], [], lambda i: make_episode("train", i).frames)
    trainee.load(shipped if shipped.is_file() else Path(weights))
    trainee.model.eval()
    states, items = [], []
    for i in range(episodes):
        for before, placed, item in placements(build_episode("train", i).metadata):
            frames = torch.arange(max(before - 8, 0), min(placed + 1, trainee.num_frames(i)))
            t = trainee.frame_tokens(i, frames)
            with torch.no_grad():
                h = trainee.model.llm.model(inputs_embeds=t.reshape(1, -1, t.shape[-1])).last_hidden_state
            states.append(h[0, -1].numpy())
            items.append(item)
        trainee._features.clear()
    return np.array(states), np.array(items)


def wrong_features(episodes: int, weights: str, layers: tuple[int, ...]
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({source: rows}, 1 where the item was wrong) at every placement's reply frame of the first
    EPISODES train episodes and as many with a wrong item (train.py's `mistake_episodes`)."""
    from pathlib import Path

    from proassist_edge.runtime.conversation import parse_conversation
    from proassist_edge.runtime.prompt import PromptBuilder
    from proassist_edge.taskworld.models import asset_paths
    from proassist_edge.taskworld.seeing import placement_replies, placements
    from proassist_edge.taskworld.splits import build_episode, make_episode
    from proassist_edge.taskworld.train import mistake_episodes
    from proassist_edge.taskworld.trainees import PRESETS, LiteTrainee
    from proassist_edge.taskworld.trainseq import SeqOptions, SequenceBuilder

    preset = PRESETS["lite"]
    extra = mistake_episodes(replace(preset, train_episodes=episodes, mistakes=episodes), 0)
    indices = list(range(episodes)) + extra
    parts = [build_episode("train", i) for i in indices]
    convs = [parse_conversation(q.conversation, 2.0) for q in parts]
    trainee = LiteTrainee(preset, convs, lambda i: make_episode("train", indices[i]).frames)
    shipped = asset_paths(weights)[0]
    trainee.load(shipped if shipped.is_file() else Path(weights))
    trainee.model.eval()
    builder = SequenceBuilder(PromptBuilder(trainee.tokenizer, trainee.chat), trainee.img_id,
                              trainee.tokens_per_frame, trainee.not_talk_id)
    rows: dict[str, list[np.ndarray]] = {"frame tokens": [], "frame - before the reach": []}
    rows.update({f"hidden state, layer {k}": [] for k in layers})
    wrong = []
    for j, part in enumerate(parts):
        meta, n = part.metadata, trainee.num_frames(j)
        before = {placed: b for b, placed, _ in placements(meta)}
        seq = builder.build(convs[j], n, SeqOptions(1.0, 0.0), np.random.default_rng(0))
        tokens = trainee.frame_tokens(j, seq.frames)
        x = trainee.model.joint_embed(trainee.model_ids(seq.ids)[None], tokens, trainee.model_img_id)
        with torch.no_grad():
            hs = trainee.model.llm.model(inputs_embeds=x, output_hidden_states=True).hidden_states
        f = trainee.features(j).numpy()
        for at, bad in placement_replies(meta).items():
            b = before.get(at, at - 4)
            rows["frame tokens"].append(f[at].ravel())
            rows["frame - before the reach"].append((f[at] - f[max(b, 0)]).ravel())
            for k in layers:
                rows[f"hidden state, layer {k}"].append(hs[k][0, int(seq.frame_last[at])].numpy())
            wrong.append(int(bad))
        trainee._features.clear()
    return {k: np.array(v) for k, v in rows.items()}, np.array(wrong)


def balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Predicted labels of every row, from a logistic regression fit on the TRAIN rows."""
    classes, target = np.unique(y, return_inverse=True)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    xs = torch.from_numpy((x - mu) / sd).float()
    t = torch.from_numpy(target)
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")
    rows = torch.from_numpy(train)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs[rows] @ w + b, t[rows]) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return np.asarray(classes[(xs @ w + b).argmax(1).numpy()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=128)
    p.add_argument("--hidden", metavar="CKPT", help="probe a lite checkpoint's hidden states instead")
    p.add_argument("--wrong", metavar="CKPT", help="was the item placed wrong? (docstring)")
    p.add_argument("--layers", type=int, nargs="+", default=[8, 15, 22, 30])
    p.add_argument("--grid", type=int, nargs="+", metavar="P",
                   help="the item named from the MobileNetV2 grid pooled P x P (1: the pooled token)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.grid:
        import torch.nn.functional as F

        a, b, items = placement_grids(args.episodes)
        train, test = split(len(items))
        print(f"{len(items)} placements, {len(set(items))} items, {len(test)} scored; item named from:")
        for size in args.grid:
            pa, pb = (F.adaptive_avg_pool2d(g, size).flatten(1).numpy() for g in (a, b))
            named = [np.mean(probe(x, items, train)[test] == items[test]) for x in (pa, pa - pb)]
            print(f"  {size} x {size}: the frame after {named[0]:.3f}, "
                  f"after - before the reach {named[1]:.3f}")
        return
    if args.wrong:
        sources, wrong = wrong_features(args.episodes, args.wrong, tuple(args.layers))
        train, test = split(len(wrong))
        # the wrong placements are few: repeat them in the fit so both classes weigh the same
        bad = train[wrong[train] == 1]
        fit = np.concatenate([train] + [bad] * max(1, round((len(train) - len(bad)) / max(len(bad), 1)) - 1))
        print(f"{len(wrong)} placements ({int(wrong.sum())} wrong), {len(test)} scored "
              f"({int(wrong[test].sum())} wrong); balanced accuracy (chance 0.5):")
        for name, x in sources.items():
            pred = probe(x, wrong, fit)[test]
            print(f"  {name:28s} {balanced_accuracy(pred, wrong[test]):.3f} (wrong found: "
                  f"{np.mean(pred[wrong[test] == 1] == 1):.3f}, right called wrong: "
                  f"{np.mean(pred[wrong[test] == 0] == 1):.3f})")
        return
    if args.hidden:
        states, names = hidden_states(args.episodes, args.hidden)
        train, test = split(len(names))
        right = probe(states, names, train)[test] == names[test]
        print(f"{len(names)} placements, {len(set(names))} items, {len(test)} scored: item named from "
              f"the hidden state {right.mean():.3f}")
        return
    after, diff, items, wrong = placement_tokens(args.episodes)
    train, test = split(len(items))
    print(f"{len(items)} placements ({int(wrong.sum())} wrong items), {len(set(items))} items, "
          f"{len(test)} scored")
    for name, x in (("frame after the placement", after), ("after - before the reach", diff)):
        right = probe(x, items, train)[test] == items[test]
        print(f"{name:28s} item named: {right.mean():.3f} (wrong items: "
              f"{right[wrong[test] == 1].mean():.3f} of {int((wrong[test] == 1).sum())})")


if __name__ == "__main__":
    main()
