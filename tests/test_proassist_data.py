"""The ProAssist processed-format reader, on a tiny fixture written in that format."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
cv2 = pytest.importorskip("cv2")

from proassist_edge.errors import DataError  # noqa: E402
from proassist_edge.eval.proassist_data import (  # noqa: E402
    decode_frame,
    iter_proassist_episodes,
    load_proassist_split,
    read_frames,
    reindex_conversation,
    split_name,
)

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (240, 220, 40), (250, 250, 250),
           (20, 20, 20), (200, 100, 30), (120, 40, 160)]


def _jpeg_b64(rgb: tuple[int, int, int], side: int = 32) -> str:
    img = np.zeros((side, side, 3), np.uint8)
    img[:] = rgb
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _write_arrow(path: Path, cells: list[str], stream: bool = True) -> None:
    # Hugging Face `datasets` writes the IPC streaming format into its .arrow files.
    table = pa.table({"frame": pa.array(cells, pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else \
            pa.ipc.new_file(sink, table.schema)
        writer.write_table(table, max_chunksize=3)  # several record batches, as real files have
        writer.close()


def _sample(clip: int, start: int, end: int, frames_file: str) -> dict:
    return {
        "dataset": "wtag", "video_uid": "T48", "clip_idx": clip, "frames_file": frames_file,
        "start_frame_idx": start, "end_frame_idx": end, "fps": 2, "seq_len": 300,
        "max_seq_len": 4096, "num_tokens_per_img": 5, "use_img_sep_token": False,
        "conversation": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "frames", "start": start, "end": start + 2},
            {"role": "assistant", "content": "Grab the filter.", "progress": None},
            {"role": "user", "content": "Done?"},
            {"role": "frames", "start": start + 2, "end": end},
            {"role": "assistant", "content": "Now pour the water."},
        ],
        "metadata": {"task_goal": "Make pour-over coffee", "knowledge": "1. Filter. 2. Pour.",
                     "progress": "", "user_type": "talk_some", "has_summary": False,
                     "summary_only": False, "quality": 5},
    }


@pytest.fixture()
def processed(tmp_path: Path) -> Path:
    root = tmp_path / "processed_data"
    ds = root / "wtag"
    _write_arrow(ds / "frames" / "T48.arrow", [_jpeg_b64(c) for c in COLOURS])
    _write_arrow(ds / "frames" / "T49.arrow", [_jpeg_b64(c) for c in COLOURS[:4]], stream=False)
    samples = [_sample(0, 2, 6, "frames/T48.arrow"), _sample(1, 4, 8, "frames/T48.arrow"),
               dict(_sample(0, 0, 4, "frames/T49.arrow"), video_uid="T49")]
    (ds / "prepared").mkdir(parents=True)
    (ds / "prepared" / "dialog-klg_val_L4096_I5.jsonl").write_text(
        "".join(json.dumps(s) + "\n" for s in samples))
    return root


def test_reads_clips_as_episodes(processed: Path) -> None:
    eps = list(load_proassist_split(processed, "wtag", "dialog-klg_val_L4096_I5"))
    assert [e.uid for e in eps] == ["wtag/T48/0", "wtag/T48/1", "wtag/T49/0"]
    ep = eps[0]
    assert ep.frames.shape == (4, 32, 32, 3) and ep.frames.dtype == np.uint8
    # RGB order kept through JPEG (BGR in OpenCV) and the clip starts at start_frame_idx.
    for i, rgb in enumerate(COLOURS[2:6]):
        assert np.abs(ep.frames[i].mean(axis=(0, 1)) - rgb).max() < 6
    spans = [(t["start"], t["end"]) for t in ep.conversation if t["role"] == "frames"]
    assert spans == [(0, 2), (2, 4)]
    assert ep.reference() == ["", "Grab the filter.", "", "Now pour the water."]
    assert ep.metadata["task_goal"] == "Make pour-over coffee"
    assert ep.metadata["knowledge"].startswith("1.") and ep.metadata["start_frame_idx"] == 2
    assert ep.fps == 2 and ep.task == "Make pour-over coffee"
    assert eps[2].frames.shape[0] == 4  # the random-access IPC file format reads too


def test_clips_end_before_a_summary_request_unless_the_data_says_summary(processed: Path) -> None:
    """The authors' evaluation drops the summary request, its frame and the summary
    (`remove_summarize_turns`) unless the data's name says "summary"."""
    tail = [{"role": "system", "content": "Please summarize the progress."},
            {"role": "frames", "start": 6, "end": 7},
            {"role": "assistant", "content": "The filter is in and the water poured."}]
    sample = dict(_sample(0, 2, 6, "frames/T48.arrow"), end_frame_idx=7)
    sample["conversation"] += tail
    ds = processed / "wtag" / "prepared"
    for split in ("dialog-klg-sum_val_L4096_I5", "summary_val_L4096_I5"):
        (ds / f"{split}.jsonl").write_text(json.dumps(sample) + "\n")
    cut = next(iter_proassist_episodes(ds / "dialog-klg-sum_val_L4096_I5.jsonl"))
    kept = next(iter_proassist_episodes(ds / "summary_val_L4096_I5.jsonl"))
    assert cut.num_frames == 4 and cut.conversation == reindex_conversation(
        _sample(0, 2, 6, "frames/T48.arrow")["conversation"], 2, 4)
    assert cut.reference() == ["", "Grab the filter.", "", "Now pour the water."]
    assert kept.num_frames == 5 and kept.reference()[-1] == tail[-1]["content"]
    assert split_name(ds / "summary_val_L4096_I5.jsonl") == "wtag/summary_val_L4096_I5"


def test_resize_and_limit(processed: Path) -> None:
    jsonl = processed / "wtag" / "prepared" / "dialog-klg_val_L4096_I5.jsonl"
    eps = list(iter_proassist_episodes(jsonl, limit=1, size=16))
    assert len(eps) == 1 and eps[0].frames.shape == (4, 16, 16, 3)


def test_decode_accepts_raw_jpeg_and_rejects_garbage() -> None:
    raw = base64.b64decode(_jpeg_b64((10, 200, 10)))
    assert decode_frame(raw).shape == (32, 32, 3)
    with pytest.raises(DataError):
        decode_frame("bm90IGEganBlZw==")  # base64 of "not a jpeg"


def test_bad_files_raise_data_error(processed: Path, tmp_path: Path) -> None:
    frames = processed / "wtag" / "frames" / "T48.arrow"
    with pytest.raises(DataError):
        read_frames(frames, 6, 20)
    other = tmp_path / "other.arrow"
    table = pa.table({"image": pa.array(["x"])})
    with pa.OSFile(str(other), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError):
        read_frames(other)
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"not arrow at all")
    with pytest.raises(DataError):
        read_frames(junk)
    with pytest.raises(DataError):
        list(iter_proassist_episodes(tmp_path / "missing.jsonl"))
    bad = tmp_path / "ds" / "prepared" / "x.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(_sample(0, 6, 12, str(frames))) + "\n")  # past the last row
    with pytest.raises(DataError):
        list(iter_proassist_episodes(bad))
