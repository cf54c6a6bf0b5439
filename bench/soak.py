"""Soak: stream hours of frames at full speed through a bundle and watch memory stay flat.

`python -m proassist_edge.bench.soak BUNDLE --hours 2 [--strategies ...] [--json OUT]` reports,
every simulated 10 minutes, resident memory, context resets and utterances, per context strategy.
Not part of the default test run (a short version is): it takes long by design.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import settings_from_manifest
from proassist_edge.runtime.prompt import CONTEXT_STRATEGIES


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class SoakReport:
    strategy: str
    frames: int
    simulated_s: float
    wall_s: float = 0.0
    checkpoints: list[dict[str, float]] = field(default_factory=list)
    resets: int = 0
    utterances: int = 0
    max_context: int = 0
    capacity: int = 0

    @property
    def memory_growth(self) -> float:
        """Last checkpoint's RSS over the second's (the first includes warm-up), minus 1."""
        if len(self.checkpoints) < 3:
            return 0.0
        return self.checkpoints[-1]["rss_mb"] / self.checkpoints[1]["rss_mb"] - 1.0


SOURCES = ("taskworld", "noise")


def frame_source(size: int, seed: int, source: str = "taskworld") -> Callable[[int], np.ndarray]:
    """Frames to stream, held in memory and cycled.

    taskworld: test-split episodes back to back, so the model speaks at the rate it was trained
    to (on noise a trained model talks at nearly every frame and the soak measures decoding);
    noise: a few random images.
    """
    if source == "taskworld":
        from proassist_edge.taskworld.splits import iter_episodes

        bank = np.concatenate([e.frames for e in iter_episodes("test", 6, seed, size)])
    else:
        rng = np.random.default_rng(seed)
        bank = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    n = len(bank)
    return lambda i: bank[i % n][None]


def soak(
    bundle_path: str | Path,
    strategy: str,
    frames: int,
    every: int = 1200,
    threshold: float | None = None,
    max_seq_len: int | None = None,
    seed: int = 0,
    source: str = "taskworld",
    reply_tokens: int | None = 16,
    threads: int = 0,
    progress: bool = False,
) -> SoakReport:
    bundle = open_bundle(bundle_path, threads=threads)
    s = settings_from_manifest(
        bundle,
        context_strategy=strategy,
        threshold=threshold,
        max_seq_len=max_seq_len,
        max_reply_tokens=reply_tokens,
        drop_middle_tail=min(512, (max_seq_len or 4096) // 4),
    )
    core = build_assistant(bundle, settings=s).core
    fps = bundle.manifest.model.fps
    rep = SoakReport(strategy, frames, frames / fps, capacity=s.kv_capacity)
    get = frame_source(bundle.manifest.model.image_size, seed, source)
    t0 = time.perf_counter()
    for i in range(frames):
        r = core.step(get(i), i, i / fps)
        rep.resets += r.reset is not None
        rep.utterances += bool(r.talk and r.text)
        rep.max_context = max(rep.max_context, r.context_len)
        if (i + 1) % every == 0 or i + 1 == frames:
            if progress:
                mb = rss_bytes() / 2**20
                print(f"  {strategy}: {(i + 1) / fps / 60:.0f} simulated min, rss {mb:.1f} MB", flush=True)
            rep.checkpoints.append(
                {
                    "simulated_min": (i + 1) / fps / 60,
                    "rss_mb": rss_bytes() / 2**20,
                    "context_len": r.context_len,
                    "resets": rep.resets,
                }
            )
    rep.wall_s = time.perf_counter() - t0
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proassist_edge.bench.soak", description=__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("--hours", type=float, default=2.0, help="simulated hours at the bundle's fps")
    p.add_argument("--strategies", nargs="+", default=list(CONTEXT_STRATEGIES), choices=CONTEXT_STRATEGIES)
    p.add_argument("--source", default="taskworld", choices=SOURCES)
    p.add_argument("--threshold", type=float)
    p.add_argument("--max-seq-len", type=int)
    # replies capped: the soak is about memory and the context strategies, not decode speed
    # (uncapped, a model that babbles on frames it never saw spends hours decoding)
    p.add_argument("--reply-tokens", type=int, default=16, help="reply cap (16)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    reports = []
    for strategy in args.strategies:
        fps = open_bundle(args.bundle, verify=False).manifest.model.fps
        rep = soak(
            args.bundle,
            strategy,
            int(args.hours * 3600 * fps),
            threshold=args.threshold,
            max_seq_len=args.max_seq_len,
            source=args.source,
            reply_tokens=args.reply_tokens,
            threads=args.threads,
            progress=True,
        )
        reports.append(rep)
        print(
            f"{strategy}: {rep.frames} frames ({rep.simulated_s / 3600:.1f} h simulated) in "
            f"{rep.wall_s:.0f} s; resets {rep.resets}, utterances {rep.utterances}, "
            f"max context {rep.max_context}/{rep.capacity}, memory growth {rep.memory_growth:+.1%}"
        )
        for c in rep.checkpoints:
            print(
                f"  {c['simulated_min']:6.0f} min  rss {c['rss_mb']:7.1f} MB  context {c['context_len']:5.0f}"
                f"  resets {c['resets']:.0f}"
            )
    if args.json:
        args.json.write_text(
            json.dumps([asdict(r) | {"memory_growth": r.memory_growth} for r in reports], indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
