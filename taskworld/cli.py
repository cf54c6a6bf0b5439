"""`proassist-edge taskworld generate`: the CLI only parses and calls generate_split."""

from __future__ import annotations

import argparse
import time
from typing import Any

from proassist_edge.taskworld.splits import (
    DEFAULT_EPISODES,
    SPLITS,
    generate_split,
    read_index,
)


def add_taskworld_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `taskworld generate` on the main CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "taskworld", help="procedural egocentric task episodes with reference dialogue")
    sub = p.add_subparsers(dest="taskworld_command", required=True)
    g = sub.add_parser("generate", help="write a split (frames.npy + ProAssist conversation)")
    g.add_argument("--split", choices=SPLITS, required=True)
    g.add_argument("-o", "--out", required=True, help="output folder")
    g.add_argument("--episodes", type=int, default=None,
                   help="episodes to write (default: " + ", ".join(
                       f"{k} {v}" for k, v in DEFAULT_EPISODES.items()) + ")")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int, default=64, help="frame side in pixels")
    p.set_defaults(func=run_taskworld)
    return p


def run_taskworld(args: argparse.Namespace) -> int:
    if args.taskworld_command != "generate":
        return 2
    t0 = time.perf_counter()
    out = generate_split(args.split, args.out, args.episodes, args.seed, args.size)
    index = read_index(out)
    frames = sum(int(e["num_frames"]) for e in index)
    tasks = len({e["task"] for e in index})
    took = time.perf_counter() - t0
    print(f"wrote {len(index)} {args.split} episodes ({tasks} tasks, {frames} frames at "
          f"{args.size}x{args.size}, seed {args.seed}) to {out} in {took:.1f} s")
    print(f"  index: {out / 'index.jsonl'}")
    return 0
