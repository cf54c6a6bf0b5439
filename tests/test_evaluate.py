"""`eval` over a task-world split and over the ProAssist released format; the task world's content
score rides along (`scorers`), composed by the CLI (`eval`, and `quantize --eval`'s evaluator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_proassist_data import processed  # noqa: F401  (the released-format fixture)

from proassist_edge.cli import main
from proassist_edge.cli.eval import evaluate_with_content
from proassist_edge.errors import DataError
from proassist_edge.eval.evaluate import evaluate, evaluator_reference
from proassist_edge.eval.textsim import ExactSimilarity
from proassist_edge.taskworld import generate_split


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_split("test", tmp_path_factory.mktemp("tw") / "test", episodes=2)


def test_eval_sweep_and_plot(tiny_bundle, split: Path, tmp_path: Path, capsys) -> None:
    bundle, _, thr = tiny_bundle(1, "lm", 1)
    out, png = tmp_path / "eval.json", tmp_path / "pr.png"
    rc = main(["eval", str(bundle), "--data", str(split), "--threshold", str(thr), "1e-9",
               "--json", str(out), "--plot", str(png), "--embedder", "exact"])
    assert rc == 0
    assert "content: right step" in capsys.readouterr().out  # printed beside F1
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
    # the content score of a task-world split: pooled at the head and per threshold, and per episode
    for figures in (report, *report["sweep"].values()):
        c = figures["content"]
        assert c["num_replies"] == figures["num_gen"]  # every reply is checked for foreign items
        assert c["num_paired"] == figures["num_matched"] + figures["num_mismatched"]
        assert 0.0 <= c["right_step_rate"] <= 1.0 and 0.0 <= c["hallucination_rate"] <= 1.0
    assert report["sweep"]["1e-09"]["content"]["num_replies"] == 0
    assert sum(e["content"]["num_paired"] for e in report["per_episode"]) == report["content"]["num_paired"]


def test_scorers_see_each_episode_and_pool_over_the_split(tiny_bundle, split: Path) -> None:
    """Any addable tally rides along; one that applies to no episode adds nothing."""
    from proassist_edge.taskworld.content import ContentTally

    bundle, _, thr = tiny_bundle(1, "lm", 1)
    seen: list[tuple[str, int, int]] = []

    def count(ep, gen, match):  # one reply per tally "replies", the pairs as "paired"
        seen.append((ep.uid, len(gen), len(match.pairs)))
        return ContentTally(paired=len(match.pairs), replies=sum(bool(t) for t in gen))

    report = evaluate(bundle, split, [thr], ExactSimilarity(),
                      scorers={"count": count, "never": lambda ep, gen, match: None})
    assert [uid for uid, _, _ in seen] == [e["episode"] for e in report["per_episode"]]
    assert [n for _, n, _ in seen] == [e["frames"] for e in report["per_episode"]]
    assert report["count"]["num_replies"] == report["num_gen"]
    assert report["count"]["num_paired"] == sum(p for _, _, p in seen)
    assert "never" not in report and "never" not in report["per_episode"][0]


def test_quantize_passes_an_evaluator_with_the_content_score(
    tiny_bundle, split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proassist_edge.eval import textsim
    from proassist_edge.quant import quantize
    from proassist_edge.quant.report import paper_metrics

    bundle, _, _ = tiny_bundle(1, "lm", 1)
    passed: dict = {}

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        passed.update(kwargs)
        raise Stop

    monkeypatch.setattr(quantize, "quantize_bundle", capture)
    monkeypatch.setattr(textsim, "DEFAULT_EMBEDDER", "exact")  # quant's evaluator takes the default
    with pytest.raises(Stop):
        main(["quantize", str(bundle), "-o", str(tmp_path / "q"), "--precision", "int8",
              "--eval", str(split)])
    got = paper_metrics(bundle, bundle, split, passed["evaluator"])  # what quant_report.json holds
    assert isinstance(got, dict)
    for side in ("parent", "child"):
        assert 0.0 <= got[side]["F1"] <= 1.0
        assert got[side]["content"]["num_replies"] == got[side]["num_gen"]


def test_eval_reads_proassist_released_format(tiny_bundle, processed: Path) -> None:  # noqa: F811
    bundle, _, thr = tiny_bundle(1, "lm", 1)
    jsonl = processed / "wtag" / "prepared" / "dialog-klg_val_L4096_I5.jsonl"
    report = evaluate_with_content(bundle, jsonl, thresholds=[thr], similarity=ExactSimilarity(), limit=2)
    assert report["episodes"] == 2
    assert report["dataset"] == "wtag/dialog-klg_val_L4096_I5"
    assert report["window"] == [-3.0, 6.0]  # the authors' window for wtag, picked by name
    assert "content" not in report  # not task-world episodes: the paper's metrics alone
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
    # cleaned as a reply: an empty turn keeps its header (a talk), "." stays "."
    conv[-1]["content"], conv[2]["content"] = "  ", "."
    assert evaluator_reference(conv, 6) == [
        "", ".", "", "", "", "<|start_header_id|>assistant<|end_header_id|>"]
