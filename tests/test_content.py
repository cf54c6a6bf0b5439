"""The task world's content score: does a reply name the reference's step, and only task items?"""

from __future__ import annotations

import pytest

from proassist_edge.taskworld.content import (
    ContentTally,
    content_tally,
    expectations,
    named_items,
    names_right_step,
)
from proassist_edge.taskworld.splits import build_episode

STIR_FRY = build_episode("test", 0).metadata  # beetroot, corn, rice, spinach in the pan


def test_every_reference_utterance_names_its_own_step() -> None:
    """The score agrees with the generator: all 800-odd references of 150 episodes pass."""
    checked = 0
    for split in ("train", "val", "test"):
        for i in range(50):
            meta = build_episode(split, i).metadata
            want = expectations(meta)
            for ev in meta["events"]:
                assert names_right_step(ev["text"], want[ev["frame"]]), (split, i, ev)
                seen = set(meta["items"]) | {m["item"] for m in meta["mistakes"]}
                assert not named_items(ev["text"]) - seen
                checked += 1
    assert checked > 600


def test_hand_built_replies() -> None:
    assert STIR_FRY["items"] == ["beetroot", "corn", "rice", "spinach"]
    want = expectations(STIR_FRY)
    # frame 23: corn just went in, rice is next, "into the pan" / "in the pan"
    assert names_right_step("Great, the corn is in. Now add the rice in the pan.", want[23])
    assert not names_right_step("Great, the corn is in. Now add the spinach in the pan.", want[23])
    assert not names_right_step("Now add the rice.", want[23]), "the place is part of the step"
    assert not names_right_step("Add the rice and the spinach into the pan.", want[23])
    # the last step: done, and nothing more asked for
    assert names_right_step("The spinach is in. You're done!", want[49])
    assert not names_right_step("The spinach is in. Now add the rice into the pan.", want[49])
    assert not names_right_step("Good job, the spinach is in the pan.", want[49])


def test_an_episode_tally_and_a_hallucinated_item() -> None:
    gen = [""] * 60
    gen[1] = "Hi! First, put the beetroot into the pan."  # right (paired with the greeting)
    gen[24] = "Good job, the carrots are in. Now add the rice in the pan."  # carrots: not in it
    gen[34] = "Next, add the corn into the pan."  # wrong step (spinach is next)
    gen[45] = "Nice."  # unpaired, names nothing
    tally = content_tally(gen, STIR_FRY, [(1, 0), (24, 23), (34, 33)])
    assert tally == ContentTally(paired=3, right_step=1, replies=4, hallucinated=1)
    d = (tally + ContentTally(1, 1, 1, 0)).to_dict()
    assert d["right_step_rate"] == pytest.approx(2 / 4) and d["hallucination_rate"] == pytest.approx(1 / 5)
    assert ContentTally().to_dict()["right_step_rate"] == 0.0


def test_items_are_named_by_full_or_short_form() -> None:
    assert named_items("Put the red one on top of the blue block.") == {"red", "blue"}
    assert named_items("An orange is not a block.") == set()
    assert named_items("Add the tomatoes and corn.") == {"tomatoes", "corn"}
