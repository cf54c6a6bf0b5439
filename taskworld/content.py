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
(`proassist_edge.eval.metrics.match_utterances`); tallies add up over a split. `content_scorer`
is that score as `evaluate`'s per-episode scorer; `reply_verdicts` says it reply by reply (the
demo marks the replies that name the wrong step).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proassist_edge.eval.metrics import MatchResult
from proassist_edge.runtime.episode import Episode
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


@dataclass(frozen=True)
class ReplyVerdict:
    """The content score's view of one reply."""

    frame: int  # the frame it was said on
    ref_frame: int | None  # the reference utterance the matching paired it with (None: unpaired)
    right_step: bool | None  # names that reference's step (None: unpaired, or no task-world event)
    foreign: frozenset[str]  # items it names that are not in the task (hallucinated when any)

    @property
    def hallucinated(self) -> bool:
        return bool(self.foreign)


def reply_verdicts(
    gen: Sequence[str], metadata: Mapping[str, Any], paired: Sequence[tuple[int, int]]
) -> list[ReplyVerdict]:
    """One verdict per reply, in frame order; arguments as `content_tally`'s."""
    task = set(metadata["items"]) | {str(m["item"]) for m in metadata.get("mistakes", [])}
    want = expectations(metadata)
    ref_of = dict(paired)
    out = []
    for i, text in enumerate(gen):
        if not text:
            continue
        r = ref_of.get(i)
        right = names_right_step(text, want[r]) if r is not None and r in want else None
        out.append(ReplyVerdict(i, r, right, frozenset(named_items(text) - task)))
    return out


def content_tally(
    gen: Sequence[str], metadata: Mapping[str, Any], paired: Sequence[tuple[int, int]]
) -> ContentTally:
    """One episode: `gen` per frame ("" silent), `paired` the (generated frame, reference frame)
    pairs of the paper's matching."""
    verdicts = reply_verdicts(gen, metadata, paired)
    right = sum(v.right_step is True for v in verdicts)
    return ContentTally(len(paired), right, len(verdicts), sum(v.hallucinated for v in verdicts))


def is_taskworld(metadata: Mapping[str, Any]) -> bool:
    """Whether an episode's metadata is the task world's (its events say what each reference asks)."""
    return {"events", "family", "variant", "items"} <= metadata.keys()


def pairs_of(match: MatchResult) -> list[tuple[int, int]]:
    """(generated frame, reference frame) of every pair the paper's matching made."""
    return [(p.gen_frame, p.ref_frame) for p in match.pairs]


def content_scorer(episode: Episode, gen: Sequence[str], match: MatchResult) -> ContentTally | None:
    """The content score as `evaluate`'s per-episode scorer (`scorers={"content": content_scorer}`);
    None for an episode that is not from the task world."""
    if not is_taskworld(episode.metadata):
        return None
    return content_tally(gen, episode.metadata, pairs_of(match))


def content_line(figures: Mapping[str, Any]) -> str:
    """`ContentTally.to_dict()` figures in words, for a summary line."""
    return (
        f"right step {figures['right_step_rate']:.2f} ({figures['num_right_step']} of "
        f"{figures['num_paired']} paired replies), hallucinated {figures['hallucination_rate']:.2f} "
        f"({figures['num_hallucinated']} of {figures['num_replies']} replies)"
    )
