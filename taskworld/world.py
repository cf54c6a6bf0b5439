"""Task definitions and episode simulation: what is on the table, and where the hand is, per frame.

Two task families, each with three layouts ("variants"):
- assembly: coloured blocks go onto a base plate in a fixed order (tower, wall, frame);
- recipe: ingredients go into a vessel in a fixed order (salad bowl, soup pot, stir-fry pan).

A task is a variant plus an ordered list of items. Coordinates are normalised to the visible frame
([0, 1] x [0, 1], y down); the renderer draws them, nothing here knows about pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FPS = 2
MIN_FRAMES, MAX_FRAMES = 60, 150
MIN_STEPS, MAX_STEPS = 4, 7
USER_TYPES = ("no_talk", "talk_some", "talk_more")


@dataclass(frozen=True)
class Item:
    key: str
    name: str  # noun phrase without article: "red block", "tomatoes"
    short: str  # what a speaker says once the kind is clear: "red one", "tomatoes"
    rgb: tuple[int, int, int]
    plural: bool = False


def _block(key: str, rgb: tuple[int, int, int]) -> Item:
    return Item(key, f"{key} block", f"{key} one", rgb)


# Hues far apart, so a 64 px frame under colour drift still tells them apart.
BLOCKS: dict[str, Item] = {
    i.key: i
    for i in (
        _block("red", (205, 40, 35)),
        _block("green", (40, 165, 60)),
        _block("blue", (35, 75, 215)),
        _block("yellow", (240, 210, 35)),
        _block("orange", (245, 130, 25)),
        _block("purple", (135, 55, 175)),
        _block("white", (238, 238, 232)),
        _block("pink", (245, 135, 185)),
    )
}
INGREDIENTS: dict[str, Item] = {
    i.key: i
    for i in (
        Item("tomatoes", "tomatoes", "tomatoes", (215, 35, 30), plural=True),
        Item("spinach", "spinach", "spinach", (45, 145, 45)),
        Item("blueberries", "blueberries", "blueberries", (45, 60, 190), plural=True),
        Item("corn", "corn", "corn", (240, 205, 40)),
        Item("carrots", "carrots", "carrots", (245, 125, 25), plural=True),
        Item("beetroot", "beetroot", "beetroot", (130, 25, 95)),
        Item("rice", "rice", "rice", (245, 243, 235)),
    )
}
FAMILY_ITEMS: dict[str, dict[str, Item]] = {"assembly": BLOCKS, "recipe": INGREDIENTS}


def _ring(cx: float, cy: float, r: float, n: int) -> tuple[tuple[float, float], ...]:
    # Starts at the top and goes clockwise, the order a person reads a round dish.
    angles = [-math.pi / 2 + 2 * math.pi * k / n for k in range(n)]
    return tuple((cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles)


@dataclass(frozen=True)
class Variant:
    family: str
    key: str
    noun: str  # "tower": "let's build the tower"
    make: str  # verb for the whole task: "build", "make"
    place: str  # verb for one step: "put", "add"
    placing: str  # its gerund: "start by placing ..."
    container: str  # "base plate", "bowl"
    slots: tuple[tuple[float, float], ...]  # item centres, in step order
    piece: tuple[float, float]  # item width, height
    spot_names: tuple[str, ...] = ()  # only for layouts without a natural "next to the previous"

    @property
    def task_key(self) -> str:
        return f"{self.family}/{self.key}"

    def where(self, k: int, items: tuple[str, ...]) -> str:
        """Where step k's item goes, spelled out: "on top of the red block"."""
        if self.family == "recipe":
            return f"into the {self.container}"
        if self.spot_names:
            return f"in the {self.spot_names[k]}"
        prev = FAMILY_ITEMS[self.family][items[k - 1]].name if k else ""
        first, after = _WHERE[self.key]
        return first.format(c=self.container) if k == 0 else after.format(prev=prev)

    def where_short(self, k: int) -> str:
        """The same, as a speaker says it once the context is clear: "on top"."""
        if self.family == "recipe":
            return f"in the {self.container}"
        if self.spot_names:
            return f"in the {self.spot_names[k]}"
        return _WHERE_SHORT[self.key][0 if k == 0 else 1].format(c=self.container)


_WHERE = {
    "tower": ("on the {c}", "on top of the {prev}"),
    "wall": ("at the left end of the {c}", "to the right of the {prev}"),
}
_WHERE_SHORT = {
    "tower": ("on the {c}", "on top"),
    "wall": ("on the left of the {c}", "next to it"),
}
_FRAME_SPOTS = (
    "top left corner",
    "top middle spot",
    "top right corner",
    "right middle spot",
    "bottom right corner",
    "bottom middle spot",
    "bottom left corner",
    "left middle spot",
)

VARIANTS: dict[str, Variant] = {
    v.task_key: v
    for v in (
        Variant("assembly", "tower", "tower", "build", "put", "putting", "base plate",
                tuple((0.5, 0.80 - 0.09 * k) for k in range(MAX_STEPS)), (0.30, 0.085)),
        Variant("assembly", "wall", "wall", "build", "put", "putting", "plate",
                tuple((0.2 + 0.1 * k, 0.56) for k in range(MAX_STEPS)), (0.085, 0.24)),
        Variant("assembly", "frame", "frame", "fill", "place", "placing", "frame plate",
                ((0.32, 0.37), (0.5, 0.37), (0.68, 0.37), (0.68, 0.55), (0.68, 0.73),
                 (0.5, 0.73), (0.32, 0.73), (0.32, 0.55)), (0.15, 0.15), _FRAME_SPOTS),
        Variant("recipe", "salad", "salad", "make", "add", "adding", "bowl",
                _ring(0.5, 0.55, 0.155, MAX_STEPS), (0.11, 0.11)),
        Variant("recipe", "soup", "soup", "cook", "add", "adding", "pot",
                _ring(0.5, 0.55, 0.155, MAX_STEPS), (0.11, 0.11)),
        Variant("recipe", "stir_fry", "stir-fry", "cook", "add", "adding", "pan",
                _ring(0.5, 0.55, 0.155, MAX_STEPS), (0.11, 0.11)),
    )
}


@dataclass(frozen=True)
class TaskSpec:
    """One concrete task: a layout and the items in the order they must go."""

    variant: Variant
    items: tuple[str, ...]

    @property
    def task_id(self) -> str:
        return f"{self.variant.task_key}/{'-'.join(self.items)}"

    def item(self, key: str) -> Item:
        return FAMILY_ITEMS[self.variant.family][key]

    @property
    def goal(self) -> str:
        v, n = self.variant, len(self.items)
        if v.family == "recipe":
            return f"{v.make.capitalize()} a {v.noun} in the {v.container} from {n} ingredients."
        return f"{v.make.capitalize()} a {v.noun} of {n} blocks on the {v.container}."

    def step_text(self, k: int) -> str:
        v = self.variant
        name = self.item(self.items[k]).name
        return f"{v.place.capitalize()} the {name} {v.where(k, self.items)}."

    @property
    def knowledge(self) -> str:
        lines = [f"Task: {self.goal}", "Steps:"]
        lines += [f"{k + 1}. {self.step_text(k)}" for k in range(len(self.items))]
        return "\n".join(lines)


@dataclass(frozen=True)
class FrameState:
    """What is visible at one frame: items at their slots, the hand and what it holds."""

    placed: tuple[tuple[int, str], ...]  # (slot index, item key), in placement order
    hand: tuple[float, float]  # centre of the held item / grip point; off-frame when resting
    held: str | None = None


@dataclass(frozen=True)
class Event:
    """A moment the assistant must speak about, at the frame its cue first becomes visible."""

    frame: int
    kind: str  # greet | confirm_next | finish | correct | answer_next (question before `frame`)
    step: int  # the step the utterance is about (the next one to do, or the one being done)
    item: str = ""  # the item just placed (or the wrong one)


@dataclass
class Timeline:
    spec: TaskSpec
    handedness: int  # +1: right hand enters from the bottom right, -1: from the bottom left
    user_type: str
    states: list[FrameState] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    steps: list[dict[str, int | str]] = field(default_factory=list)
    mistakes: list[dict[str, int | str]] = field(default_factory=list)
    question_frames: list[int] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.states)


@dataclass
class _StepPlan:
    idle: int
    reach: int
    retreat: int
    pause: int
    question_at: int | None = None  # offset into the pause
    fidget: tuple[int, ...] = ()  # pause offsets where the hand hovers over the work
    wrong: str | None = None  # a mistake made before doing this step right
    wrong_wait: int = 0


def _plan(spec: TaskSpec, rng: np.random.Generator,
          user_type: str) -> tuple[int, list[_StepPlan], int]:
    n = len(spec.items)
    plans = [
        _StepPlan(
            idle=int(rng.integers(1, 4)),
            reach=int(rng.integers(2, 5)),
            retreat=int(rng.integers(1, 4)),
            pause=int(rng.integers(1, 6)),
        )
        for _ in range(n)
    ]
    if rng.random() < 0.35:  # about a third of the people make one mistake
        k = int(rng.integers(0, n))
        later = list(spec.items[k + 1 :])
        others = [i for i in FAMILY_ITEMS[spec.variant.family] if i not in spec.items]
        pool = later if later and (rng.random() < 0.6 or not others) else others or later
        if pool:
            plans[k].wrong = str(rng.choice(pool))
            plans[k].wrong_wait = int(rng.integers(2, 5))
    n_questions = {"no_talk": 0, "talk_some": 1, "talk_more": int(rng.integers(2, 4))}[user_type]
    # Questions sit in pauses after steps 0..n-2 (nothing is left to ask after the last one).
    asked = [int(k) for k in rng.choice(n - 1, size=min(n_questions, n - 1), replace=False)]
    for k in asked:
        plans[k].pause = max(plans[k].pause, int(rng.integers(8, 11)))
        plans[k].question_at = int(rng.integers(4, plans[k].pause - 3))
    for p in plans:
        if p.pause >= 3 and rng.random() < 0.3:
            p.fidget = tuple(o for o in range(1, min(p.pause - 1, 3)) if o != p.question_at)
    start, end = int(rng.integers(2, 5)), int(rng.integers(3, 7))
    return start, plans, end


def _length(start: int, plans: list[_StepPlan], end: int) -> int:
    per = [p.idle + p.reach + 1 + p.retreat + p.pause for p in plans]
    # wrong place (reach, place, 1 retreat), wait, remove (2 reach, grab, 2 retreat), 1 idle
    mistakes = [p.reach + 2 + p.wrong_wait + 5 + 1 for p in plans if p.wrong]
    return start + sum(per) + sum(mistakes) + end


def _fit_length(start: int, plans: list[_StepPlan], end: int, rng: np.random.Generator) -> None:
    # Stretch or squeeze pauses (never one that holds a question) into MIN..MAX frames.
    while _length(start, plans, end) < MIN_FRAMES:
        p = plans[int(rng.integers(0, len(plans)))]
        p.pause += 1
    while _length(start, plans, end) > MAX_FRAMES:
        free = [p for p in plans if p.pause > 1 and p.question_at is None]
        if not free:
            break
        free[int(rng.integers(0, len(free)))].pause -= 1


class _Sim:
    """Writes frame states one at a time; positions get a little tremor, as real hands have."""

    def __init__(self, tl: Timeline, rng: np.random.Generator) -> None:
        self.tl, self.rng = tl, rng
        s = tl.handedness
        self.rest = (0.5 + s * float(rng.uniform(0.25, 0.4)), float(rng.uniform(1.06, 1.2)))
        self.hand = self.rest
        self.placed: list[tuple[int, str]] = []
        self.held: str | None = None

    def emit(self, hand: tuple[float, float] | None = None) -> int:
        if hand is not None:
            self.hand = hand
        j = self.rng.normal(0.0, 0.008, size=2)
        pos = (self.hand[0] + float(j[0]), self.hand[1] + float(j[1]))
        self.tl.states.append(FrameState(tuple(self.placed), pos, self.held))
        return len(self.tl.states) - 1

    def move(self, target: tuple[float, float], frames: int) -> None:
        a = self.hand
        for i in range(1, frames + 1):
            f = 0.5 - 0.5 * math.cos(math.pi * i / frames)  # ease in and out, like a real reach
            self.emit((a[0] + (target[0] - a[0]) * f, a[1] + (target[1] - a[1]) * f))

    def idle(self, frames: int) -> None:
        for _ in range(frames):
            self.emit()

    def beside(self, slot: int, dy: float) -> tuple[float, float]:
        # A hand position that leaves the item at `slot` fully visible: palm off its side.
        x, y = self.tl.spec.variant.slots[slot]
        w = self.tl.spec.variant.piece[0]
        return (x + self.tl.handedness * (w / 2 + 0.14), y + dy)

    def place(self, slot: int, item: str, reach: int, retreat: int) -> int:
        x, y = self.tl.spec.variant.slots[slot]
        self.held = item
        # The last reach frame holds the item clearly off its slot: a full item height plus
        # 3-6 px (at 64 px) below it, so "in the hand" and "placed" never look alike.
        h = self.tl.spec.variant.piece[1]
        hover = (x + self.tl.handedness * 0.04, y + h + float(self.rng.uniform(0.05, 0.09)))
        self.move(hover, reach)
        self.held = None
        self.placed.append((slot, item))
        f = self.emit(self.beside(slot, 0.1))
        self.move(self.rest, retreat)
        return f

    def remove(self, slot: int) -> int:
        self.move(self.beside(slot, 0.08), 2)
        x, y = self.tl.spec.variant.slots[slot]
        item = self.placed.pop()[1]
        self.held = item
        f = self.emit((x + self.tl.handedness * 0.02, y + 0.06))
        self.move(self.rest, 2)
        self.held = None
        return f

    def fidget(self) -> None:
        self.emit((float(self.rng.uniform(0.3, 0.7)), float(self.rng.uniform(0.35, 0.8))))


def simulate(spec: TaskSpec, rng: np.random.Generator, user_type: str) -> Timeline:
    """Simulate one person doing `spec`: per-frame states, speech events and annotations."""
    tl = Timeline(spec, handedness=1 if rng.random() < 0.85 else -1, user_type=user_type)
    start, plans, end = _plan(spec, rng, user_type)
    _fit_length(start, plans, end, rng)
    sim = _Sim(tl, rng)
    sim.idle(start)
    tl.events.append(Event(0, "greet", 0))
    n = len(spec.items)
    for k, p in enumerate(plans):
        sim.idle(p.idle)
        first = len(tl.states)
        if p.wrong:
            f = sim.place(k, p.wrong, p.reach, 1)
            tl.events.append(Event(f, "correct", k, p.wrong))
            sim.idle(p.wrong_wait)
            r = sim.remove(k)
            tl.mistakes.append({"step": k, "item": p.wrong, "placed_frame": f, "removed_frame": r})
            sim.idle(1)
        f = sim.place(k, spec.items[k], p.reach, p.retreat)
        last = k == n - 1
        tl.events.append(Event(f, "finish" if last else "confirm_next", k + 1, spec.items[k]))
        for o in range(p.pause):
            if o == p.question_at:
                tl.question_frames.append(len(tl.states))
                tl.events.append(Event(len(tl.states), "answer_next", k + 1))
            if o in p.fidget:
                sim.fidget()
            else:
                sim.emit(sim.rest)
        tl.steps.append({"step": k, "item": spec.items[k], "text": spec.step_text(k),
                         "start_frame": first, "placed_frame": f, "end_frame": len(tl.states)})
    sim.idle(end)
    tl.events.sort(key=lambda e: e.frame)
    return tl
