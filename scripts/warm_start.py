"""Time to first decision, and of a summary's restart, cold vs warm start (runtime/warm.py), on
one recorded episode.

    python scripts/warm_start.py BUNDLE --episode EPISODE [--decoder NAME] [--repeats 5]
        [--restarts 3 --max-seq-len 256 --reserve 32 --max-summary-tokens 16]

Each repeat starts a stream the way `replay` does (a new core: its decoder session, the opening
prompt) and steps the episode's first frame with its messages, alternately cold and warm; the
first warm start computes the cache (into a temporary user cache), the others restore it. The
clock runs from the core's construction to the end of the first frame's decision append (a stage
observer's clock: P(not talk) is known there, before any reply); the decoder session's creation
is in both, and is given apart.

The restart: the episode replayed with summarize_and_drop at a small context (so the first reset
comes within its frames), cold and warm alternately; the reset step (its decision, reply and the
summary) and the step after it (the restart: the resume message, whose opening part a warm core
restores, with the frame) are timed, and every step's decision and tokens compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--episode", type=Path, required=True)
    p.add_argument("--decoder")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--restarts", type=int, default=3, help="repeats of the restart (0: none)")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--reserve", type=int, default=32)
    p.add_argument("--max-summary-tokens", type=int, default=16)
    args = p.parse_args()
    os.environ["PROASSIST_EDGE_CACHE"] = tempfile.mkdtemp(prefix="warm-bench-")

    from proassist_edge.runtime.bundle import open_bundle
    from proassist_edge.runtime.conversation import MessageSchedule
    from proassist_edge.runtime.core import StreamCore, settings_from_manifest
    from proassist_edge.runtime.episode import episode_inputs, load_episode
    from proassist_edge.runtime.stages import Stage, StageObserver

    class Decided(StageObserver):
        at = 0.0

        def stage_ended(self, stage: Stage, out: object) -> None:
            if stage.name == "append" and not self.at:
                self.at = time.perf_counter()

    bundle = open_bundle(args.bundle, args.decoder, threads=args.threads)
    episode = load_episode(args.episode)
    inputs = episode_inputs(episode)
    first = MessageSchedule(inputs.messages).due(0.0)
    cold_settings = settings_from_manifest(bundle)
    rows: dict[str, list[tuple[float, float, float]]] = {"cold": [], "computed": [], "restored": []}
    results = set()
    for i in range(2 * args.repeats + 1):
        warm = i % 2 == 1 or i == 2 * args.repeats
        t0 = time.perf_counter()
        core = StreamCore(bundle, replace(cold_settings, warm=warm), inputs.system, inputs.knowledge)
        t1 = time.perf_counter()
        decided = Decided()
        core.observers.append(decided)
        r = core.step(episode.frames[:1], 0, 0.0, first)
        t2 = decided.at
        mode = "cold" if core.warm is None else core.warm.status
        restore = 0.0 if core.warm is None else core.warm.seconds
        rows[mode].append((1e3 * (t1 - t0 - restore), 1e3 * restore, 1e3 * (t2 - t1)))
        results.add((r.talk, r.token_ids[:1], r.context_len))
    prefix = len(core.pb.opening(inputs.system, inputs.knowledge))
    print(f"{args.bundle} decoder {bundle.decoder_name}, prefix {prefix} tokens, first frame with "
          f"{len(first)} message(s); same first decision every time: {len(results) == 1}")
    print("start     n  session ms  restore/compute ms  first decision ms  after the session ms  total ms")
    for mode, ms in rows.items():
        if not ms:
            continue
        session, restore, step = (statistics.median(x) for x in zip(*ms, strict=True))
        print(f"{mode:9s} {len(ms):2d}  {session:10.1f}  {restore:18.1f}  {step:17.1f}  "
              f"{restore + step:20.1f}  {session + restore + step:8.1f}")
    if args.restarts:
        restart = replace(cold_settings, context_strategy="summarize_and_drop",
                          max_seq_len=args.max_seq_len, reserve=args.reserve,
                          max_summary_tokens=args.max_summary_tokens)
        restarts(bundle, restart, episode.frames, inputs, args.restarts)


def restarts(bundle: Any, settings: Any, frames: Any, inputs: Any, repeats: int) -> None:
    from proassist_edge.runtime.conversation import MessageSchedule
    from proassist_edge.runtime.core import StreamCore

    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    streams: dict[bool, list[tuple[object, ...]]] = {}
    restored = 0
    for i in range(2 * repeats):
        warm = i % 2 == 1
        core = StreamCore(bundle, replace(settings, warm=warm), inputs.system, inputs.knowledge)
        schedule, steps = MessageSchedule(inputs.messages), []
        seen: list[tuple[object, ...]] = []
        for j in range(len(frames)):
            t0 = time.perf_counter()
            r = core.step(frames[j : j + 1], j, j / 2.0, schedule.due(j / 2.0))
            steps.append(time.perf_counter() - t0)
            seen.append((r.talk, r.token_ids, r.reset, r.summary_ids))
            if len(steps) >= 2 and seen[-2][2] is not None:
                break
        else:
            raise SystemExit(f"no reset within {len(frames)} frames: lower --max-seq-len")
        times[warm].append((1e3 * steps[-2], 1e3 * steps[-1]))
        streams.setdefault(warm, seen)
        if warm and core.warm is not None and core.warm.prefix is not None:
            restored = core.warm.prefix.tokens // max(1, core.warm.prefix.restores)
    print(f"restart: summarize_and_drop, max_seq_len {settings.max_seq_len}, reserve "
          f"{settings.reserve}, summaries capped at {settings.max_summary_tokens} tokens; first "
          f"reset after frame {len(streams[False]) - 2}; warm restores {restored} tokens at the "
          f"restart; same decisions and tokens: {streams[False] == streams[True]}")
    print("start   n  reset step ms  restart step ms")
    for warm, ms in times.items():
        reset, after = (statistics.median(x) for x in zip(*ms, strict=True))
        print(f"{'warm' if warm else 'cold':5s} {len(ms):3d}  {reset:13.1f}  {after:15.1f}")


if __name__ == "__main__":
    main()
