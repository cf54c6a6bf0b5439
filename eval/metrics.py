"""The ProAssist paper's automatic metrics, counted as the authors' evaluator counts them.

Reference: ``mmassist/eval/evaluators/pred_match.py`` (``find_match``) for the matching and
``stream_evaluator.py`` (``StreamEvaluator.compute_metrics``) for the figures. Per frame there is
a generated text and a reference text; a frame talks when its text is not ``""`` (nothing is
stripped, as there). Every generated utterance is paired with one frame by a minimum-weight full
bipartite matching:

* the window, in frames, is ``(l, r) = (int(L * fps), int(R * fps))``: a generated utterance at
  frame ``i`` may only be paired with frames ``j`` with ``l <= j - i <= r`` (a negative ``L`` lets
  the assistant speak up to ``|L|`` seconds after the reference, ``R`` up to ``R`` seconds
  before it);
* a pair costs its text cost, ``1 - |cos|`` for a generated and a reference utterance and 1 for
  a generated utterance on a silent frame, plus ``factor * (|i - j| / rg) ** power`` with
  ``rg = max(|l|, r)``; costs are float32, as the authors' torch tensors are;
* an edge whose cost is exactly 0 is no edge: the authors build the graph as
  ``csr_matrix(dense)``, which drops zeros (see ``MatchConfig.drop_zero_cost_edges``).

Outcomes: a generated utterance paired with a reference frame is "matched before filter" (mbf);
with a silent frame, "redundant"; a reference utterance nobody was paired with is "missed".
``num_matched`` counts the mbf pairs whose semantic score is *above* the threshold (0.5),
``semantic_score`` is the mean of the scores *at or above* it, ``time_diff`` the mean time
difference of the ``num_matched`` pairs. Over a split the pairs of all episodes are pooled before
any ratio is taken (``aggregate``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from proassist_edge.errors import MetricsError

# Match windows (L, R) in seconds: the authors' get_match_time_window (eval_utils.py) per dataset,
# in the order they test them; "taskworld" is ours (synthetic task data). `window_for` picks one.
DATASET_WINDOWS: dict[str, tuple[float, float]] = {
    "narration": (-2.5, 2.5),
    "ego4d": (-4.0, 8.5),
    "epickitchens": (-1.5, 3.0),
    "holoassist": (-1.5, 2.5),
    "egoexolearn": (-2.0, 3.5),
    "assembly101": (-2.0, 4.0),
    "wtag": (-3.0, 6.0),
    "taskworld": (-1.0, 3.0),
}
DEFAULT_WINDOW: tuple[float, float] = DATASET_WINDOWS["taskworld"]
FALLBACK_WINDOW: tuple[float, float] = (-2.5, 2.5)  # the authors' for a name they do not know
DEFAULT_FPS = 2.0
BLEU_ORDER = 4
# Keys of Metrics.to_dict() that differ from the attribute: the authors write "F1".
JSON_NAMES = {"f1": "F1"}


def window_for(dataset: str) -> tuple[float, float]:
    """The match window of a dataset NAME as the authors' evaluator picks it: the first key of
    DATASET_WINDOWS the name contains ("ego4d/narration_val_L4096_I1" is narration,
    "ego4d/dialog_val_L0_I5" ego4d), else FALLBACK_WINDOW."""
    return next((w for key, w in DATASET_WINDOWS.items() if key in dataset), FALLBACK_WINDOW)


class PairSimilarity(Protocol):
    """Scores text pairs: ``sim(a, b)[k]`` is the similarity of ``a[k]`` and ``b[k]``.

    Must return an array of shape ``(len(a),)``; the metrics take its absolute value (the paper
    scores ``|cos|`` of sentence embeddings). See ``proassist_edge.eval.textsim``.
    """

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class MatchConfig:
    """Costs and threshold of the matching (defaults: the authors' StreamEvaluator)."""

    silent_cost: float = 1.0  # generated talk on a silent frame
    dist_factor: float = 0.3
    dist_power: float = 1.5
    semantic_threshold: float = 0.5
    # True mirrors the authors' csr_matrix(dense): a pair costing exactly 0 (the same text on the
    # same frame, when float32 |cos| rounds to exactly 1) cannot be chosen. False keeps it.
    drop_zero_cost_edges: bool = True


DEFAULT_CONFIG = MatchConfig()


@dataclass(frozen=True)
class MatchedPair:
    """A generated utterance (frame ``gen_frame``) paired with a reference one (``ref_frame``)."""

    gen_frame: int
    ref_frame: int
    score: float  # 1 - the pair's float32 text cost, as the authors record it


@dataclass(frozen=True)
class MatchResult:
    """The outcome of ``match_utterances``; frames are indices into the input lists."""

    pairs: tuple[MatchedPair, ...]  # matched before filter, by generated frame
    redundant: tuple[int, ...]  # generated frames paired with silence (or with no frame at all)
    missed: tuple[int, ...]  # reference frames nobody was paired with


@dataclass(frozen=True)
class BleuStats:
    """Sufficient statistics of corpus BLEU, so that episodes can be summed before scoring."""

    matches: tuple[int, ...] = (0,) * BLEU_ORDER  # clipped n-gram matches per order
    totals: tuple[int, ...] = (0,) * BLEU_ORDER  # hypothesis n-grams per order
    hyp_len: int = 0
    ref_len: int = 0

    def __add__(self, other: BleuStats) -> BleuStats:
        return BleuStats(
            tuple(a + b for a, b in zip(self.matches, other.matches, strict=True)),
            tuple(a + b for a, b in zip(self.totals, other.totals, strict=True)),
            self.hyp_len + other.hyp_len,
            self.ref_len + other.ref_len,
        )

    def score(self, epsilon: float = 0.1) -> float:
        """Corpus BLEU-4 with Chen & Cherry (2014) "method 1" smoothing (epsilon counts)."""
        if self.hyp_len == 0:
            return 0.0
        # Not the authors' Bleu_4 (COCO scorer, PTB tokenizer in Java, no smoothing), hence our own
        # name "bleu4". Smoothing matters because matched utterances are short spoken sentences
        # that often share no 4-gram at all; without it one missing order zeroes the score.
        log_p = 0.0
        for m, t in zip(self.matches, self.totals, strict=True):
            num = m if m > 0 else epsilon
            log_p += math.log(num / max(t, 1)) / BLEU_ORDER
        bp = 1.0 if self.hyp_len > self.ref_len else math.exp(1.0 - self.ref_len / self.hyp_len)
        return bp * math.exp(log_p)


def bleu_tokens(text: str) -> list[str]:
    """Lowercased word tokens; punctuation is dropped, as the COCO caption tokenizer does."""
    return re.findall(r"\w+", text.lower())


def bleu_stats(hypotheses: Sequence[str], references: Sequence[str]) -> BleuStats:
    """BLEU statistics of hypothesis/reference pairs (one reference each)."""
    matches = [0] * BLEU_ORDER
    totals = [0] * BLEU_ORDER
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = bleu_tokens(hyp), bleu_tokens(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, BLEU_ORDER + 1):
            hc = Counter(tuple(h[k : k + n]) for k in range(len(h) - n + 1))
            rc = Counter(tuple(r[k : k + n]) for k in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    return BleuStats(tuple(matches), tuple(totals), hyp_len, ref_len)


@dataclass(frozen=True)
class Tally:
    """What the figures are computed from. Tallies add up: a split pools its episodes' pairs."""

    scores: tuple[float, ...] = ()  # semantic score of each mbf pair
    time_diffs: tuple[float, ...] = ()  # |gen - ref| in seconds of each mbf pair, same order
    num_missed: int = 0
    num_redundant: int = 0
    threshold: float = DEFAULT_CONFIG.semantic_threshold
    bleu: BleuStats = field(default_factory=BleuStats)  # of the num_matched pairs

    def __add__(self, other: Tally) -> Tally:
        if other.threshold != self.threshold:
            raise MetricsError(
                f"cannot pool episodes scored with semantic thresholds {self.threshold} and "
                f"{other.threshold}: score them with one MatchConfig"
            )
        return Tally(
            self.scores + other.scores,
            self.time_diffs + other.time_diffs,
            self.num_missed + other.num_missed,
            self.num_redundant + other.num_redundant,
            self.threshold,
            self.bleu + other.bleu,
        )


@dataclass(frozen=True)
class Metrics:
    """Figures of one episode, or of a pooled split (``aggregate``).

    The authors' figures keep their names (``to_dict`` writes ``f1`` as ``F1``); ``bleu4``,
    ``num_gen`` (generated utterances) and ``num_ref`` (reference utterances) are ours. A ratio
    whose denominator is 0 is 0.0 (the authors' evaluator divides by zero there).
    """

    precision: float
    recall: float
    f1: float
    missing_rate: float
    redundant_rate: float
    jaccard_index: float
    semantic_score: float
    time_diff: float  # seconds
    num_matched: int
    num_mismatched: int
    num_missed: int
    num_redundant: int
    bleu4: float
    num_gen: int
    num_ref: int
    tally: Tally = field(default_factory=Tally, repr=False)

    def to_dict(self) -> dict[str, float | int]:
        """All figures as a flat JSON-ready dict under the authors' names (no tally)."""
        return {
            JSON_NAMES.get(f.name, f.name): getattr(self, f.name)
            for f in fields(self)
            if f.name != "tally"
        }


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def metrics_from_tally(tally: Tally) -> Metrics:
    """The figures, as ``StreamEvaluator.compute_metrics`` computes them from pooled pairs."""
    thr = tally.threshold
    mbf = len(tally.scores)
    above = [k for k, s in enumerate(tally.scores) if s > thr]  # strict, as the authors' filter
    at_or_above = [s for s in tally.scores if s >= thr]  # as their semantic-score mean
    num_matched, missed, redundant = len(above), tally.num_missed, tally.num_redundant
    precision = _ratio(num_matched, mbf + redundant)
    recall = _ratio(num_matched, mbf + missed)
    return Metrics(
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        missing_rate=_ratio(missed, mbf + missed),
        redundant_rate=_ratio(redundant, mbf + redundant),
        jaccard_index=_ratio(num_matched, mbf + missed + redundant),
        semantic_score=float(np.mean(at_or_above)) if at_or_above else 0.0,
        time_diff=float(np.mean([tally.time_diffs[k] for k in above])) if above else 0.0,
        num_matched=num_matched,
        num_mismatched=mbf - num_matched,
        num_missed=missed,
        num_redundant=redundant,
        bleu4=tally.bleu.score(),
        num_gen=mbf + redundant,
        num_ref=mbf + missed,
        tally=tally,
    )


def window_frames(window: tuple[float, float], fps: float) -> tuple[int, int]:
    """The window ``(L, R)`` seconds in frames: ``(int(L * fps), int(R * fps))``, truncated
    toward zero as the authors' ``StreamEvaluator.run_prediction`` does."""
    lo, hi = int(window[0] * fps), int(window[1] * fps)
    if max(abs(lo), hi) == 0:
        raise MetricsError(
            f"match window {window} s at {fps:g} fps is (0, 0) frames: the distance cost divides "
            "by max(|l|, r), so widen the window to at least one frame on one side"
        )
    return lo, hi


def _check_inputs(
    gen: Sequence[str], ref: Sequence[str], fps: float, window: tuple[float, float]
) -> None:
    if len(gen) != len(ref):
        raise MetricsError(
            f"generated and reference texts must have one entry per frame, got {len(gen)} and "
            f"{len(ref)}: pad the shorter list with '' (silent)"
        )
    if not (math.isfinite(fps) and fps > 0):
        raise MetricsError(f"fps must be a positive number, got {fps}")
    lo, hi = window
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise MetricsError(
            f"match window (L, R) = {window} seconds must be finite with L < R, e.g. (-1.0, 3.0)"
        )
    for name, texts in (("generated", gen), ("reference", ref)):
        bad = next((k for k, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise MetricsError(
                f"{name} text at frame {bad} is {type(texts[bad]).__name__}, not str: "
                "use '' for a silent frame"
            )


def _semantic_costs(pairs: list[tuple[str, str]], similarity: PairSimilarity) -> np.ndarray:
    """float32 ``1 - |sim|`` per text pair, all scored in one call in the authors' order
    (repeats included: the batch the embedder sees decides the last bits, see textsim)."""
    if not pairs:
        return np.zeros(0, dtype=np.float32)
    raw = np.asarray(similarity([a for a, _ in pairs], [b for _, b in pairs]), np.float64)
    if raw.shape != (len(pairs),) or not np.all(np.isfinite(raw)):
        raise MetricsError(
            f"similarity returned shape {raw.shape} (or non-finite values) for {len(pairs)} "
            "pairs: it must return one finite score per pair"
        )
    # No clipping: like the authors' 1 - |cos|, an |cos| of 1.0000001 gives a cost below 0.
    return np.float32(1.0) - np.abs(raw).astype(np.float32)


def match_utterances(
    gen: Sequence[str],
    ref: Sequence[str],
    similarity: PairSimilarity,
    *,
    fps: float = DEFAULT_FPS,
    window: tuple[float, float] = DEFAULT_WINDOW,
    config: MatchConfig = DEFAULT_CONFIG,
) -> MatchResult:
    """Pair every generated utterance with one frame (see the module docstring)."""
    _check_inputs(gen, ref, fps, window)
    lo, hi = window_frames(window, fps)
    n = len(gen)
    ref_talk = np.array([t != "" for t in ref], dtype=bool)
    gen_frames = np.array([i for i, t in enumerate(gen) if t != ""], dtype=np.int64)
    n_gen = len(gen_frames)
    if n_gen == 0:
        return MatchResult((), (), tuple(int(j) for j in np.flatnonzero(ref_talk)))

    # The edges inside the window, row by row with ascending columns: the order the authors'
    # csr_matrix(dense) has, so that ties break the same way (outside edges are inf there,
    # which scipy never uses).
    row_parts, col_parts = [], []
    for row, i in enumerate(gen_frames):
        js = np.arange(max(0, i + lo), min(n - 1, i + hi) + 1, dtype=np.int64)
        row_parts.append(np.full(len(js), row, dtype=np.int64))
        col_parts.append(js)
    rows, cols = np.concatenate(row_parts), np.concatenate(col_parts)

    text_cost = np.full(len(cols), np.float32(config.silent_cost), dtype=np.float32)
    talk = np.flatnonzero(ref_talk[cols])
    text_pairs = [(gen[gen_frames[rows[k]]], ref[cols[k]]) for k in talk]
    text_cost[talk] = _semantic_costs(text_pairs, similarity)

    rg = max(abs(lo), hi)
    multiplier = np.float32(config.dist_factor / rg**config.dist_power)
    # the power in float64, rounded once: torch's float32 pow gives exactly that (the authors'),
    # numpy's powf is 1 ulp off at some gaps (3, 7, 12, ...), enough to break an exact tie
    gap = np.abs(gen_frames[rows] - cols).astype(np.float64)
    cost = text_cost + (gap**config.dist_power).astype(np.float32) * multiplier  # float32

    row_ind, col_ind = _full_matching(cost, rows, cols, n_gen, n, config.drop_zero_cost_edges)
    edge_of = {(int(r), int(c)): k for k, (r, c) in enumerate(zip(rows, cols, strict=True))}
    pairs: list[MatchedPair] = []
    redundant: list[int] = []
    for r, c in sorted(zip(row_ind.tolist(), col_ind.tolist(), strict=True)):
        i = int(gen_frames[r])
        if c < n and ref_talk[c]:
            pairs.append(MatchedPair(i, int(c), 1.0 - float(text_cost[edge_of[(r, c)]])))
        else:
            redundant.append(i)
    taken = {p.ref_frame for p in pairs}
    missed = tuple(int(j) for j in np.flatnonzero(ref_talk) if int(j) not in taken)
    return MatchResult(tuple(pairs), tuple(redundant), missed)


def _full_matching(
    cost: np.ndarray, rows: np.ndarray, cols: np.ndarray, n_gen: int, n: int, drop_zero: bool
) -> tuple[np.ndarray, np.ndarray]:
    """scipy's min-weight full matching of generated rows to frame columns.

    Where no full matching exists (the authors' evaluator raises there: a window that excludes
    the utterance's own frame, L > 0 or R < 0, near the episode's ends; or a dropped zero edge
    that was the only one in reach), each row also gets a private column ``n + row``, counted as
    redundant. Its cost exceeds what any full matching on real frames could save by avoiding it
    (n_gen times the largest edge), so it is taken only by rows that cannot have a real frame.
    """
    keep = cost != 0 if drop_zero else np.ones(len(cost), dtype=bool)
    rows, cols = rows[keep], cols[keep]
    # Without dropping, shift every edge by 1: scipy removes explicit zeros itself, and every
    # full matching has exactly n_gen edges, so a constant shift keeps the optimum.
    data = cost[keep] if drop_zero else cost[keep].astype(np.float64) + 1.0
    try:
        return min_weight_full_bipartite_matching(csr_matrix((data, (rows, cols)), shape=(n_gen, n)))
    except ValueError:
        pass
    # All real edges shifted to >= 1 (same count of real edges among matchings with the same
    # count of private columns, so their order is kept); a private column outweighs them all.
    real = data.astype(np.float64) - float(data.min(initial=0.0)) + 1.0
    dummy = n_gen * float(real.max(initial=1.0)) + 1.0
    graph = csr_matrix(
        (
            np.concatenate([real, np.full(n_gen, dummy)]),
            (np.concatenate([rows, np.arange(n_gen)]), np.concatenate([cols, n + np.arange(n_gen)])),
        ),
        shape=(n_gen, n + n_gen),
    )
    return min_weight_full_bipartite_matching(graph)


def compute_metrics(
    gen: Sequence[str],
    ref: Sequence[str],
    similarity: PairSimilarity,
    *,
    fps: float = DEFAULT_FPS,
    window: tuple[float, float] = DEFAULT_WINDOW,
    config: MatchConfig = DEFAULT_CONFIG,
) -> Metrics:
    """Match one episode's per-frame texts and compute the paper's figures.

    ``gen`` and ``ref`` hold one text per frame at ``fps`` ("" = silent); ``window`` is
    ``(L, R)`` in seconds (see ``DATASET_WINDOWS``).
    """
    return metrics_from_tally(
        episode_tally(gen, ref, similarity, fps=fps, window=window, config=config)
    )


def episode_tally(
    gen: Sequence[str],
    ref: Sequence[str],
    similarity: PairSimilarity,
    *,
    fps: float = DEFAULT_FPS,
    window: tuple[float, float] = DEFAULT_WINDOW,
    config: MatchConfig = DEFAULT_CONFIG,
) -> Tally:
    """The matched pairs and counts of one episode, ready to be pooled."""
    result = match_utterances(gen, ref, similarity, fps=fps, window=window, config=config)
    return tally_from_match(result, gen, ref, fps=fps, config=config)


def tally_from_match(
    result: MatchResult,
    gen: Sequence[str],
    ref: Sequence[str],
    *,
    fps: float = DEFAULT_FPS,
    config: MatchConfig = DEFAULT_CONFIG,
) -> Tally:
    """The tally of a matching already made (``match_utterances`` on the same texts and fps)."""
    thr = config.semantic_threshold
    above = [p for p in result.pairs if p.score > thr]
    return Tally(
        scores=tuple(p.score for p in result.pairs),
        time_diffs=tuple(abs(p.gen_frame - p.ref_frame) / fps for p in result.pairs),
        num_missed=len(result.missed),
        num_redundant=len(result.redundant),
        threshold=thr,
        bleu=bleu_stats([gen[p.gen_frame] for p in above], [ref[p.ref_frame] for p in above]),
    )


def aggregate(episodes: Iterable[Metrics]) -> Metrics:
    """Figures over several episodes: their pairs and counts are pooled, then every figure is
    computed once over the pool (as the authors' compute_metrics does over a split)."""
    items = list(episodes)
    if not items:
        raise MetricsError("aggregate needs at least one episode's Metrics, got none")
    pooled = items[0].tally
    for m in items[1:]:
        pooled = pooled + m.tally
    return metrics_from_tally(pooled)
