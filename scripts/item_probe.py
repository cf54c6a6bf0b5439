"""Can the lite model's frame tokens tell which item was just placed? A linear probe.

For every placement in the first N train episodes (the right items and the wrong ones), the
MobileNetV2 tokens the lite model gets (5 x 1280, cached as training caches them) are classified
into the item placed, by a multinomial logistic regression (torch, L2, LBFGS) fit on 75% of the
placements and scored on the rest, from (a) the frame after the placement alone and (b) its
difference from the frame before the hand reached. With --hidden, the probe reads instead the
LM's last hidden state at the placement's frame after a frames-only pass of a lite checkpoint
(what `train --see` trains a head on, taskworld/seeing.py). docs/taskworld.md has the figures.

    python scripts/item_probe.py --episodes 128
    python scripts/item_probe.py --episodes 64 --hidden taskworld-lite
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def placement_tokens(episodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(after-frame tokens, after - before tokens, item labels, 1 where the item was wrong)."""
    from proassist_edge.taskworld.seeing import placements
    from proassist_edge.taskworld.splits import build_episode, make_episode
    from proassist_edge.taskworld.trainees import PRESETS, LiteTrainee

    trainee = LiteTrainee(PRESETS["lite"], [], lambda i: make_episode("train", i).frames)
    after, diff, items, wrong = [], [], [], []
    for i in range(episodes):
        meta = build_episode("train", i).metadata  # the frames: rendered once, by features
        f = trainee.features(i).numpy()
        trainee._features.clear()
        for k, (before, placed, item) in enumerate(placements(meta)):  # the steps, then the mistakes
            a, b = f[min(placed + 1, len(f) - 1)], f[max(before, 0)]
            after.append(a.ravel())
            diff.append((a - b).ravel())
            items.append(f"{meta['family']}:{item}")
            wrong.append(int(k >= len(meta["steps"])))
    return np.array(after), np.array(diff), np.array(items), np.array(wrong)


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
    args = p.parse_args()
    torch.manual_seed(0)
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
