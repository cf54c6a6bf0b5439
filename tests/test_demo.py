"""The demo's side-by-side table: texts wrapped at word boundaries (never cut), every reply beside
the reference the paper's matching paired it with, marked with the content score's verdict."""

from __future__ import annotations

from proassist_edge.bench.demo import dialogue_rows, side_by_side, verdict_mark
from proassist_edge.eval.evaluate import evaluator_reference
from proassist_edge.eval.metrics import MatchedPair, MatchResult
from proassist_edge.taskworld.content import reply_verdicts
from proassist_edge.taskworld.splits import build_episode

STIR_FRY = build_episode("test", 0)  # beetroot, corn, rice, spinach in the pan; references below


def test_replies_are_marked_and_wrapped_not_cut() -> None:
    meta = STIR_FRY.metadata
    ref = evaluator_reference(STIR_FRY.conversation, 60)
    assert ref[0] and ref[23] and ref[33] and ref[49]
    gen = [""] * 60
    gen[1] = "Hi! First, put the beetroot into the pan."
    gen[24] = ("Good job, the carrots are in. Now add the rice in the pan, and take your time with it "
               "because a long reply like this one has to wrap over several lines of its column.")
    gen[34] = "Next, add the corn into the pan."
    gen[45] = "Nice."
    match = MatchResult(pairs=(MatchedPair(1, 0, 0.9), MatchedPair(24, 23, 0.8), MatchedPair(34, 33, 0.7)),
                        redundant=(45,), missed=(49,))
    pairs = [(p.gen_frame, p.ref_frame) for p in match.pairs]
    verdicts = {v.frame: v for v in reply_verdicts(gen, meta, pairs)}
    rows = dialogue_rows(gen, ref, match, verdicts, fps=2.0)

    assert [(r.t, r.mark) for r in rows] == [
        (0.5, "✓ right step"),
        (12.0, "✗ wrong step; ✗ not in task: carrots"),  # a foreign item is never the right step
        (17.0, "✗ wrong step"),
        (22.5, "redundant"),
        (24.5, "missed"),
    ]
    assert rows[2].reference == ref[33] and rows[4].said == "" and rows[4].reference == ref[49]

    width = 100
    text = side_by_side(rows, width)
    lines = text.splitlines()
    assert lines[0].split() == ["time", "assistant", "reference", "verdict"]
    assert all(len(line) <= width for line in lines)
    # the long reply spans several lines of its column, its words whole and in order
    said_at, ref_at = lines[0].index("assistant"), lines[0].index("reference")
    start = next(k for k, line in enumerate(lines) if line.lstrip().startswith("12.0s"))
    end = next(k for k in range(start + 1, len(lines)) if lines[k][:said_at].strip())
    assert end - start >= 3
    assert " ".join(line[said_at:ref_at].strip() for line in lines[start:end]) == gen[24]
    assert " ".join(line[ref_at:].split("✗")[0].strip() for line in lines[start:end]).strip() == ref[23]
    assert sum("✗ wrong step" in line for line in lines) == 2  # once per row, on its first line


def test_a_reply_without_a_task_world_verdict_has_no_mark() -> None:
    assert verdict_mark(None, paired=True) == ""
    assert verdict_mark(None, paired=False) == "redundant"
