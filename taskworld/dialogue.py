"""The reference dialogue of an episode, in ProAssist's conversation format.

What the assistant says is decided by what is visible (which item just went where) and by the
task knowledge in the system prompt (which step comes next); only the wording is random, drawn
from several templates per utterance type with synonyms, so a model must learn the meaning and
cannot memorise one sentence. Each assistant turn comes right after the frame whose cue it
answers; a user question arrives before a frame and is answered right after that frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from proassist_edge.runtime.episode import Turn
from proassist_edge.taskworld.world import Event, TaskSpec, Timeline

SYSTEM_PROMPT = (
    "You are a helpful assistant that watches the user through their smart glasses and guides "
    "them through the task step by step. Speak only when needed."
)

_ACKS = ("Nice", "Great", "Good job", "Perfect", "Well done", "Good", "Excellent", "Awesome")
_DONE = ("is on", "is in place", "is placed")
_DONE_RECIPE = ("{be} in", "{be} in the {c}", "{be} added")

_GREET = (
    "Hi! Let's {make} the {noun} together. First, {place} {next} {where}.",
    "Hello, I'll guide you through the {noun}. Start by {placing} {next} {where}.",
    "Hey there! To {make} the {noun}, first {place} {next} {where}.",
    "Okay, let's get started on the {noun}. Step one: {place} {next} {where}.",
    "Hi, I can help you {make} the {noun}. Begin with {next}, {where}.",
)
_CONFIRM = (
    "{Ack}, {item} {done}. Now {place} {next} {where_short}.",
    "{Ack}! {Item} {done}. Next, {place} {next} {where}.",
    "{Ack}, {item} {done}. Now {next_short} goes {where_short}.",
    "{Item} {done}, {ack}. Next up is {next}, {where_short}.",
    "{Ack}. Now {place} {next} {where}.",
    "{Ack}, that's {item}. The next one is {next}, {where_short}.",
)
_FINISH = (
    "{Ack}, {item} {done}. All done, the {noun} is complete.",
    "{Ack}! That was the last step, the {noun} is finished.",
    "{Item} {done}. You're done, the {noun} is complete!",
    "All done! {Item} {done} and the {noun} is finished.",
    "{Ack}, the {noun} is complete. That was the last step.",
)
_CORRECT = (
    "That's {wrong}, but {right_short} goes here. Please swap it.",
    "Wait, that's {wrong}. {Right} should go {where} instead. Please swap them.",
    "Oops, {wrong} isn't next. Take it {off} and {place} {right} {where}.",
    "Hold on, that's {wrong}. This step needs {right}, please swap it.",
    "Not quite, that's {wrong}. Please replace it with {right}.",
)
_ANSWER = (
    "Next, {place} {next} {where}.",
    "Now {place} {next} {where_short}.",
    "The next step is to {place} {next} {where}.",
    "Next is {next}, {where}.",
    "You need {next} next, {where}.",
)
_QUESTIONS = ("What's next?", "What do I do now?", "What's the next step?", "Which one now?",
              "What should I do next?")
_OPENERS = ("Can you help me {make} the {noun}?", "I want to {make} the {noun}. Can you guide me?",
            "Help me {make} the {noun}, please.", "Let's {make} the {noun}. What do I do first?")
_TEMPLATES = {"greet": _GREET, "confirm_next": _CONFIRM, "finish": _FINISH,
              "correct": _CORRECT, "answer_next": _ANSWER}
# "add" twice: it is what people mostly say about ingredients.
_PLACE_VERBS = {"assembly": ("put", "place", "set"), "recipe": ("add", "put", "add")}
_USER_OPENS = {"no_talk": 0.3, "talk_some": 0.7, "talk_more": 1.0}  # chance of asking for help


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(template: str, slots: dict[str, str]) -> str:
    # Every slot also exists capitalised ("{Item}") for sentence starts.
    full = dict(slots)
    full.update({_cap(k): _cap(v) for k, v in slots.items()})
    return template.format(**full)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def utterance(spec: TaskSpec, event: Event, rng: np.random.Generator) -> str:
    """The words for one event, paraphrased at random from the templates of its kind."""
    v = spec.variant
    n = len(spec.items)
    nxt = min(event.step, n - 1)
    nxt_item = spec.item(spec.items[nxt])
    slots = {
        "make": v.make, "noun": v.noun, "place": _pick(rng, _PLACE_VERBS[v.family]),
        "placing": v.placing, "c": v.container, "ack": _pick(rng, _ACKS).lower(),
        "next": f"the {nxt_item.name}", "next_short": f"the {nxt_item.short}",
        "where": v.where(nxt, spec.items), "where_short": v.where_short(nxt),
        "off": "out" if v.family == "recipe" else "off",
    }
    if event.item:
        it = spec.item(event.item)
        slots["item"] = f"the {it.name}"
        done = _pick(rng, _DONE_RECIPE if v.family == "recipe" else _DONE)
        slots["done"] = done.format(be="are" if it.plural else "is", c=v.container)
    if event.kind == "correct":
        slots["wrong"] = slots.pop("item")
        right = spec.item(spec.items[event.step])
        slots["right"], slots["right_short"] = f"the {right.name}", f"the {right.short}"
        slots["where"] = v.where(event.step, spec.items)
    return _fill(_pick(rng, _TEMPLATES[event.kind]), slots)


def build_conversation(tl: Timeline,
                       rng: np.random.Generator) -> tuple[list[Turn], list[dict[str, Any]]]:
    """The conversation turns of an episode and its events annotated with their texts."""
    spec = tl.spec
    v = spec.variant
    system = f"{SYSTEM_PROMPT}\n\n{spec.knowledge}"
    conv: list[Turn] = [{"role": "system", "content": system}]
    if rng.random() < _USER_OPENS[tl.user_type]:
        conv.append({"role": "user", "content": _fill(_pick(rng, _OPENERS),
                                                      {"make": v.make, "noun": v.noun})})
    cursor = 0
    annotated: list[dict[str, Any]] = []
    for ev in tl.events:
        if ev.kind == "answer_next":  # the question comes in before the frame it is answered on
            if ev.frame > cursor:
                conv.append({"role": "frames", "start": cursor, "end": ev.frame})
                cursor = ev.frame
            question = _pick(rng, _QUESTIONS)
            conv.append({"role": "user", "content": question})
        text = utterance(spec, ev, rng)
        conv.append({"role": "frames", "start": cursor, "end": ev.frame + 1})
        conv.append({"role": "assistant", "content": text})
        cursor = ev.frame + 1
        note = {"frame": ev.frame, "type": ev.kind, "step": ev.step, "text": text}
        if ev.item:
            note["item"] = ev.item
        if ev.kind == "answer_next":
            note["question"] = question
        annotated.append(note)
    if cursor < tl.num_frames:
        conv.append({"role": "frames", "start": cursor, "end": tl.num_frames})
    return conv, annotated
