"""`proassist-edge run` (live source -> speech) and `proassist-edge replay` (recorded episode ->
per-frame JSONL). The CLI only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from proassist_edge.runtime.prompt import CONTEXT_STRATEGIES

SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def diff_margin(text: str) -> float:
    """argparse type of --diff-margin: a drop of P(not talk) in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a drop of P(not talk) in [0, 1), e.g. 0.1")
    return value


def add_talk_rule_arguments(p: argparse.ArgumentParser, threshold_help: str, many: bool = False) -> None:
    """--threshold (one, or with `many` a sweep) or --diff-margin, and --feed-eos: the talk
    rule's options, shared by run, replay and eval (None when not given: the bundle's)."""
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, nargs="+" if many else None, help=threshold_help)
    rule.add_argument("--diff-margin", type=diff_margin, metavar="M",
                      help="the authors' diff rule instead of a threshold: talk when P(not talk) "
                           "fell by more than M since the previous frame, else when P <= 0.5")
    p.add_argument("--feed-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="feed a reply's final eos back, as training sequences hold it "
                        "(default: the bundle's; the authors' loop does not)")


def talk_rule_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"diff_margin": args.diff_margin, "feed_eos": args.feed_eos}


def add_warm_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warm", action="store_true",
                   help="restore the opening prompt's KV from the warm-start cache: BUNDLE/warm, "
                        "or the user cache (~/.cache/proassist-edge/warm, or under "
                        "$PROASSIST_EDGE_CACHE), where it is computed and saved when missing; "
                        "same decisions and replies, a faster first frame")


def add_ep_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                   help="onnxruntime execution provider (auto: the best this onnxruntime offers, "
                        "TensorRT > CUDA > CPU; a named one that fails is an error that says why)")


def apply_ep(args: argparse.Namespace) -> str:
    """--ep for every bundle the command opens (the library reads it from the environment)."""
    from proassist_edge.runtime.providers import set_default_ep

    set_default_ep(args.ep)
    return str(args.ep)


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder (proassist-edge export)")
    add_talk_rule_arguments(p, "talk when P(not talk) <= T (default: bundle's)")
    p.add_argument("--context", choices=CONTEXT_STRATEGIES, help="what to do when memory is full")
    p.add_argument("--max-seq-len", type=int, help="memory length in tokens (<= the bundle's)")
    p.add_argument("--max-reply-tokens", type=int, help="cap on one reply (default: bundle's)")
    p.add_argument("--decoder", help="decoder graph of the bundle (default: the bundle's choice)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per physical core)")
    add_ep_argument(p)
    p.add_argument("--quiet", action="store_true", help="no live console lines")
    add_warm_argument(p)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "threshold": args.threshold, "context_strategy": args.context,
        "max_seq_len": args.max_seq_len, "max_reply_tokens": args.max_reply_tokens,
        **talk_rule_overrides(args), "warm": args.warm,
    }


# --- replay --------------------------------------------------------------------------------------
def add_replay_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "replay", help="process a recorded episode deterministically (every frame, none dropped)"
    )
    _settings_args(p)
    p.add_argument("--episode", required=True, type=Path,
                   help="folder with frames.npy or images, conversation.json [, metadata.json]")
    p.add_argument("--events", required=True, type=Path, help="per-frame JSONL output")
    p.set_defaults(func=run_replay)
    return p


def run_replay(args: argparse.Namespace) -> int:
    import time

    from proassist_edge.runtime.replay import replay_episode

    apply_ep(args)
    t0 = time.monotonic()
    results = replay_episode(
        args.bundle, args.episode, _overrides(args), args.events, args.decoder,
        console=not args.quiet, threads=args.threads,
    )
    wall = time.monotonic() - t0
    talks = sum(r.talk for r in results)
    resets = sum(r.reset is not None for r in results)
    skipped = sum(r.p_not_talk != r.p_not_talk for r in results)  # NaN: skipped step
    per = 1e3 * wall / max(1, len(results))
    print(f"replayed {len(results)} frames in {wall:.1f} s ({per:.1f} ms/frame): {talks} talk, "
          f"{resets} context resets, {skipped} skipped; events: {args.events}")
    return 0


# --- run -----------------------------------------------------------------------------------------
def add_run_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from proassist_edge.device.sources import SPECS
    from proassist_edge.device.speech import SINK_SPECS

    p = sub.add_parser("run", help="run the assistant on a live source and speak")
    _settings_args(p)
    p.add_argument("--source", required=True, help=f"frames from: {SPECS}")
    p.add_argument("--tts", required=True, help=f"speech to: {SINK_SPECS}")
    p.add_argument("--events", type=Path, help="write every event as JSONL to this file")
    p.add_argument("--max-seconds", type=float, help="stop after this much stream time")
    p.add_argument("--speech-mode", choices=["queue", "interrupt"], default="queue",
                   help="queue: say everything in order; interrupt: a new reply cuts the old")
    p.add_argument("--stdin-messages", action="store_true",
                   help="read messages from stdin, one per line ('user: ...', 'system: ...')")
    p.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=True,
                   help="pace files and synthetic sources like a camera (default); "
                        "--no-realtime processes every frame as fast as possible")
    p.add_argument("--fps", type=float, help="frame rate (default: the bundle's, 2)")
    p.add_argument("--queue-size", type=int, default=4, help="frames the source keeps (newest)")
    p.add_argument("--deadline-ms", type=positive_ms,
                   help="how old a frame may be when its decision is known (default: the frame "
                        "period, 500 ms at 2 fps)")
    p.add_argument("--lag-control", action=argparse.BooleanOptionalAction, default=True,
                   help="when the core falls behind the camera: cap replies, step every 2nd then "
                        "4th frame, then the bundle's cheaper decoder, and recover as it catches up "
                        "(default; it changes nothing while the core keeps up); --no-lag-control "
                        "only measures the lag")
    p.add_argument("--system", help="system prompt (default: the bundle's)")
    p.add_argument("--knowledge", default="", help="task knowledge added to the system prompt")
    p.add_argument("--knowledge-file", type=Path, help="read the task knowledge from a file")
    p.set_defaults(func=run_run)
    return p


def positive_ms(text: str) -> float:
    """argparse type of --deadline-ms: milliseconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a deadline in milliseconds > 0, e.g. 500")
    return value


def install_stop_handlers(stop: Callable[[], None]) -> Callable[[], None]:
    """SIGINT/SIGTERM call `stop` (a second SIGINT interrupts at once); returns a restorer.

    Outside the main thread (signals cannot be set there) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, SignalHandler] = {}
    hits = {"n": 0}

    def handler(signum: int, frame: FrameType | None) -> None:
        hits["n"] += 1
        if hits["n"] > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: stopping (Ctrl-C again to force)",
              file=sys.stderr, flush=True)
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def run_run(args: argparse.Namespace) -> int:
    from proassist_edge.device.sources import open_source
    from proassist_edge.device.speech import open_sink
    from proassist_edge.runtime.assistant import build_assistant
    from proassist_edge.runtime.bundle import decoder_line, open_bundle
    from proassist_edge.runtime.core import settings_from_manifest
    from proassist_edge.runtime.events import EventLog
    from proassist_edge.runtime.lag import LagOptions
    from proassist_edge.runtime.loop import LoopOptions, format_summary

    knowledge = args.knowledge
    if args.knowledge_file is not None:
        knowledge = args.knowledge_file.read_text(encoding="utf-8").strip()
    bundle = open_bundle(args.bundle, args.decoder, threads=args.threads, ep=apply_ep(args))
    print(decoder_line(bundle, args.decoder), file=sys.stderr, flush=True)
    settings = settings_from_manifest(bundle, **_overrides(args))
    log = EventLog(args.events, console=not args.quiet)
    source = open_source(args.source, args.fps or bundle.manifest.model.fps)
    sink = open_sink(args.tts)
    options = LoopOptions(
        realtime=args.realtime, max_seconds=args.max_seconds, speech_mode=args.speech_mode,
        source_capacity=args.queue_size, lag_control=args.lag_control,
        lag=LagOptions(deadline_ms=args.deadline_ms),
    )
    assistant = build_assistant(bundle, source, sink, settings, system=args.system,
                                knowledge=knowledge, events=[log], options=options)
    restore = install_stop_handlers(assistant.stop)
    try:
        if args.stdin_messages:
            assistant.read_messages(sys.stdin)
        summary = assistant.run()
    finally:
        restore()
        log.close()
        sink.close()
    summary.event_write_errors = log.write_errors
    print(format_summary(summary), flush=True)
    return summary.exit_code
