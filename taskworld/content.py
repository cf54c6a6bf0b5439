"""Is the guidance right? A content score for the task world, beside the paper's metric.

The paper's F1 pairs replies with references by time and sentence similarity: "Good job, the
carrots are in. Now add the rice." matches "The rice is added. Next, add the spinach." although
it names an item that is not in the recipe and the wrong next step. In the task world every
reference utterance is known exactly (its event in the episode's metadata: the kind, the step,
the item just placed), so each reply paired with a reference can be checked exactly:

* **right step**: the reply names the item the reference asks for next (for a correction, the
  right item) and no other item of the task as the next one; where every wording of the
  reference states the place, the reply states it too (the spelled-out or the short place);
  for the last step, the reply says the task is done and asks for nothing more;
* **hallucinated**: a reply (paired or not) names an item that is neither in the task nor one
  the user wrongly placed in this episode (which a correction names).

`content_tally` scores one episode's replies against the pairs the paper's matching made
(`proassist_edge.eval.metrics.match_utterances`); tallies add up over a split.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proassist_edge.taskworld.world import BLOCKS, FAMILY_ITEMS, INGREDIENTS, VARIANTS, Item

DONE_WORDS = re.compile(r"\b(done|complete|completed|finished|last step)\b", re.IGNORECASE)
# reference kinds whose every wording states where the item goes (taskworld/dialogue.py)
PLACE_STATED = ("greet", "confirm_next", "answer_next")
ALL_ITEMS: dict[str, Item] = {**BLOCKS, **INGREDIENTS}


@dataclass(frozen=True)
class Expected:
    """What one reference utterance asks for."""

    kind: str
    next_item: str | None  # the item to place next (None: the task is finished)
    places: tuple[str, ...]  # how the reference may say where it goes ("" when not stated)
    allowed: frozenset[str]  # items the reply may name besides the next one


@dataclass(frozen=True)
class ContentTally:
    """Counts behind the content score; tallies add up (a split pools its episodes)."""

    paired: int = 0  # replies paired with a reference utterance (matched before filter)
    right_step: int = 0  # of those, replies that name the reference's step
    replies: int = 0  # all replies
    hallucinated: int = 0  # replies naming an item that is not in the task

    def __add__(self, other: ContentTally) -> ContentTally:
        return ContentTally(self.paired + other.paired, self.right_step + other.right_step,
                            self.replies + other.replies, self.hallucinated + other.hallucinated)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "right_step_rate": self.right_step / self.paired if self.paired else 0.0,
            "hallucination_rate": self.hallucinated / self.replies if self.replies else 0.0,
            "num_paired": self.paired, "num_right_step": self.right_step,
            "num_replies": self.replies, "num_hallucinated": self.hallucinated,
        }


def _pattern(item: Item) -> re.Pattern[str]:
    words = sorted({item.name, item.short}, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


_PATTERNS = {key: _pattern(item) for key, item in ALL_ITEMS.items()}


def named_items(text: str) -> set[str]:
    """The item keys a text names, by full name or short form ("red block", "red one")."""
    return {key for key, pat in _PATTERNS.items() if pat.search(text)}


def expectations(metadata: Mapping[str, Any]) -> dict[int, Expected]:
    """Reference frame -> what its utterance asks for, from a task-world episode's metadata."""
    variant = VARIANTS[f"{metadata['family']}/{metadata['variant']}"]
    items = tuple(metadata["items"])
    n = len(items)
    out: dict[int, Expected] = {}
    for ev in metadata.get("events", []):
        kind, step, done = str(ev["type"]), int(ev["step"]), str(ev.get("item", ""))
        if kind == "finish" or step >= n:
            out[int(ev["frame"])] = Expected("finish", None, (), frozenset({done} - {""}))
            continue
        places = (variant.where(step, items), variant.where_short(step))
        previous = FAMILY_ITEMS[variant.family][items[step - 1]].key if step else ""
        allowed = frozenset({done, previous} - {""})
        out[int(ev["frame"])] = Expected(
            kind, items[step], places if kind in PLACE_STATED else (), allowed
        )
    return out


def names_right_step(reply: str, want: Expected) -> bool:
    said = named_items(reply)
    if want.next_item is None:
        return bool(DONE_WORDS.search(reply)) and said <= want.allowed
    if want.next_item not in said or not said <= want.allowed | {want.next_item}:
        return False
    low = reply.lower()
    return not want.places or any(p.lower() in low for p in want.places)


def content_tally(
    gen: Sequence[str], metadata: Mapping[str, Any], paired: Sequence[tuple[int, int]]
) -> ContentTally:
    """One episode: `gen` per frame ("" silent), `paired` the (generated frame, reference frame)
    pairs of the paper's matching."""
    task = set(metadata["items"]) | {str(m["item"]) for m in metadata.get("mistakes", [])}
    replies = [t for t in gen if t]
    hallucinated = sum(bool(named_items(t) - task) for t in replies)
    want = expectations(metadata)
    right = sum(names_right_step(gen[g], want[r]) for g, r in paired if r in want)
    return ContentTally(len(paired), right, len(replies), hallucinated)
