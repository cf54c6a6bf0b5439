"""`eval` over a task-world split and over the ProAssist released format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_proassist_data import processed  # noqa: F401  (the released-format fixture)

from proassist_edge.cli import main
from proassist_edge.errors import DataError
from proassist_edge.eval.evaluate import evaluate, evaluator_reference
from proassist_edge.eval.textsim import ExactSimilarity
from proassist_edge.taskworld import generate_split


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_split("test", tmp_path_factory.mktemp("tw") / "test", episodes=2)


def test_eval_sweep_and_plot(tiny_bundle, split: Path, tmp_path: Path) -> None:
    bundle, _, thr = tiny_bundle(1, "lm", 1)
    out, png = tmp_path / "eval.json", tmp_path / "pr.png"
    rc = main(["eval", str(bundle), "--data", str(split), "--threshold", str(thr), "1e-9",
               "--json", str(out), "--plot", str(png), "--embedder", "exact"])
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("F1", "precision", "recall", "semantic_score", "missing_rate", "redundant_rate",
                "jaccard_index"):
        assert 0.0 <= report[key] <= 1.0
    assert report["episodes"] == 2 and len(report["per_episode"]) == 2
    assert set(report["sweep"]) == {f"{thr:g}", "1e-09"}
    # a random model that never talks at a tiny threshold misses every reference utterance
    assert report["sweep"]["1e-09"]["num_missed"] > 0
    assert report["sweep"]["1e-09"]["num_matched"] == 0
    assert report["embedder"]["name"] == "exact"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reads_proassist_released_format(tiny_bundle, processed: Path) -> None:  # noqa: F811
    bundle, _, thr = tiny_bundle(1, "lm", 1)
    jsonl = processed / "wtag" / "prepared" / "dialog-klg_val_L4096_I5.jsonl"
    report = evaluate(bundle, jsonl, [thr], ExactSimilarity(), limit=2)
    assert report["episodes"] == 2
    # two reference replies per clip: each is matched (well or not) or missed
    assert report["num_matched"] + report["num_mismatched"] + report["num_missed"] == report["num_ref"] >= 2


def test_eval_rejects_unknown_data(tiny_bundle, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="taskworld generate"):
        evaluate(tiny_bundle(1, "lm", 1)[0], tmp_path, [0.5], ExactSimilarity())


def test_reference_as_the_authors_evaluator_reads_it() -> None:
    conv = [{"role": "system", "content": "s"}, {"role": "frames", "start": 0, "end": 2},
            {"role": "assistant", "content": "  hi  "}, {"role": "assistant", "content": "again"},
            {"role": "frames", "start": 2, "end": 4}, {"role": "user", "content": "?"},
            {"role": "assistant", "content": "after a user turn"},
            {"role": "frames", "start": 4, "end": 4}, {"role": "assistant", "content": "empty"},
            {"role": "frames", "start": 4, "end": 6}, {"role": "assistant", "content": "last"}]
    # Only an assistant turn right after a non-empty frames turn counts, stripped, on its last frame.
    assert evaluator_reference(conv, 6) == ["", "hi", "", "", "", "last"]
