"""`proassist-edge demo`: the main job, end to end, on a machine with no camera, GPU or sound card.

It takes the committed task-world model, exports and quantizes it once (cached), plays a task-world
episode (or a given source) through the on-device runtime at 2 fps, prints what the assistant says
as it says it, writes the speech to WAV files, then sets what it said beside the reference
(paired by the paper's matching, each reply marked with the content score's verdict: right step,
wrong step, an item not in the task) and ends with a one-screen summary (latency p50/p95, frames
dropped, F1 on the episode with its embedder, the content score). `--record` also writes an
annotated video; without it no frame touches the disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proassist_edge.errors import ProAssistEdgeError
from proassist_edge.events import Event, FrameEvent
from proassist_edge.runtime.conversation import MessageSchedule
from proassist_edge.runtime.messages import TextMessage

if TYPE_CHECKING:
    from proassist_edge.eval.metrics import MatchResult
    from proassist_edge.taskworld.content import ReplyVerdict

# The quantization recipes that met their targets on the test episodes (README): int8 keeps the
# vision projector fp32 (its outputs reach the hundreds), int4 keeps vision fp32 and the head and
# the attention projections 8-bit (the tiny model's copying from the task knowledge needs them).
RECIPES: dict[str, dict[str, Any]] = {
    "int8": {"keep_fp32": ["vision:projector"]},
    # blocks of 16, the head, attention and MLP down projections 8-bit: the lite model's content
    # score within 0.03 of fp32 (blocks of 32 with only head and attention 8-bit lost 0.10 of
    # its right steps: docs/quantization.md)
    "int4": {"skip": ["vision"], "keep_8bit": ["lm_head", "attn", "down_proj"], "block_size": 16},
}


# The demo's model: the lite model names the right step where the tiny one mostly does not
# (docs/taskworld.md, "Is the guidance right?"); the tiny one stays for a quick look.
DEFAULT_MODEL = "taskworld-lite"
TINY_NOTE = "smaller and faster to export, but often names the wrong step"


def cached_bundles(model: str, precision: str, short: bool) -> Path:
    """Export (and quantize) the shipped model once; later runs reuse the cached bundles."""
    from proassist_edge.export.bundle import ExportOptions, export_bundle
    from proassist_edge.paths import cache_dir
    from proassist_edge.taskworld.models import shipped_checkpoint

    ckpt = shipped_checkpoint(model)
    if ckpt is None:
        raise ProAssistEdgeError(f"no shipped model named {model!r}: use taskworld-tiny or taskworld-lite")
    # keyed by the asset version (the materialised folder's digest): a retrained model re-exports
    root = cache_dir() / "bundles" / ckpt.parent.name
    fp32 = root / "fp32"
    if not (fp32 / "manifest.json").is_file():
        print(f"exporting {model} once into {fp32} ...", flush=True)
        # the quick verification, and the optimized decoder only: the CPU demo never runs the
        # portable one (TensorRT's input), whose export, check and int8 + QDQ copies were about
        # half of a first run's minutes (`proassist-edge export` still writes both)
        export_bundle(ckpt, fp32, options=ExportOptions(variants=("optimized",)))
    if precision == "fp32":
        return fp32
    # the quick mode's recipe differs; "r4": the recipes above (fp32 projector; int4 in blocks
    # of 16 with 8-bit head, attention and down projections), at quantize_bundle's accuracy
    # level 4 (level 0 before: ~95 ms per int4 token)
    out = root / (precision + ("-quick" if short else "") + "-r4")
    if not (out / "manifest.json").is_file():
        from proassist_edge.quant import quantize_bundle

        print(f"quantizing to {precision} once into {out} ...", flush=True)
        # per-tensor scales in the quick mode: per-channel int8 of a 128k-row lm_head takes minutes
        quantize_bundle(fp32, out, precision=precision, budget="quick", per_channel=not short,
                        **RECIPES.get(precision, {}))
    return out


class MessageFeed:
    """Feeds the episode's messages to the assistant (an observer of its events): after each
    frame, those due with the next one (runtime/conversation.py MessageSchedule)."""

    def __init__(self, assistant: Any, messages: list[TextMessage], fps: float) -> None:
        self.assistant, self.fps = assistant, fps
        self.schedule = MessageSchedule(messages)

    def on_event(self, event: Event) -> None:
        if not isinstance(event, FrameEvent):
            return
        for m in self.schedule.due((event.index + 1) / self.fps):
            self.assistant.inject(m.role, m.content)


def run_demo(args: argparse.Namespace) -> int:
    from proassist_edge.device.sources import SyntheticSource, open_source
    from proassist_edge.device.speech import open_sink
    from proassist_edge.runtime.assistant import build_assistant
    from proassist_edge.runtime.bundle import open_bundle
    from proassist_edge.runtime.conversation import parse_conversation
    from proassist_edge.runtime.core import settings_from_manifest
    from proassist_edge.runtime.events import EventLog
    from proassist_edge.runtime.loop import LoopOptions, format_summary
    from proassist_edge.taskworld.splits import EpisodeRenderer, make_episode

    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    bundle_dir = args.bundle or cached_bundles(args.model, args.precision, args.short)
    bundle = open_bundle(bundle_dir)
    episode = make_episode("test", args.episode, size=64)
    frames = episode.frames[: args.frames] if args.frames else episode.frames
    if args.short:
        frames = frames[:40]
    conv = parse_conversation(episode.conversation, episode.fps)
    system = conv.system if args.source is None else bundle.manifest.model.system_prompt
    events_path = out / "events.jsonl"
    log = EventLog(events_path, console=False)
    if args.source is None:
        renderer = EpisodeRenderer(episode)
        source = SyntheticSource(
            fps=episode.fps, size=frames.shape[1:3], n_frames=len(frames), renderer=renderer
        )
        name = f"task-world episode {episode.uid} ({episode.task})"
    else:
        source = open_source(args.source, bundle.manifest.model.fps)
        name = args.source
    sink = open_sink(f"wav:{out / 'speech'}")
    width = shutil.get_terminal_size((120, 24)).columns
    printer = ReplyPrinter(width)
    assistant = build_assistant(
        bundle, source, sink, settings_from_manifest(bundle, threshold=args.threshold),
        system=system, events=[log, printer], options=LoopOptions(realtime=args.realtime),
    )
    if args.source is None:
        assistant.bus.add(MessageFeed(assistant, conv.messages, episode.fps))
    print(f"bundle {bundle_dir} ({bundle.manifest.graphs[bundle.decoder_name].precision}); source: {name}")
    print("the assistant, as it speaks:")
    try:
        summary = assistant.run()
    finally:
        log.close()
        sink.close()
    gen = printer.generated(len(frames))
    result: dict[str, Any] = {"run": summary.to_dict(), "wall_s": time.perf_counter() - t0}
    reference: list[str] = []
    if args.source is None:
        reference, rows = score_episode(gen, episode, args.embedder, result)
        print(f"\nwhat it said beside the reference (paired by the paper's matching):\n"
              f"{side_by_side(rows, width)}")
    if args.record:
        result["video"] = str(record_video(frames, gen, reference, episode.fps, out / "annotated.mp4"))
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    print(format_summary(summary))
    if "metrics" in result:
        print(score_line(result))
    print(f"speech in {out / 'speech'}; events in {events_path}; {result['wall_s']:.0f} s in all")
    return summary.exit_code


def score_episode(
    gen: list[str], episode: Any, embedder: str | None, result: dict[str, Any]
) -> tuple[list[str], list[DialogueRow]]:
    """The paper's metrics and the content score of the replies (into `result`), the reference
    per frame as the paper's evaluator reads it, and the rows of the side-by-side table."""
    from proassist_edge.eval.evaluate import evaluator_reference
    from proassist_edge.eval.metrics import match_utterances, metrics_from_tally, tally_from_match
    from proassist_edge.eval.textsim import describe_similarity, make_similarity
    from proassist_edge.taskworld.content import content_tally, pairs_of, reply_verdicts

    reference = evaluator_reference(episode.conversation, len(gen))
    similarity = make_similarity(embedder)
    match = match_utterances(gen, reference, similarity, fps=episode.fps)
    result["metrics"] = metrics_from_tally(tally_from_match(match, gen, reference, fps=episode.fps)).to_dict()
    result["embedder"] = describe_similarity(similarity)
    pairs = pairs_of(match)
    result["content"] = content_tally(gen, episode.metadata, pairs).to_dict()
    verdicts = {v.frame: v for v in reply_verdicts(gen, episode.metadata, pairs)}
    return reference, dialogue_rows(gen, reference, match, verdicts, episode.fps)


def score_line(result: Mapping[str, Any]) -> str:
    """The summary's scores: F1 with its embedder, and the content score."""
    from proassist_edge.taskworld.content import content_line

    m = result["metrics"]
    return (f"episode F1 {m['F1']:.2f} (precision {m['precision']:.2f}, recall {m['recall']:.2f}; "
            f"embedder {result['embedder']['name']}); {content_line(result['content'])}")


@dataclass(frozen=True)
class DialogueRow:
    """One row of the side-by-side table: a reply and the reference it was paired with, a reply
    paired with none, or a reference nobody answered."""

    t: float  # seconds: the reply's time, or the missed reference's
    said: str
    reference: str
    mark: str


def verdict_mark(verdict: ReplyVerdict | None, paired: bool) -> str:
    """The content score's verdict on a reply, in a few words."""
    marks = [] if paired else ["redundant"]
    if verdict is not None and verdict.right_step is not None:
        marks.append("✓ right step" if verdict.right_step else "✗ wrong step")
    if verdict is not None and verdict.foreign:
        marks.append("✗ not in task: " + ", ".join(sorted(verdict.foreign)))
    return "; ".join(marks)


def dialogue_rows(
    gen: Sequence[str], ref: Sequence[str], match: MatchResult,
    verdicts: Mapping[int, ReplyVerdict], fps: float,
) -> list[DialogueRow]:
    """Every reply beside the reference the matching paired it with, and every missed reference,
    in time order."""
    rows = [(p.gen_frame, DialogueRow(p.gen_frame / fps, gen[p.gen_frame], ref[p.ref_frame],
                                      verdict_mark(verdicts.get(p.gen_frame), paired=True)))
            for p in match.pairs]
    rows += [(i, DialogueRow(i / fps, gen[i], "", verdict_mark(verdicts.get(i), paired=False)))
             for i in match.redundant]
    rows += [(j, DialogueRow(j / fps, "", ref[j], "missed")) for j in match.missed]
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` at word boundaries; a word longer than that keeps its own line."""
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]


def side_by_side(rows: Sequence[DialogueRow], width: int = 120) -> str:
    """The table, each text wrapped at word boundaries into its column (nothing is cut)."""
    mark_w = max([len("verdict"), *(len(r.mark) for r in rows)])
    text_w = max(20, (width - 7 - mark_w - 6) // 2)  # time, three gaps of two, the marks

    def line(t: str, a: str, b: str, mark: str) -> str:
        return f"{t:>7}  {a:<{text_w}}  {b:<{text_w}}  {mark}".rstrip()

    out = [line("time", "assistant", "reference", "verdict")]
    for r in rows:
        said = wrap(r.said, text_w)
        ref = wrap(r.reference, text_w)
        for k in range(max(len(said), len(ref))):
            out.append(line(f"{r.t:.1f}s" if k == 0 else "", said[k] if k < len(said) else "",
                            ref[k] if k < len(ref) else "", r.mark if k == 0 else ""))
    return "\n".join(out)


class ReplyPrinter:
    """Prints each reply as it is said, with its stream time, wrapped to the terminal."""

    def __init__(self, width: int = 120) -> None:
        self.width = max(40, width)
        self.said: dict[int, str] = {}

    def on_event(self, event: Event) -> None:
        if not isinstance(event, FrameEvent) or not (event.talk and event.text):
            return
        self.said[event.index] = event.text
        stamp = f"{event.t:6.1f}s  "
        print(textwrap.fill(event.text, self.width, initial_indent=stamp, break_long_words=False,
                            subsequent_indent=" " * len(stamp)), flush=True)

    def generated(self, n: int) -> list[str]:
        return [self.said.get(i, "") for i in range(n)]


def record_video(frames: Any, gen: list[str], ref: list[str], fps: float, path: Path) -> Path:
    """Opt-in only: the frames with what was said drawn on them, as an mp4 (PyAV)."""
    import av
    import cv2
    import numpy as np

    scale = max(1, 384 // frames.shape[1])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        h, w = frames.shape[1] * scale, frames.shape[2] * scale + 480
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        last = ""
        for i, f in enumerate(frames):
            canvas = np.zeros((h, w, 3), np.uint8)
            canvas[:, : frames.shape[2] * scale] = cv2.resize(
                f, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST
            )
            last = gen[i] or last
            for row, (label, text) in enumerate(
                (("assistant", last), ("reference", ref[i] if i < len(ref) else ""))
            ):
                cv2.putText(
                    canvas,
                    f"{label}: {text[:48]}",
                    (frames.shape[2] * scale + 8, 30 + 30 * row),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.45,
                    (255, 255, 255),
                    1,
                )
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from proassist_edge.eval.score import add_embedder_argument

    p = sub.add_parser("demo", help="the main job: a task-world episode end to end")
    p.add_argument(
        "--model", default=DEFAULT_MODEL,
        help=f"shipped model (taskworld-lite, the default | taskworld-tiny: {TINY_NOTE})"
    )
    p.add_argument("--precision", default="int8", choices=["fp32", "int8", "int4"])
    p.add_argument("--bundle", type=Path, help="use this bundle instead of the shipped model")
    p.add_argument("--source", help="camera:0, file:PATH, ... (default: a task-world episode)")
    p.add_argument("--episode", type=int, default=0, help="task-world test episode index")
    p.add_argument("--frames", type=int, help="only the first N frames")
    p.add_argument("--threshold", type=float)
    p.add_argument("--short", action="store_true", help="a quick run (CI): 40 frames, light verification")
    p.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pace frames at 2 fps like a camera (default) or run as fast as possible",
    )
    p.add_argument("--record", action="store_true", help="also write an annotated video (opt-in)")
    add_embedder_argument(p)
    p.add_argument("-o", "--out", type=Path, default=Path("out/demo"))
    p.set_defaults(func=run_demo)
