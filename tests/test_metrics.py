"""The paper's metrics on hand-computed episodes; the JSONL scorer and its CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from proassist_edge.bench import score
from proassist_edge.bench.metrics import (
    DATASET_WINDOWS,
    DEFAULT_WINDOW,
    Metrics,
    aggregate,
    bleu_stats,
    compute_metrics,
    match_utterances,
)
from proassist_edge.bench.textsim import ExactSimilarity, SentenceSimilarity, bundled_model_dir
from proassist_edge.errors import MetricsError, ProAssistEdgeError

EXACT = ExactSimilarity()
WHEEL = "Now attach the second wheel."
SCREW = "Tighten the two screws firmly."
# At 2 fps the default window (-1.0, 3.0) s is frames [i - 2, i + 6]; its width is 8 frames.


def episode(n: int, gen: dict[int, str], ref: dict[int, str]) -> tuple[list[str], list[str]]:
    return [gen.get(i, "") for i in range(n)], [ref.get(i, "") for i in range(n)]


@pytest.fixture(scope="module")
def minilm() -> SentenceSimilarity:
    pytest.importorskip("sentence_transformers")
    sim = SentenceSimilarity()
    sim.embed(["warm up"])  # load once for the module
    return sim


def test_exact_match() -> None:
    m = compute_metrics(*episode(10, {2: WHEEL}, {2: WHEEL}), EXACT)
    assert (m.precision, m.recall, m.f1, m.jaccard_index) == (1.0, 1.0, 1.0, 1.0)
    assert (m.num_matched, m.num_good, m.num_missed, m.num_redundant) == (1, 1, 0, 0)
    assert m.semantic_score == 1.0 and m.time_diff == 0.0
    assert m.bleu4 == pytest.approx(1.0)


def test_late_answer_inside_window() -> None:
    # 1.0 s late = 2 frames: exactly on the window's left edge, still allowed.
    res = match_utterances(*episode(10, {4: WHEEL}, {2: WHEEL}), EXACT)
    assert [(p.gen_frame, p.ref_frame, p.good) for p in res.pairs] == [(4, 2, True)]
    m = compute_metrics(*episode(10, {4: WHEEL}, {2: WHEEL}), EXACT)
    assert (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0)
    assert m.time_diff == pytest.approx(1.0)


def test_early_answer_inside_window() -> None:
    m = compute_metrics(*episode(12, {2: WHEEL}, {8: WHEEL}), EXACT)  # 3.0 s early = R
    assert (m.num_good, m.num_redundant, m.num_missed) == (1, 0, 0)
    assert m.time_diff == pytest.approx(3.0)


def test_late_answer_outside_window() -> None:
    # 1.5 s late: the reference is out of reach, so the answer is redundant and it is missed.
    res = match_utterances(*episode(10, {5: WHEEL}, {2: WHEEL}), EXACT)
    assert res.pairs == () and res.redundant == (5,) and res.missed == (2,)
    m = compute_metrics(*episode(10, {5: WHEEL}, {2: WHEEL}), EXACT)
    assert (m.precision, m.recall, m.f1, m.jaccard_index) == (0.0, 0.0, 0.0, 0.0)
    assert (m.num_matched, m.num_missed, m.num_redundant) == (0, 1, 1)
    assert (m.missing_rate, m.redundant_rate) == (1.0, 1.0)


def test_redundant_utterance() -> None:
    m = compute_metrics(*episode(20, {2: WHEEL, 15: SCREW}, {2: WHEEL}), EXACT)
    assert (m.num_matched, m.num_good, m.num_redundant, m.num_missed) == (1, 1, 1, 0)
    assert m.precision == 0.5 and m.recall == 1.0
    assert m.f1 == pytest.approx(2 / 3)
    assert m.jaccard_index == 0.5 and m.redundant_rate == 0.5


def test_missed_utterance() -> None:
    m = compute_metrics(*episode(20, {2: WHEEL}, {2: WHEEL, 15: SCREW}), EXACT)
    assert (m.num_matched, m.num_good, m.num_redundant, m.num_missed) == (1, 1, 0, 1)
    assert m.precision == 1.0 and m.recall == 0.5
    assert m.f1 == pytest.approx(2 / 3)
    assert m.missing_rate == 0.5 and m.jaccard_index == 0.5


def test_two_answers_compete_for_one_reference() -> None:
    res = match_utterances(*episode(10, {2: WHEEL, 3: WHEEL}, {2: WHEEL}), EXACT)
    # Frame 2 wins: its distance cost is 0, frame 3's would be 0.3 * (1/8)^1.5.
    assert [(p.gen_frame, p.ref_frame) for p in res.pairs] == [(2, 2)]
    assert res.redundant == (3,)


def test_no_frame_in_reach_is_redundant_not_an_error() -> None:
    # A window that excludes the utterance's own frame and runs past the episode's end:
    # no full matching on real frames exists, the "unpaired" option takes it.
    res = match_utterances(*episode(4, {3: WHEEL, 2: SCREW}, {}), EXACT, window=(1.0, 2.0))
    assert sorted(res.redundant) == [2, 3] and res.pairs == () and res.missed == ()


def test_paraphrase_matches_with_minilm(minilm: SentenceSimilarity) -> None:
    m = compute_metrics(*episode(10, {3: "Next, put the second wheel on."}, {2: WHEEL}), minilm)
    assert (m.num_matched, m.num_good, m.num_missed, m.num_redundant) == (1, 1, 0, 0)
    assert (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0)
    assert m.semantic_score == pytest.approx(0.88, abs=0.03)
    assert m.time_diff == pytest.approx(0.5)


def test_unrelated_text_is_a_mismatch_with_minilm(minilm: SentenceSimilarity) -> None:
    gen, ref = episode(10, {2: "The weather is sunny today."}, {2: WHEEL})
    res = match_utterances(gen, ref, minilm)
    # Paired (a talk/talk pair never costs more than talk/silence) but scored below 0.5.
    assert len(res.pairs) == 1 and not res.pairs[0].good and res.pairs[0].score < 0.2
    m = compute_metrics(gen, ref, minilm)
    assert (m.num_matched, m.num_good, m.num_missed, m.num_redundant) == (1, 0, 0, 0)
    assert (m.precision, m.recall, m.f1, m.jaccard_index) == (0.0, 0.0, 0.0, 0.0)
    assert m.semantic_score == 0.0 and m.bleu4 == 0.0


def test_minilm_scores_are_cached_abs_cosines(minilm: SentenceSimilarity) -> None:
    s = minilm([WHEEL, WHEEL], [WHEEL, "Next, put the second wheel on."])
    assert s[0] == pytest.approx(1.0, abs=1e-5) and 0.5 < s[1] < 1.0
    assert WHEEL in minilm._cache


def test_bleu_hand_computed() -> None:
    st = bleu_stats(["the cat sat on the mat"], ["The cat is on the mat."])
    assert st.matches == (5, 3, 1, 0) and st.totals == (6, 5, 4, 3)
    expected = (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25  # 4-gram smoothed, no brevity penalty
    assert st.score() == pytest.approx(expected)


def test_aggregate_sums_counts_then_recomputes() -> None:
    a = compute_metrics(*episode(20, {2: WHEEL, 15: SCREW}, {2: WHEEL}), EXACT)
    b = compute_metrics(*episode(10, {4: WHEEL}, {2: WHEEL}), EXACT)
    c = compute_metrics(*episode(10, {5: WHEEL}, {2: WHEEL}), EXACT)
    m = aggregate([a, b, c])
    assert (m.num_matched, m.num_good, m.num_missed, m.num_redundant) == (2, 2, 1, 2)
    assert m.precision == pytest.approx(2 / 4) and m.recall == pytest.approx(2 / 3)
    assert m.time_diff == pytest.approx((0.0 + 1.0) / 2)
    assert m.bleu4 == pytest.approx(1.0)
    with pytest.raises(MetricsError):
        aggregate([])


def test_dataset_windows() -> None:
    assert DATASET_WINDOWS["narration"] == (-2.5, 2.5)
    assert DATASET_WINDOWS["ego4d"] == (-4.0, 8.5)
    assert DATASET_WINDOWS["epickitchens"] == (-1.5, 3.0)
    assert DEFAULT_WINDOW == (-1.0, 3.0)


@pytest.mark.parametrize(
    ("gen", "ref", "kw", "needle"),
    [
        (["a"], ["a", ""], {}, "one entry per frame"),
        (["a"], ["a"], {"window": (3.0, 1.0)}, "L < R"),
        (["a"], ["a"], {"fps": 0.0}, "fps"),
        ([None], ["a"], {}, "not str"),
    ],
)
def test_bad_inputs(gen: list, ref: list, kw: dict, needle: str) -> None:
    with pytest.raises(MetricsError, match=needle):
        compute_metrics(gen, ref, EXACT, **kw)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sample_file(tmp_path: Path) -> Path:
    recs = [  # unsorted, with gaps (silent frames) and null texts
        {"t": 7.5, "gen": SCREW, "ref": ""},
        {"t": 1.0, "gen": "", "ref": WHEEL},
        {"t": 2.0, "gen": WHEEL, "ref": None},
        {"t": 0.0, "gen": "", "ref": ""},
        {"t": 12.0, "gen": "", "ref": "Put the bag on the shelf."},
    ]
    return write_jsonl(tmp_path / "ep.jsonl", [json.dumps(r) for r in recs])


def test_read_frames(tmp_path: Path) -> None:
    gen, ref = score.read_frames(sample_file(tmp_path), fps=2.0)
    assert len(gen) == len(ref) == 25
    assert gen[4] == WHEEL and gen[15] == SCREW and ref[2] == WHEEL and ref[24].startswith("Put")
    gen, _ = score.read_frames(write_jsonl(tmp_path / "r.jsonl", ['{"t":0.25,"gen":"x","ref":""}']))
    assert gen == ["", "x"]  # 0.5 frames rounds half up


def test_score_file(tmp_path: Path, minilm: SentenceSimilarity) -> None:
    m = score.score_file(sample_file(tmp_path), similarity=minilm)
    # WHEEL 1.0 s late: good; SCREW: redundant; the shelf reference: missed.
    assert (m.num_matched, m.num_good, m.num_missed, m.num_redundant) == (1, 1, 1, 1)
    assert (m.precision, m.recall) == (0.5, 0.5) and m.time_diff == pytest.approx(1.0)


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="proassist-edge")
    score.add_score_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res" / "m.json"
    args = cli(
        [
            "score",
            str(sample_file(tmp_path)),
            "--window=-1,3",
            "--json",
            str(out),
            "--embedder",
            "exact",
        ]
    )
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    keys = {
        "precision",
        "recall",
        "f1",
        "missing_rate",
        "redundant_rate",
        "jaccard_index",
        "semantic_score",
        "time_diff",
        "num_matched",
        "num_missed",
        "num_redundant",
    }
    assert keys <= data.keys()
    assert data["window"] == [-1.0, 3.0] and data["recall"] == 0.5
    assert "precision" in capsys.readouterr().out


def test_cli_dataset_window(tmp_path: Path) -> None:
    args = cli(["score", str(sample_file(tmp_path)), "--dataset", "ego4d", "--embedder", "exact"])
    assert score.resolve_window(args.window, args.dataset) == (-4.0, 8.5)
    assert isinstance(score.make_similarity(None), SentenceSimilarity)  # lazy: nothing loaded
    assert bundled_model_dir().joinpath("config.json").is_file()


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"t": 0, "gen": "", "ref": ""}', "{not json"], "line 2: not valid JSON"),
        (['{"t": 0, "gen": ""}'], 'line 1: expected an object with keys "t"'),
        (['{"t": "1.0", "gen": "", "ref": ""}'], '"t" must be a number'),
        (['{"t": 5e9, "gen": "", "ref": ""}'], "write times in seconds"),
        (['{"t": 1, "gen": 3, "ref": ""}'], '"gen" must be a string'),
        (
            ['{"t": 1.0, "gen": "a", "ref": ""}', '{"t": 1.1, "gen": "b", "ref": ""}'],
            "lines 1 and 2 both",
        ),
        ([""], "no records"),
    ],
)
def test_bad_files(tmp_path: Path, lines: list[str], needle: str) -> None:
    with pytest.raises(MetricsError, match=needle):
        score.score_file(write_jsonl(tmp_path / "bad.jsonl", lines), similarity=EXACT)


def test_missing_file_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="no such file"):
        score.score_file(tmp_path / "nope.jsonl", similarity=EXACT)
    for window in ("1", "3,1", "a,b", "-1,3,4"):
        with pytest.raises(MetricsError, match="--window=-1,3"):
            score.parse_window(window)
    with pytest.raises(MetricsError, match="either --window or --dataset"):
        score.resolve_window("-1,3", "ego4d")
    with pytest.raises(MetricsError, match="unknown --dataset 'kitchen'"):
        score.resolve_window(None, "kitchen")
    with pytest.raises(MetricsError, match="not a sentence-transformers model folder"):
        score.make_similarity(str(tmp_path))
    assert issubclass(MetricsError, ProAssistEdgeError)


def test_to_dict_is_flat_and_json_ready() -> None:
    m = compute_metrics(*episode(3, {}, {}), EXACT)
    d = m.to_dict()
    assert isinstance(m, Metrics) and "bleu" not in d
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in d.values())
    json.dumps(d)
