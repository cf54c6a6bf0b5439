"""The ProAssist paper's automatic metrics: match generated and reference utterances, then score.

Per frame there is a generated text and a reference text ("" = silent). Every generated
utterance is paired with one frame by a minimum-weight full bipartite matching:

* paired with a frame that holds a reference utterance -> "matched" (good if the semantic
  score is at least ``good_threshold``, else "mismatched");
* paired with a silent frame -> "redundant";
* a reference utterance that no generated utterance was paired with -> "missed".

Window convention (as in the paper): a generated utterance at frame ``i`` may only be paired
with frames ``j`` in ``[i + l, i + r]``, where ``(l, r) = (L * fps, R * fps)``. A negative
``L`` lets the assistant speak up to ``|L|`` seconds *after* the reference, ``R`` lets it
speak up to ``R`` seconds *before* it.
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

# Match windows (L, R) in seconds, from the paper; "taskworld" is ours (synthetic task data).
DATASET_WINDOWS: dict[str, tuple[float, float]] = {
    "narration": (-2.5, 2.5),
    "ego4d": (-4.0, 8.5),
    "epickitchens": (-1.5, 3.0),
    "taskworld": (-1.0, 3.0),
}
DEFAULT_WINDOW: tuple[float, float] = DATASET_WINDOWS["taskworld"]
DEFAULT_FPS = 2.0
BLEU_ORDER = 4


class PairSimilarity(Protocol):
    """Scores text pairs: ``sim(a, b)[k]`` is the similarity of ``a[k]`` and ``b[k]``.

    Must return an array of shape ``(len(a),)`` with values in [0, 1] (the paper uses the
    absolute cosine of sentence embeddings). See ``proassist_edge.bench.textsim``.
    """

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class MatchConfig:
    """Costs of the matching (defaults: the paper's)."""

    silent_cost: float = 1.0  # generated talk paired with a silent frame
    dist_factor: float = 0.3
    dist_power: float = 1.5
    good_threshold: float = 0.5  # matched pairs scoring below this are "mismatched"


DEFAULT_CONFIG = MatchConfig()


@dataclass(frozen=True)
class MatchedPair:
    """A generated utterance (frame ``gen_frame``) paired with a reference utterance."""

    gen_frame: int
    ref_frame: int
    score: float
    good: bool


@dataclass(frozen=True)
class MatchResult:
    """The outcome of ``match_utterances``; frames are indices into the input lists."""

    pairs: tuple[MatchedPair, ...]
    redundant: tuple[int, ...]  # generated frames paired with silence (or left unpaired)
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
        # Why we write BLEU ourselves: nltk/pycocoevalcap are not dependencies (the latter
        # needs Java), and corpus BLEU is a few lines. Smoothing matters here because good
        # matches are short spoken sentences that often share no 4-gram at all; without it a
        # single missing order zeroes the whole score.
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
class Metrics:
    """Metrics of one episode, or of several summed by ``aggregate``.

    Rates with a zero denominator are 0.0; ``semantic_score`` and ``time_diff`` (seconds)
    are means over good matches (0.0 when there are none).
    """

    precision: float
    recall: float
    f1: float
    missing_rate: float
    redundant_rate: float
    jaccard_index: float
    semantic_score: float
    time_diff: float
    bleu4: float
    num_matched: int
    num_missed: int
    num_redundant: int
    num_good: int
    num_gen: int
    num_ref: int
    bleu: BleuStats = field(default_factory=BleuStats, repr=False)

    def to_dict(self) -> dict[str, float | int]:
        """All metrics as a flat JSON-ready dict (the BLEU statistics are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "bleu"}


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _from_counts(
    num_matched: int,
    num_missed: int,
    num_redundant: int,
    num_good: int,
    score_sum: float,
    time_sum: float,
    bleu: BleuStats,
) -> Metrics:
    num_gen, num_ref = num_matched + num_redundant, num_matched + num_missed
    precision = _ratio(num_good, num_gen)
    recall = _ratio(num_good, num_ref)
    return Metrics(
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        missing_rate=_ratio(num_missed, num_ref),
        redundant_rate=_ratio(num_redundant, num_gen),
        jaccard_index=_ratio(num_good, num_matched + num_missed + num_redundant),
        semantic_score=_ratio(score_sum, num_good),
        time_diff=_ratio(time_sum, num_good),
        bleu4=bleu.score(),
        num_matched=num_matched,
        num_missed=num_missed,
        num_redundant=num_redundant,
        num_good=num_good,
        num_gen=num_gen,
        num_ref=num_ref,
        bleu=bleu,
    )


def _check_inputs(
    gen: Sequence[str], ref: Sequence[str], fps: float, window: tuple[float, float]
) -> tuple[list[str], list[str]]:
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
    out: list[list[str]] = []
    for name, texts in (("generated", gen), ("reference", ref)):
        bad = next((k for k, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise MetricsError(
                f"{name} text at frame {bad} is {type(texts[bad]).__name__}, not str: "
                "use '' for a silent frame"
            )
        out.append([t.strip() for t in texts])
    return out[0], out[1]


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
    gen, ref = _check_inputs(gen, ref, fps, window)
    n = len(gen)
    ref_talk = np.array([bool(t) for t in ref], dtype=bool)
    gen_frames = np.array([i for i, t in enumerate(gen) if t], dtype=np.int64)
    n_gen = len(gen_frames)
    if n_gen == 0:
        return MatchResult((), (), tuple(int(j) for j in np.flatnonzero(ref_talk)))

    l_frames, r_frames = window[0] * fps, window[1] * fps
    width = r_frames - l_frames  # the distance cost's "range": the window width in frames
    # 1e-9 so that a window edge landing exactly on a frame (e.g. -1.0 s * 2 fps) includes it.
    lo, hi = math.ceil(l_frames - 1e-9), math.floor(r_frames + 1e-9)

    row_parts, col_parts = [], []
    for row, i in enumerate(gen_frames):
        js = np.arange(max(0, i + lo), min(n - 1, i + hi) + 1, dtype=np.int64)
        row_parts.append(np.full(len(js), row, dtype=np.int64))
        col_parts.append(js)
    rows, cols = np.concatenate(row_parts), np.concatenate(col_parts)

    # Semantic scores only for (generated, reference) utterance pairs inside the window,
    # each distinct text pair scored once, in one batch call.
    talk = np.flatnonzero(ref_talk[cols])
    text_pairs = [(gen[gen_frames[rows[k]]], ref[cols[k]]) for k in talk]
    distinct = list(dict.fromkeys(text_pairs))
    edge_score = np.full(len(cols), np.nan)
    if distinct:
        raw = np.asarray(similarity([a for a, _ in distinct], [b for _, b in distinct]), float)
        if raw.shape != (len(distinct),) or not np.all(np.isfinite(raw)):
            raise MetricsError(
                f"similarity returned shape {raw.shape} (or non-finite values) for "
                f"{len(distinct)} pairs: it must return one finite score per pair"
            )
        # abs: the paper scores |cos|, and this also accepts a plain cosine callable;
        # clip: float32 embeddings can give 1.0000001 for identical texts.
        by_pair = dict(zip(distinct, np.clip(np.abs(raw), 0.0, 1.0).tolist(), strict=True))
        edge_score[talk] = [by_pair[p] for p in text_pairs]

    base = np.where(ref_talk[cols], 1.0 - np.nan_to_num(edge_score), config.silent_cost)
    dist = config.dist_factor * (np.abs(gen_frames[rows] - cols) / width) ** config.dist_power
    cost = base + dist

    # A full matching (every generated utterance gets its own frame) can be impossible: near
    # the episode's ends, or with a window that excludes the utterance's own frame (L > 0 or
    # R < 0), or when several utterances compete for too few frames. So each generated
    # utterance also gets a private "unpaired" column, counted as redundant like a silent
    # frame. Its cost D exceeds what any other full matching could save by avoiding it
    # (at most n_gen * max real edge cost), so the matching uses it only when there is no
    # way to give that utterance a real frame, and otherwise the optimum is unchanged.
    dummy = n_gen * float(cost.max(initial=0.0)) + 1.0
    data = np.concatenate([cost, np.full(n_gen, dummy)])
    # +1 on every edge: scipy wants non-zero weights (an exact match on time costs 0), and
    # every full matching has exactly n_gen edges, so a constant shift does not change it.
    data += 1.0
    all_rows = np.concatenate([rows, np.arange(n_gen)])
    all_cols = np.concatenate([cols, n + np.arange(n_gen)])
    graph = csr_matrix((data, (all_rows, all_cols)), shape=(n_gen, n + n_gen))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)

    edge_of = {(int(r), int(c)): k for k, (r, c) in enumerate(zip(rows, cols, strict=True))}
    pairs: list[MatchedPair] = []
    redundant: list[int] = []
    for r, c in zip(row_ind.tolist(), col_ind.tolist(), strict=True):
        i = int(gen_frames[r])
        if c < n and ref_talk[c]:
            s = float(edge_score[edge_of[(r, c)]])
            pairs.append(MatchedPair(i, c, s, s >= config.good_threshold))
        else:
            redundant.append(i)
    taken = {p.ref_frame for p in pairs}
    missed = tuple(int(j) for j in np.flatnonzero(ref_talk) if int(j) not in taken)
    return MatchResult(tuple(sorted(pairs, key=lambda p: p.gen_frame)), tuple(redundant), missed)


def compute_metrics(
    gen: Sequence[str],
    ref: Sequence[str],
    similarity: PairSimilarity,
    *,
    fps: float = DEFAULT_FPS,
    window: tuple[float, float] = DEFAULT_WINDOW,
    config: MatchConfig = DEFAULT_CONFIG,
) -> Metrics:
    """Match one episode's per-frame texts and compute the paper's metrics.

    ``gen`` and ``ref`` hold one text per frame at ``fps`` ("" = silent); ``window`` is
    ``(L, R)`` in seconds (see ``DATASET_WINDOWS``).
    """
    result = match_utterances(gen, ref, similarity, fps=fps, window=window, config=config)
    good = [p for p in result.pairs if p.good]
    bleu = bleu_stats(
        [gen[p.gen_frame].strip() for p in good], [ref[p.ref_frame].strip() for p in good]
    )
    return _from_counts(
        num_matched=len(result.pairs),
        num_missed=len(result.missed),
        num_redundant=len(result.redundant),
        num_good=len(good),
        score_sum=sum(p.score for p in good),
        time_sum=sum(abs(p.gen_frame - p.ref_frame) / fps for p in good),
        bleu=bleu,
    )


def aggregate(episodes: Iterable[Metrics]) -> Metrics:
    """Metrics over several episodes: counts and BLEU statistics are summed, then rates
    recomputed; semantic score and time difference are means weighted by good matches."""
    items = list(episodes)
    if not items:
        raise MetricsError("aggregate needs at least one episode's Metrics, got none")
    bleu = BleuStats()
    for m in items:
        bleu = bleu + m.bleu
    return _from_counts(
        num_matched=sum(m.num_matched for m in items),
        num_missed=sum(m.num_missed for m in items),
        num_redundant=sum(m.num_redundant for m in items),
        num_good=sum(m.num_good for m in items),
        score_sum=sum(m.semantic_score * m.num_good for m in items),
        time_sum=sum(m.time_diff * m.num_good for m in items),
        bleu=bleu,
    )
