"""The stages of a frame step, as observers of the core see them (observers in pipecat's sense:
they watch from outside; the stage code neither knows nor waits for them).

`StreamCore` notifies each observer before and after every stage: the vision encode, the
decision append, each reply or summary token, the summary request, and every change of the KV
memory (reset, keep). Timing (`runtime/events.py` `StageTimer`), the benchmark's clock and the
quantization tools' feed recorder and shadow decoder are observers; none replaces a method or
wraps the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from proassist_edge.runtime.backend import StepOut

StageName = Literal["encode", "append", "decode", "summary", "reset", "keep"]
# appends whose last position decides talk / not talk (the summary's at SUMMARY_THRESHOLD)
DECISIONS: frozenset[str] = frozenset({"append", "summary"})
APPENDS: frozenset[str] = frozenset({"append", "decode", "summary"})


@dataclass(frozen=True)
class Stage:
    """One stage of a step.

    `name`: "encode" (the vision graph on `frames`), "append" (a frame step's decision append:
    pending text, messages, then frame tokens), "decode" (one reply or summary token), "summary"
    (the summary request and the frame again), "reset" (the memory emptied), "keep" (the memory
    cut to `keep` = (prefix_len, start, end): drop_middle, or a rollback to kv_len with an empty
    tail). `tokens`: positions appended, or frames encoded. For an append, `embeds` are its inputs
    and `ids` the token ids embedded in them ahead of the frames (the reply token for "decode");
    `frames` are the pixels whose tokens follow (frames are joined by the separator, when the
    model has one, as `frame_inputs` does).
    """

    name: StageName
    tokens: int = 0
    embeds: np.ndarray | None = field(default=None, repr=False)
    ids: tuple[int, ...] = ()
    frames: np.ndarray | None = field(default=None, repr=False)
    keep: tuple[int, int, int] | None = None


class StageObserver(Protocol):
    """Told about each stage before it runs and after (with its output: the StepOut of an
    append, the frame tokens of an encode, None for reset and keep). Subclass it to inherit
    no-op methods. An observer that raises stops the step: observers are this process's own
    instruments (timing, calibration), not plugins."""

    def stage_started(self, stage: Stage) -> None:
        return None

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        return None
