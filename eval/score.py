"""Score per-frame generated/reference texts: ``proassist-edge score FILE``.

FILE is one of:

* our JSONL: one frame record ``{"t": seconds, "gen": text, "ref": text}`` per line; "" or null
  is silent, frames without a record are silent, records may come in any order;
* one of the authors' per-sample prediction files (``{"predictions": [{"gen": ..., "ref": ...},
  ...]}``, written by their StreamInferenceRunner): one entry per frame, in stream order;
* a folder of such files (``.json`` or ``.jsonl``): one episode each, pooled as a split.

A text is talk when it is not "" (it is used as written, not stripped), as the authors' evaluator
reads its predictions.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from proassist_edge.errors import MetricsError
from proassist_edge.eval.metrics import (
    DATASET_WINDOWS,
    DEFAULT_FPS,
    DEFAULT_WINDOW,
    FALLBACK_WINDOW,
    Metrics,
    PairSimilarity,
    aggregate,
    compute_metrics,
    window_for,
)
from proassist_edge.eval.textsim import EMBEDDERS, describe_similarity, make_similarity

# A guard against timestamps in milliseconds or frames, which would make a huge frame list.
MAX_SECONDS = 24 * 3600.0


def _parse_record(line: str, lineno: int, path: Path) -> tuple[float, str, str]:
    where = f"{path}, line {lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MetricsError(
            f"{where}: not valid JSON ({exc.msg}). Each line must be one object like "
            '{"t": 1.5, "gen": "", "ref": "Attach the wheel."}'
        ) from exc
    if not isinstance(rec, dict) or not {"t", "gen", "ref"} <= rec.keys():
        raise MetricsError(
            f'{where}: expected an object with keys "t", "gen" and "ref", got {line.strip()[:80]}'
        )
    t = rec["t"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise MetricsError(f'{where}: "t" must be a number of seconds, got {t!r}')
    if not 0 <= t <= MAX_SECONDS:
        raise MetricsError(
            f'{where}: "t" = {t} is outside 0..{MAX_SECONDS:.0f} seconds: write times in '
            "seconds from the start of the episode"
        )
    texts = []
    for key in ("gen", "ref"):
        value = rec[key]
        if value is not None and not isinstance(value, str):
            raise MetricsError(f'{where}: "{key}" must be a string ("" = silent), got {value!r}')
        texts.append(value or "")
    return float(t), texts[0], texts[1]


def read_frames(path: str | Path, fps: float = DEFAULT_FPS) -> tuple[list[str], list[str]]:
    """Per-frame (generated, reference) texts of our JSONL file; frame = round(t * fps).

    Two records may land on the same frame if at most one of them has generated text and
    at most one has reference text; otherwise the file was written at a higher frame rate
    than ``fps`` and this raises ``MetricsError``.
    """
    path = Path(path)
    if not (math.isfinite(fps) and fps > 0):
        raise MetricsError(f"--fps must be a positive number, got {fps}")
    if not path.is_file():
        raise MetricsError(
            f"{path}: no such file. Pass a JSONL file with one "
            '{"t": seconds, "gen": text, "ref": text} record per line.'
        )
    gen: dict[int, tuple[str, int]] = {}
    ref: dict[int, tuple[str, int]] = {}
    last = -1
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                t, g, r = _parse_record(line, lineno, path)
                # Half-up, not Python's round-half-to-even, so that 0.25 s and 0.75 s at
                # 2 fps land on frames 1 and 2 instead of 0 and 2.
                frame = math.floor(t * fps + 0.5)
                last = max(last, frame)
                for text, slot, key in ((g, gen, "gen"), (r, ref, "ref")):
                    if not text:
                        continue
                    if frame in slot:
                        raise MetricsError(
                            f'{path}: lines {slot[frame][1]} and {lineno} both have "{key}" '
                            f"text on frame {frame} at {fps:g} fps. Pass the --fps the file "
                            "was written at, or keep one utterance per frame."
                        )
                    slot[frame] = (text, lineno)
    except UnicodeDecodeError as exc:
        raise MetricsError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    if last < 0:
        raise MetricsError(f"{path}: no records. Write one JSON object per frame.")
    n = last + 1
    return (
        [gen[i][0] if i in gen else "" for i in range(n)],
        [ref[i][0] if i in ref else "" for i in range(n)],
    )


def read_predictions(path: str | Path) -> tuple[list[str], list[str]]:
    """Per-frame (generated, reference) texts of one of the authors' prediction files.

    Frame = position in ``predictions``, as their ``find_match`` indexes it. A null reference
    (their runner writes one only for the inner frames of a multi-frame demo step) is silent.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetricsError(f"{path}: not a readable JSON file ({exc})") from exc
    preds = data.get("predictions") if isinstance(data, dict) else None
    if not isinstance(preds, list) or not preds:
        raise MetricsError(
            f'{path}: expected the authors\' prediction format {{"predictions": [{{"gen": ..., '
            '"ref": ...}, ...]}, or use our JSONL (one {"t", "gen", "ref"} object per line)'
        )
    gen, ref = [], []
    for k, p in enumerate(preds):
        g, r = (p.get("gen"), p.get("ref")) if isinstance(p, dict) else (None, None)
        if not isinstance(g, str) or not (r is None or isinstance(r, str)):
            raise MetricsError(f'{path}: predictions[{k}] needs a "gen" string and a "ref" string')
        gen.append(g)
        ref.append(r or "")
    return gen, ref


def _episode_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise MetricsError(f"{path}: no .json or .jsonl episode files in this folder")
        return files
    if not path.is_file():
        raise MetricsError(
            f"{path}: no such file. Pass a JSONL file with one "
            '{"t": seconds, "gen": text, "ref": text} record per line.'
        )
    return [path]


def score_file(
    path: str | Path,
    fps: float = DEFAULT_FPS,
    window: tuple[float, float] | None = None,
    similarity: PairSimilarity | None = None,
) -> Metrics:
    """Metrics of one episode file, or of a folder of them pooled as a split.

    ``window`` defaults to ``DEFAULT_WINDOW`` (our taskworld data); ``similarity`` defaults
    to ``make_similarity()`` (all-mpnet-base-v2, or MiniLM with a warning without it).
    """
    files = _episode_files(Path(path))
    sim = similarity if similarity is not None else make_similarity()
    episodes = []
    for f in files:
        gen, ref = read_predictions(f) if f.suffix == ".json" else read_frames(f, fps)
        episodes.append(compute_metrics(gen, ref, sim, fps=fps, window=window or DEFAULT_WINDOW))
    return aggregate(episodes)


def parse_window(value: str | Sequence[str]) -> tuple[float, float]:
    """``--window``: ``["L", "R"]`` (``--window -2 4``) or ``"L,R"`` (``--window=-2,4``) seconds."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    if len(parts) == 1:
        parts = parts[0].split(",")
    try:
        lo, hi = (float(parts[0]), float(parts[1])) if len(parts) == 2 else (math.nan,) * 2
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        shown = value if isinstance(value, str) else " ".join(value)
        raise MetricsError(
            f"--window {shown!r} is not two numbers of seconds L < R: write e.g. --window -1 3 "
            "or --window=-1,3"
        )
    return lo, hi


def resolve_window(window: str | Sequence[str] | None, dataset: str | None) -> tuple[float, float]:
    """The match window from ``--window`` or ``--dataset`` (a dataset name as the authors' evaluator
    reads it, e.g. ``ego4d/dialog_val_L0_I5``: ``window_for``); default ``DEFAULT_WINDOW``."""
    if window is not None and dataset is not None:
        raise MetricsError("pass either --window or --dataset, not both")
    if window is not None:
        return parse_window(window)
    return DEFAULT_WINDOW if dataset is None else window_for(dataset)


def add_window_argument(p: argparse.ArgumentParser, default: str = "") -> None:
    """``--window L R`` (a negative L is fine) or ``--window=L,R``; parse with ``parse_window``."""
    p.add_argument(
        "--window",
        nargs="+",
        metavar=("L", "R"),
        help="match window in seconds, e.g. --window -1 3 (or --window=-1,3); "
        f"default {default or f'{DEFAULT_WINDOW[0]:g} {DEFAULT_WINDOW[1]:g}'}",
    )


def add_embedder_argument(p: argparse.ArgumentParser) -> None:
    """``--embedder mpnet|minilm|exact|DIR``; build it with ``textsim.make_similarity``."""
    p.add_argument(
        "--embedder",
        metavar="NAME|DIR",
        help=f"sentence model for the semantic scores: {', '.join(EMBEDDERS)} or a "
        "sentence-transformers folder. Default mpnet (all-mpnet-base-v2, the paper's), "
        "or MiniLM with a warning when its packages are not installed",
    )


def add_score_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``score`` on the CLI's subparsers; it sets ``func=run_score``."""
    p = subparsers.add_parser(
        "score",
        help="ProAssist metrics of a JSONL of per-frame generated/reference texts",
        description="Match generated utterances to reference ones (the ProAssist paper's "
        "metrics) and print precision, recall, F1 and more. FILE holds one "
        '{"t": seconds, "gen": text, "ref": text} object per line, or is one of the authors\' '
        "prediction files, or a folder of episode files (pooled).",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frame rate (default 2)")
    add_window_argument(p)
    p.add_argument(
        "--dataset",
        metavar="NAME",
        help="use the paper's window for a dataset name, as the authors' evaluator picks it: "
        f"the first of {', '.join(DATASET_WINDOWS)} the name contains (e.g. "
        f"ego4d/dialog_val_L0_I5), else {FALLBACK_WINDOW[0]:g} {FALLBACK_WINDOW[1]:g}",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the metrics as JSON")
    add_embedder_argument(p)
    p.set_defaults(func=run_score)
    return p


def _print_table(metrics: Metrics, title: str, note: str | None = None) -> None:
    rows = [
        (k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.to_dict().items()
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v:>10}")
        if note:
            print(f"note: {note}")
        return
    console = Console()
    # On its own line: as a table title it would wrap to the (narrow) table's width.
    console.print(title, markup=False, highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if note:
        console.print(f"note: {note}", markup=False, highlight=False)


def run_score(args: argparse.Namespace) -> int:
    """Run ``score`` with parsed arguments; returns the exit code (typed errors propagate)."""
    window = resolve_window(args.window, args.dataset)
    _episode_files(args.file)  # a wrong path fails before the embedder is assembled or loaded
    similarity = make_similarity(args.embedder)
    embedder = describe_similarity(similarity)
    metrics = score_file(args.file, args.fps, window, similarity)
    _print_table(
        metrics,
        f"{args.file}  ({args.fps:g} fps, window {window[0]:g} {window[1]:g} s, "
        f"embedder {embedder['name']})",
        embedder["note"],
    )
    if args.json is not None:
        out = {
            "file": str(args.file),
            "fps": args.fps,
            "window": list(window),
            "embedder": embedder,
            **metrics.to_dict(),
        }
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise MetricsError(
                f"cannot write {args.json}: {exc}; pick another --json path"
            ) from exc
    return 0
