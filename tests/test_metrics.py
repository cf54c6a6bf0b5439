"""The paper's metrics, counted as the authors' evaluator counts (pred_match.find_match and
StreamEvaluator.compute_metrics), on hand-computed episodes; the scorer and its CLI."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from proassist_edge.errors import MetricsError, ProAssistEdgeError
from proassist_edge.eval import score
from proassist_edge.eval.metrics import (
    DATASET_WINDOWS,
    DEFAULT_WINDOW,
    MatchConfig,
    Metrics,
    aggregate,
    bleu_stats,
    compute_metrics,
    match_utterances,
    window_for,
    window_frames,
)
from proassist_edge.eval.textsim import ExactSimilarity, SentenceSimilarity

EXACT = ExactSimilarity()
WHEEL = "Now attach the second wheel."
SCREW = "Tighten the two screws firmly."
# At 2 fps the default window (-1.0, 3.0) s is frames (-2, 6): j - i in [-2, 6], rg = 6.
AUTHORS_KEYS = {
    "jaccard_index", "missing_rate", "redundant_rate", "semantic_score", "time_diff",
    "precision", "recall", "F1", "num_matched", "num_mismatched", "num_missed", "num_redundant",
}


class TableSim:
    """A similarity with scores set by hand per (generated, reference) text pair (default 0)."""

    def __init__(self, scores: dict[tuple[str, str], float]) -> None:
        self.scores = scores

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        return np.array([self.scores.get((x, y), 0.0) for x, y in zip(a, b, strict=True)])


def episode(n: int, gen: dict[int, str], ref: dict[int, str]) -> tuple[list[str], list[str]]:
    return [gen.get(i, "") for i in range(n)], [ref.get(i, "") for i in range(n)]


def pairs_of(gen: list[str], ref: list[str], sim: object, **kw: object) -> list[tuple[int, int]]:
    res = match_utterances(gen, ref, sim, **kw)  # type: ignore[arg-type]
    return [(p.gen_frame, p.ref_frame) for p in res.pairs]


@pytest.fixture(scope="module")
def minilm() -> SentenceSimilarity:
    pytest.importorskip("sentence_transformers")
    sim = SentenceSimilarity()
    sim.embed(["warm up"])  # load once for the module
    return sim


# --- the window --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("window", "fps", "frames"),
    [
        ((-1.0, 3.0), 2.0, (-2, 6)),
        ((-0.75, 2.25), 2.0, (-1, 4)),  # -1.5 and 4.5 truncate toward zero
        ((0.75, 2.0), 2.0, (1, 4)),  # 1.5 -> 1 (not rounded up to 2)
        ((-2.9, -0.6), 2.0, (-5, -1)),  # -1.2 -> -1 (not down to -2)
        ((-4.0, 8.5), 2.0, (-8, 17)),
        ((-1.5, 3.0), 3.0, (-4, 9)),
    ],
)
def test_window_is_int_of_seconds_times_fps(
    window: tuple[float, float], fps: float, frames: tuple[int, int]
) -> None:
    assert window_frames(window, fps) == frames


def test_window_edges_in_int_frames_decide_reach() -> None:
    # (0.75, 2.0) s at 2 fps = frames (1, 4): a reference one frame after the answer is in reach.
    gen, ref = episode(8, {2: WHEEL}, {3: WHEEL})
    assert pairs_of(gen, ref, EXACT, window=(0.75, 2.0)) == [(2, 3)]
    # (-0.75, 3.0) s = (-1, 6): a reply 2 frames late is out of reach (1.5 frames truncates to 1).
    gen, ref = episode(10, {4: WHEEL}, {2: WHEEL})
    res = match_utterances(gen, ref, EXACT, window=(-0.75, 3.0))
    assert res.pairs == () and res.redundant == (4,) and res.missed == (2,)
    # (-1.0, 3.0) s = (-2, 6): exactly on the left edge, still in reach.
    assert pairs_of(gen, ref, EXACT) == [(4, 2)]


def test_window_of_zero_frames_is_an_error() -> None:
    with pytest.raises(MetricsError, match=r"\(0, 0\) frames"):
        compute_metrics(*episode(4, {1: WHEEL}, {1: WHEEL}), EXACT, window=(-0.4, 0.4))


# --- the costs ---------------------------------------------------------------------------------
def test_distance_range_is_max_abs_l_r_on_a_right_heavy_window() -> None:
    # Window (-1, 3) s = (-2, 6) frames, rg = max(2, 6) = 6 (the width would be 8).
    # Answer at 0; references at 1 (score 0.75) and 6 (score 1.0).
    #   to 1: 0.25 + 0.3 * (1/6)**1.5 = 0.2704   to 6: 0 + 0.3 * (6/6)**1.5 = 0.3000  -> frame 1
    #   (with range 8: 0.25 + 0.0133 = 0.2633 vs 0.3 * 0.75**1.5 = 0.1949 -> frame 6)
    sim = TableSim({("a", "near"): 0.75, ("a", "far"): 1.0})
    gen, ref = episode(10, {0: "a"}, {1: "near", 6: "far"})
    res = match_utterances(gen, ref, sim, window=(-1.0, 3.0))
    assert [(p.gen_frame, p.ref_frame, p.score) for p in res.pairs] == [(0, 1, 0.75)]
    assert res.missed == (6,)


def test_distance_cost_has_the_authors_bits_so_exact_ties_break_their_way() -> None:
    """Text costs 0.36057276 (3 frames away) and 0.28533757 (4 away), window (-2.5, 2.5): with
    the authors' torch float32 arithmetic both edges cost exactly 0.5000001 and the first one
    (frame 13) wins. numpy's float32 pow, 1 ulp off at a gap of 3, used to pick frame 14."""
    costs = {"R1": np.float32(0.3605727553367615), "R2": np.float32(0.28533756732940674)}
    gen, ref = episode(30, {10: "G"}, {13: "R1", 14: "R2"})

    def sim(a: list[str], b: list[str]) -> np.ndarray:
        return np.array([1.0 - float(costs[y]) for y in b])

    assert pairs_of(gen, ref, sim, window=(-2.5, 2.5)) == [(10, 13)]
    torch = pytest.importorskip("torch")
    gaps = torch.tensor([3.0, 4.0]) ** 1.5 * (0.3 / 5**1.5)
    assert costs["R1"] + np.float32(gaps[0]) == costs["R2"] + np.float32(gaps[1])  # the tie


def test_distance_range_is_max_abs_l_r_on_a_left_heavy_window() -> None:
    # Window (-4, 1) s = (-8, 2) frames, rg = max(8, 2) = 8 (the width would be 10).
    # Answer at 10; references at 9 (score 0.75) and 2 (score 1.0, 8 frames before: on the edge).
    #   to 9: 0.25 + 0.3 * (1/8)**1.5 = 0.2633   to 2: 0.3 * (8/8)**1.5 = 0.3000  -> frame 9
    #   (with range 10: 0.25 + 0.0095 = 0.2595 vs 0.3 * 0.8**1.5 = 0.2147 -> frame 2)
    sim = TableSim({("a", "near"): 0.75, ("a", "far"): 1.0})
    gen, ref = episode(12, {10: "a"}, {9: "near", 2: "far"})
    assert pairs_of(gen, ref, sim, window=(-4.0, 1.0)) == [(10, 9)]


def test_talk_pairs_outside_the_window_are_excluded() -> None:
    # 1.5 s late with window (-1, 3): out of reach, so the answer is redundant and the ref missed.
    res = match_utterances(*episode(10, {5: WHEEL}, {2: WHEEL}), EXACT)
    assert res.pairs == () and res.redundant == (5,) and res.missed == (2,)
    m = compute_metrics(*episode(10, {5: WHEEL}, {2: WHEEL}), EXACT)
    assert (m.precision, m.recall, m.f1, m.jaccard_index) == (0.0, 0.0, 0.0, 0.0)
    assert (m.missing_rate, m.redundant_rate) == (1.0, 1.0)


def test_generated_on_a_silent_frame_costs_one() -> None:
    # Two answers, one reference (score 0.95 with either). 2->2 (0.05) + 3 on silence (1 + 0)
    # = 1.05 beats 3->2 (0.05 + 0.3 * (1/6)**1.5) + 2 on silence (1 + 0.3 * (1/6)**1.5) = 1.09.
    sim = TableSim({("a", "r"): 0.95, ("b", "r"): 0.95})
    res = match_utterances(*episode(10, {2: "a", 3: "b"}, {2: "r"}), sim)
    assert [(p.gen_frame, p.ref_frame) for p in res.pairs] == [(2, 2)] and res.redundant == (3,)
    # A talk pair of score 0 costs 1, like silence, and is still the cheaper one on its own frame.
    res = match_utterances(*episode(10, {4: "a"}, {4: "r"}), TableSim({}))
    assert [(p.gen_frame, p.ref_frame, p.score) for p in res.pairs] == [(4, 4, 0.0)]


def test_a_zero_cost_pair_is_no_edge_as_in_the_authors_csr_matrix() -> None:
    # The same text on the reference's own frame costs exactly 0; the authors build the graph
    # with csr_matrix(dense), which drops zeros, so the answer lands on a silent frame.
    gen, ref = episode(10, {2: WHEEL}, {2: WHEEL})
    res = match_utterances(gen, ref, EXACT)
    assert res.pairs == () and res.redundant == (2,) and res.missed == (2,)
    kept = match_utterances(gen, ref, EXACT, config=MatchConfig(drop_zero_cost_edges=False))
    assert [(p.gen_frame, p.ref_frame, p.score) for p in kept.pairs] == [(2, 2, 1.0)]
    # One frame off, the distance cost makes it non-zero: a perfect match.
    m = compute_metrics(*episode(10, {3: WHEEL}, {2: WHEEL}), EXACT)
    assert (m.precision, m.recall, m.f1, m.jaccard_index, m.num_matched) == (1.0, 1.0, 1.0, 1.0, 1)
    assert m.semantic_score == 1.0 and m.time_diff == 0.5 and m.bleu4 == pytest.approx(1.0)


def test_no_frame_in_reach_is_redundant_not_an_error() -> None:
    # A window that excludes the answer's own frame and runs past the episode's end: no full
    # matching exists (the authors' evaluator raises), the answers count as redundant.
    res = match_utterances(*episode(4, {3: WHEEL, 2: SCREW}, {}), EXACT, window=(1.0, 2.0))
    assert sorted(res.redundant) == [2, 3] and res.pairs == () and res.missed == ()


def test_talk_is_any_non_empty_text_used_as_written() -> None:
    sim = TableSim({(" ", "r"): 0.9})
    res = match_utterances(*episode(6, {1: " "}, {2: "r"}), sim)  # whitespace is talk
    assert [(p.gen_frame, p.ref_frame) for p in res.pairs] == [(1, 2)]
    res = match_utterances(*episode(6, {}, {2: " "}), sim)
    assert res.missed == (2,)


# --- the figures -------------------------------------------------------------------------------
def counting_episode() -> tuple[list[str], list[str], TableSim]:
    """Pairs at 2->2 (score exactly 0.5), 11 answering 10 (0.9) and 20->20 (0.3); a reference
    at 30 nobody answers; an answer at 40 with nothing to answer."""
    sim = TableSim({("a", "ra"): 0.5, ("b", "rb"): 0.9, ("c", "rc"): 0.3})
    gen, ref = episode(45, {2: "a", 11: "b", 20: "c", 40: "d"}, {2: "ra", 10: "rb", 20: "rc", 30: "re"})
    return gen, ref, sim


def test_strict_threshold_counts_inclusive_threshold_averages() -> None:
    gen, ref, sim = counting_episode()
    res = match_utterances(gen, ref, sim)
    assert [(p.gen_frame, p.ref_frame) for p in res.pairs] == [(2, 2), (11, 10), (20, 20)]
    assert res.missed == (30,) and res.redundant == (40,)
    m = compute_metrics(gen, ref, sim)
    # mbf = 3; num_matched counts score > 0.5 only (0.9); the 0.5 and 0.3 pairs are mismatched.
    assert (m.num_matched, m.num_mismatched, m.num_missed, m.num_redundant) == (1, 2, 1, 1)
    # semantic_score: mean of the scores >= 0.5 (0.5 and 0.9); time_diff over num_matched only.
    assert m.semantic_score == pytest.approx((0.5 + 0.9) / 2, abs=1e-7)
    assert m.time_diff == 0.5
    # precision 1/(3+1), recall 1/(3+1), Jaccard 1/(3+1+1), rates over mbf + missed/redundant.
    assert m.precision == 0.25 and m.recall == 0.25 and m.f1 == pytest.approx(0.25)
    assert m.jaccard_index == 0.2 and m.missing_rate == 0.25 and m.redundant_rate == 0.25
    assert (m.num_gen, m.num_ref) == (4, 4)


def test_split_pools_pairs_before_the_ratios() -> None:
    gen, ref, sim = counting_episode()
    a = compute_metrics(gen, ref, sim)  # mbf 3 (scores .5 .9 .3), 1 missed, 1 redundant
    b = compute_metrics(*episode(10, {3: "e"}, {2: "re"}), TableSim({("e", "re"): 0.6}))  # mbf 1
    c = compute_metrics(*episode(10, {}, {1: "x", 7: "y"}), EXACT)  # 2 missed
    m = aggregate([a, b, c])
    # Pooled: mbf 4, num_matched 2 (0.9, 0.6), missed 3, redundant 1.
    assert (m.num_matched, m.num_mismatched, m.num_missed, m.num_redundant) == (2, 2, 3, 1)
    assert m.precision == pytest.approx(2 / 5) and m.recall == pytest.approx(2 / 7)
    assert m.f1 == pytest.approx(2 * (2 / 5) * (2 / 7) / (2 / 5 + 2 / 7))
    assert m.jaccard_index == pytest.approx(2 / 8)
    assert m.missing_rate == pytest.approx(3 / 7) and m.redundant_rate == pytest.approx(1 / 5)
    assert m.semantic_score == pytest.approx((0.5 + 0.9 + 0.6) / 3, abs=1e-7)
    assert m.time_diff == pytest.approx((0.5 + 0.5) / 2)
    # Not the mean of the episodes' figures.
    assert m.precision != pytest.approx((a.precision + b.precision + c.precision) / 3)
    with pytest.raises(MetricsError):
        aggregate([])
    strict = compute_metrics(gen, ref, sim, config=MatchConfig(semantic_threshold=0.8))
    with pytest.raises(MetricsError, match="semantic thresholds"):
        aggregate([a, strict])


def test_to_dict_uses_the_authors_names() -> None:
    gen, ref, sim = counting_episode()
    d = compute_metrics(gen, ref, sim).to_dict()
    assert AUTHORS_KEYS <= d.keys() and {"f1", "num_good", "tally"}.isdisjoint(d)
    assert d["F1"] == 0.25 and d["num_matched"] == 1 and d["num_mismatched"] == 2
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in d.values())
    empty = compute_metrics(*episode(3, {}, {}), EXACT)
    assert isinstance(empty, Metrics) and empty.to_dict()["F1"] == 0.0  # 0/0 is 0.0, not an error
    json.dumps(d)


def test_bleu_hand_computed() -> None:
    st = bleu_stats(["the cat sat on the mat"], ["The cat is on the mat."])
    assert st.matches == (5, 3, 1, 0) and st.totals == (6, 5, 4, 3)
    expected = (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25  # 4-gram smoothed, no brevity penalty
    assert st.score() == pytest.approx(expected)


def test_dataset_windows_are_the_authors() -> None:
    assert DATASET_WINDOWS["narration"] == (-2.5, 2.5)
    assert DATASET_WINDOWS["ego4d"] == (-4.0, 8.5)
    assert DATASET_WINDOWS["epickitchens"] == (-1.5, 3.0)
    assert DATASET_WINDOWS["holoassist"] == (-1.5, 2.5)
    assert DATASET_WINDOWS["egoexolearn"] == (-2.0, 3.5)
    assert DATASET_WINDOWS["assembly101"] == (-2.0, 4.0)
    assert DATASET_WINDOWS["wtag"] == (-3.0, 6.0)
    assert DEFAULT_WINDOW == (-1.0, 3.0)
    # picked by name as the authors do: the first dataset the name contains, else (-2.5, 2.5)
    assert window_for("ego4d/dialog_val_L0_I5") == (-4.0, 8.5)
    assert window_for("ego4d/narration_val_L4096_I1") == (-2.5, 2.5)  # narration comes first
    assert window_for("wtag/dialog-klg-sum_val_L4096_I1") == (-3.0, 6.0)
    assert window_for("taskworld") == (-1.0, 3.0)
    assert window_for("kitchen/val") == (-2.5, 2.5)


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


# --- with a sentence model ---------------------------------------------------------------------
def test_paraphrase_matches_with_minilm(minilm: SentenceSimilarity) -> None:
    m = compute_metrics(*episode(10, {3: "Next, put the second wheel on."}, {2: WHEEL}), minilm)
    assert (m.num_matched, m.num_mismatched, m.num_missed, m.num_redundant) == (1, 0, 0, 0)
    assert (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0)
    assert m.semantic_score == pytest.approx(0.88, abs=0.03)
    assert m.time_diff == pytest.approx(0.5)


def test_unrelated_text_is_a_mismatch_with_minilm(minilm: SentenceSimilarity) -> None:
    gen, ref = episode(10, {2: "The weather is sunny today."}, {2: WHEEL})
    res = match_utterances(gen, ref, minilm)
    # Paired (a talk/talk pair never costs more than talk/silence) but scored below 0.5.
    assert len(res.pairs) == 1 and res.pairs[0].score < 0.2
    m = compute_metrics(gen, ref, minilm)
    assert (m.num_matched, m.num_mismatched, m.num_missed, m.num_redundant) == (0, 1, 0, 0)
    assert (m.precision, m.recall, m.f1, m.jaccard_index) == (0.0, 0.0, 0.0, 0.0)
    assert m.semantic_score == 0.0 and m.bleu4 == 0.0


def test_minilm_scores_are_cached_abs_cosines(minilm: SentenceSimilarity) -> None:
    cached = SentenceSimilarity(authors_batches=False)
    cached._model = minilm._load()
    s = cached([WHEEL, WHEEL], [WHEEL, "Next, put the second wheel on."])
    assert s[0] == pytest.approx(1.0, abs=1e-5) and 0.5 < s[1] < 1.0
    assert WHEEL in cached._cache


def test_scores_have_the_authors_bits(minilm: SentenceSimilarity) -> None:
    """By default the pairs are encoded as one interleaved list in batches of 128 and compared
    with pairwise_cos_sim, as the authors' evaluator does: the same float32 bits, which decide
    whether a verbatim reply on its reference's own frame costs exactly 0 (and is not paired)."""
    from sentence_transformers.util import pairwise_cos_sim

    texts = [WHEEL, SCREW, "Put the pan on the stove.", "Now press the power button.",
             "Stir the rice for a minute.", "Done."]
    a, b = texts + texts[:3], texts + texts[3:]
    emb = minilm._load().encode([t for p in zip(a, b, strict=True) for t in p],
                                batch_size=128,
                                convert_to_tensor=True, show_progress_bar=False).view(len(a), 2, -1)
    want = (1 - pairwise_cos_sim(emb[:, 0], emb[:, 1]).abs()).numpy()
    got = np.float32(1.0) - minilm(a, b).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    for text, cost in zip(texts, want, strict=False):  # each text alone on its own frame
        gen, ref = episode(5, {2: text}, {2: text})
        m = compute_metrics(gen, ref, minilm)
        single = np.float32(1.0) - minilm([text], [text]).astype(np.float32)[0]
        assert m.num_matched == (1 if single != 0 else 0), (text, cost, single)


# --- files and the CLI -------------------------------------------------------------------------
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
    lines = ['{"t":0.25,"gen":" x ","ref":""}']
    gen, _ = score.read_frames(write_jsonl(tmp_path / "r.jsonl", lines))
    assert gen == ["", " x "]  # 0.5 frames rounds half up; text kept as written


def test_score_file(tmp_path: Path) -> None:
    m = score.score_file(sample_file(tmp_path), similarity=EXACT)
    # WHEEL 1.0 s late: matched; SCREW: redundant; the shelf reference: missed.
    assert (m.num_matched, m.num_mismatched, m.num_missed, m.num_redundant) == (1, 0, 1, 1)
    assert (m.precision, m.recall) == (0.5, 0.5) and m.time_diff == pytest.approx(1.0)


def authors_prediction_file(path: Path, gen: list[str], ref: list[str]) -> Path:
    preds = [{"gen": g, "ref": r, "frame_idx_in_stream": i, "timestamp_in_stream": (i + 1) / 2}
             for i, (g, r) in enumerate(zip(gen, ref, strict=True))]
    path.write_text(json.dumps({"predictions": preds, "metadata": {}}), encoding="utf-8")
    return path


def test_score_reads_the_authors_prediction_files_and_pools_a_folder(tmp_path: Path) -> None:
    one = authors_prediction_file(tmp_path / "0.json", *episode(10, {4: WHEEL}, {2: WHEEL}))
    m = score.score_file(one, similarity=EXACT)
    assert (m.num_matched, m.time_diff) == (1, 1.0)  # frame = position in "predictions"
    authors_prediction_file(tmp_path / "1.json", *episode(10, {5: SCREW}, {1: WHEEL}))
    pooled = score.score_file(tmp_path, similarity=EXACT)
    assert (pooled.num_matched, pooled.num_missed, pooled.num_redundant) == (1, 1, 1)
    assert pooled.precision == 0.5 and pooled.recall == 0.5
    bad = tmp_path / "bad" / "2.json"
    bad.parent.mkdir()
    bad.write_text('{"metrics": {}}')
    with pytest.raises(MetricsError, match="prediction format"):
        score.score_file(bad, similarity=EXACT)


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="proassist-edge")
    score.add_score_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    "spelling",
    [["--window", "-2", "4"], ["--window=-2,4"], ["--window", "-2.0", "4"], ["--window", "-2", "4.0"]],
)
def test_cli_window_spellings(tmp_path: Path, spelling: list[str]) -> None:
    args = cli(["score", str(sample_file(tmp_path)), *spelling])
    assert score.resolve_window(args.window, args.dataset) == (-2.0, 4.0)


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res" / "m.json"
    args = cli(["score", str(sample_file(tmp_path)), "--window", "-1", "3", "--json", str(out),
                "--embedder", "exact"])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert AUTHORS_KEYS <= data.keys()
    assert data["window"] == [-1.0, 3.0] and data["recall"] == 0.5
    assert data["embedder"]["name"] == "exact"
    printed = capsys.readouterr().out
    assert "F1" in printed and "embedder exact" in printed


def test_cli_dataset_window(tmp_path: Path) -> None:
    args = cli(["score", str(sample_file(tmp_path)), "--dataset", "ego4d", "--embedder", "exact"])
    assert score.resolve_window(args.window, args.dataset) == (-4.0, 8.5)
    assert cli(["score", "f.jsonl"]).window is None


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
    with pytest.raises(MetricsError, match="no .json or .jsonl"):
        score.score_file(tmp_path, similarity=EXACT)
    for window in (["1"], ["3", "1"], ["a", "b"], ["-1", "3", "4"], "3,1", ["-1,3", "4"]):
        with pytest.raises(MetricsError, match="--window -1 3"):
            score.parse_window(window)
    with pytest.raises(MetricsError, match="either --window or --dataset"):
        score.resolve_window(["-1", "3"], "ego4d")
    assert score.resolve_window(None, "kitchen") == (-2.5, 2.5)  # the authors' fallback
    assert issubclass(MetricsError, ProAssistEdgeError)
