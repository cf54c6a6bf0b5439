"""Reader for the ProAssist dataset's released processed format, as Episode objects.

Files it reads, for one dataset root `processed_data/<dataset>/`:
- `prepared/<split>.jsonl` (split names like `dialog-klg-sum_val_L4096_I5`): one sample per
  line with `dataset`, `video_uid`, `clip_idx`, `frames_file` (relative to the dataset root),
  `start_frame_idx`, `end_frame_idx` (exclusive), `fps`, `seq_len`, `max_seq_len`,
  `num_tokens_per_img`, `use_img_sep_token`, `conversation` (turns with `role` system | user |
  assistant and `content`, or `role` frames with `start`/`end` indexing the video's frames) and
  `metadata` (`task_goal`, `knowledge`, `progress`, `user_type`, ...).
- each sample's frames file: an Apache Arrow IPC file written by Hugging Face `datasets`
  (the streaming format, despite the `.arrow` name; the random-access file format is read too)
  with one column `frame`, one row per frame at 2 fps, each a base64 string of a JPEG (raw JPEG
  bytes are accepted as well).

Each sample becomes an Episode (the task world's type): the clip's frames decoded to RGB
uint8 (N, H, W, 3), the conversation re-indexed so frame 0 is `start_frame_idx`, and the
sample's metadata plus its top-level fields. Needs pyarrow and OpenCV (both imported lazily).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import DataError, MissingDependencyError
from proassist_edge.runtime.episode import Episode, Turn

# Sample fields copied into the episode metadata next to the sample's own `metadata`.
_SAMPLE_FIELDS = ("dataset", "video_uid", "clip_idx", "frames_file", "start_frame_idx",
                  "end_frame_idx", "seq_len", "max_seq_len", "num_tokens_per_img",
                  "use_img_sep_token")


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401  (submodule, not always loaded by `import pyarrow`)
    except ImportError as e:
        raise MissingDependencyError("pyarrow", "Reading ProAssist frames files",
                                     "pip install pyarrow") from e
    return pa


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise MissingDependencyError("opencv-python-headless", "Decoding ProAssist JPEG frames",
                                     "pip install 'proassist-edge[camera]'") from e
    return cv2


def prepared_jsonl(processed_dir: str | Path, dataset: str, split: str) -> Path:
    """`processed_data/<dataset>/prepared/<split>.jsonl` under `processed_dir`."""
    return Path(processed_dir) / dataset / "prepared" / f"{split}.jsonl"


def open_frames_table(path: str | Path) -> Any:
    """The frames file as a pyarrow Table (memory-mapped: rows are read when used)."""
    pa = _pyarrow()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"frames file {path} not found: download the dataset's frames folder "
                        "next to `prepared/` (frames_file is relative to the dataset root)")
    errors = []
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            return opener(pa.memory_map(str(path), "r")).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            errors.append(f"{opener.__name__}: {e}")
    raise DataError(f"{path} is not an Arrow IPC stream or file ({'; '.join(errors)})")


def decode_frame(value: str | bytes) -> np.ndarray:
    """One `frame` cell (base64 of a JPEG, or raw JPEG bytes) to RGB uint8 (H, W, 3)."""
    cv2 = _cv2()
    raw = value.encode("ascii") if isinstance(value, str) else bytes(value)
    if not raw.startswith(b"\xff\xd8"):  # not already a JPEG: base64 text
        try:
            raw = base64.b64decode(raw, validate=False)
        except (binascii.Error, ValueError) as e:
            raise DataError(f"a frame cell is neither JPEG nor base64 ({e})") from e
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError("a frame cell does not decode as an image (corrupt JPEG?)")
    rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb


def read_frames(table_or_path: Any, start: int = 0, end: int | None = None,
                size: int | None = None) -> np.ndarray:
    """Frames [start, end) of a frames file (path or open Table) as uint8 (N, H, W, 3).

    With `size`, each frame is resized to size x size (area filter), as a small model needs.
    """
    table = open_frames_table(table_or_path) if isinstance(table_or_path, str | Path) else \
        table_or_path
    if "frame" not in table.column_names:
        raise DataError(f"frames table has columns {table.column_names}, expected 'frame'")
    end = table.num_rows if end is None else end
    if not 0 <= start <= end <= table.num_rows:
        raise DataError(f"frames [{start}, {end}) are outside the file's {table.num_rows} rows: "
                        "the jsonl and the frames file come from different releases?")
    cells = table.column("frame").slice(start, end - start).to_pylist()
    cv2 = _cv2() if size else None
    frames = []
    for cell in cells:
        img = decode_frame(cell)
        if cv2 is not None and img.shape[:2] != (size, size):
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        frames.append(img)
    if not frames:
        return np.zeros((0, size or 0, size or 0, 3), np.uint8)
    if len({f.shape for f in frames}) > 1:
        raise DataError("frames of one clip differ in size: pass size= to resize them")
    return np.stack(frames)


def reindex_conversation(conversation: list[Turn], start: int, num_frames: int) -> list[Turn]:
    """A copy of the turns with frame indices relative to the clip start, checked in range."""
    out: list[Turn] = []
    for turn in conversation:
        turn = dict(turn)
        if turn.get("role") == "frames":
            s, e = int(turn["start"]) - start, int(turn["end"]) - start
            if not 0 <= s <= e <= num_frames:
                raise DataError(f"frames turn [{turn['start']}, {turn['end']}) lies outside the "
                                f"clip [{start}, {start + num_frames})")
            turn["start"], turn["end"] = s, e
        out.append(turn)
    return out


SUMMARY_REQUEST = "Please summarize"


def split_name(jsonl: str | Path) -> str:
    """`<dataset>/<split>` of `processed_data/<dataset>/prepared/<split>.jsonl`: the data's name
    in the authors' evaluation (it picks the match window and whether summaries are kept)."""
    path = Path(jsonl)
    return f"{path.parent.parent.name}/{path.stem}"


def without_summary_request(conversation: list[Turn], start: int, end: int) -> tuple[list[Turn], int]:
    """The turns before the first system turn asking for a summary, and the end of the frames
    they show: the authors' evaluation cuts a clip there (`remove_summarize_turns`) unless its
    data name says "summary", so the request, its frame and the summary are never streamed."""
    last_end = start
    for k, turn in enumerate(conversation):
        if turn.get("role") == "frames":
            last_end = int(turn["end"])
        elif turn.get("role") == "system" and str(turn.get("content", "")).startswith(SUMMARY_REQUEST):
            return conversation[:k], last_end
    return conversation, end


def episode_from_sample(sample: dict[str, Any], dataset_root: str | Path,
                        size: int | None = None, table: Any = None,
                        cut_summary: bool = True) -> Episode:
    """One prepared sample as an Episode (frames decoded, conversation re-indexed); with
    `cut_summary` the clip ends before a summary request (`without_summary_request`)."""
    try:
        start, end = int(sample["start_frame_idx"]), int(sample["end_frame_idx"])
        frames_file = str(sample["frames_file"])
        conversation = list(sample["conversation"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"sample {sample.get('video_uid', '?')} lacks a field ({e}): is this a "
                        "ProAssist `prepared/*.jsonl`?") from e
    if cut_summary:
        conversation, end = without_summary_request(conversation, start, end)
    if table is None:
        table = open_frames_table(Path(dataset_root) / frames_file)
    frames = read_frames(table, start, end, size)
    metadata = dict(sample.get("metadata") or {})
    metadata.update({k: sample[k] for k in _SAMPLE_FIELDS if k in sample})
    uid = f"{sample.get('dataset', 'proassist')}/{sample.get('video_uid', '?')}/" \
          f"{sample.get('clip_idx', 0)}"
    return Episode(uid, frames, reindex_conversation(conversation, start, end - start),
                   metadata, float(sample.get("fps", 2)))


def iter_proassist_episodes(jsonl: str | Path, dataset_root: str | Path | None = None,
                            limit: int | None = None, size: int | None = None) -> Iterator[Episode]:
    """Episodes of a `prepared/<split>.jsonl`, one at a time.

    `dataset_root` (what `frames_file` is relative to) defaults to the jsonl's grandparent,
    `processed_data/<dataset>/`. Consecutive clips of one video share one opened frames file.
    Clips end before a summary request unless the data's name `<dataset>/<split>` says
    "summary", as in the authors' evaluation.
    """
    path = Path(jsonl)
    if not path.is_file():
        raise DataError(f"{path} not found: expected processed_data/<dataset>/prepared/"
                        "<split>.jsonl from the ProAssist release")
    root = Path(dataset_root) if dataset_root is not None else path.parent.parent
    cut_summary = "summary" not in split_name(path)
    open_name, table, given = "", None, 0
    with path.open() as f:
        for n, line in enumerate(f):
            if limit is not None and given >= limit:
                return
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n + 1} is not JSON ({e})") from e
            name = str(sample.get("frames_file", ""))
            if name != open_name:
                open_name, table = name, open_frames_table(root / name)
            yield episode_from_sample(sample, root, size, table, cut_summary)
            given += 1


def load_proassist_split(processed_dir: str | Path, dataset: str, split: str,
                         limit: int | None = None, size: int | None = None) -> Iterator[Episode]:
    """Episodes of `processed_dir/<dataset>/prepared/<split>.jsonl`."""
    return iter_proassist_episodes(prepared_jsonl(processed_dir, dataset, split), None, limit, size)
