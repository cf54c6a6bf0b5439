"""The lag controller: keeps the live loop's decisions within a deadline of the camera, degrading
in steps that keep the model's semantics when the core falls behind and recovering with
hysteresis when it has room again.

What it measures (the loop hands it one `StepTiming` per step):
- age: how old the newest frame of a step was when its decision was known; a frame decided
  later than the deadline after its capture, or never (dropped, skipped), is a deadline miss;
- busy: the whole step (encode, append, decide, reply) against its budget, stride x period +
  deadline - the decision's time (longer, and the next frame's decision is late); and the
  decision alone (encode and append) against `cap_share` of stride x period;
- idle: how long the core waited for its frames. A core that waited did not make its frame old
  (the source delivered it late): nothing the core could drop would help, so the controller
  neither degrades for such a miss (counted as the source's) nor counts the step as calm.

The ladder (level: name); each level keeps the ones below it:
- 0 `full`: the model as shipped.
- 1 `reply_cap`: answers a step that overran with a reply. Replies are capped to what fits the
  budget at the measured ms per token and share of replying steps, never below
  `min_reply_tokens`: a capped reply is a prefix of the full one, cut as the authors' loop cuts
  at max_reply_tokens, but it stays in the memory, and a model whose instruction was cut tends
  to say it again, so the floor keeps whole instructions and the cap bounds runaway replies.
- 2 `stride2`, 3 `stride4`: answer decisions that cannot keep up with the frame rate (not
  replies: a stride shortens none, holds frames back by up to stride - 1 periods, and the loop
  already joins the frames that waited during a reply). The core steps every k-th frame.
  "append": the k frames go in one append, which is the token sequence of k silent steps (no
  separator: frames back to back; a separator model feeds its separator, the not-talk token,
  after a silent frame and between joined frames): the memory is what it would have been, only
  the skipped frames' decisions are not taken. "drop" (a separator that is not the not-talk
  token, or a TensorRT profile too small for k frames): only the newest of each k frames is
  stepped, the others never enter the memory, and every frame keeps its true index and time.
- 4 `decoder`: the bundle's cheaper decoder graph (a lower precision), if it holds one.
  Switching decoders mid-stream is not safe: the KV one graph computed is not what another
  (other weights, another precision) would have, and the backends lay their buffers out
  differently. The switch waits until the memory is empty, after a drop_all or
  summarize_and_drop reset; drop_middle never empties it, so its ladder has no decoder level.

Hysteresis: it degrades one level after `up_after` steps in a row behind (a step that took k
budgets counts as k), counting only frames captured after the last change (a backlog from before
it is no evidence against the new level); it recovers one level after the core was calm (it waited for its
frames, and the lower level's step, projected from the measured times, fits `calm_ratio` of its
budget) for `hold_s` seconds; a degradation soon after a recovery doubles the hold (up to
`max_hold_s`), so a load at the edge does not make it flap. Every change is a `lag_level` event
with its reason; `summary()` gives the seconds at each level and the deadline misses.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from proassist_edge.events import DecoderSwitchEvent, Event, LagLevelEvent
from proassist_edge.runtime.backend import StepOut
from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.context import ContextStrategy
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.engine import INPUTS_EMBEDS
from proassist_edge.runtime.grabber import ThreadedSource
from proassist_edge.runtime.messages import Frame
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.stages import Stage, StageObserver

log = logging.getLogger(__name__)

FrameMode = Literal["append", "drop"]
# cheaper = lower; only the decoder variants that run on onnxruntime's CPU path are candidates
PRECISION_RANK = {"int4": 0, "int8": 1, "fp16": 2, "fp32": 3}
DECODER_VARIANTS = ("portable", "optimized")


@dataclass(frozen=True)
class LagOptions:
    """How the controller reacts. `deadline_ms` None: the frame period."""

    deadline_ms: float | None = None
    up_after: int = 2  # steps in a row behind before degrading one level
    hold_s: float = 4.0  # calm seconds before recovering one level
    max_hold_s: float = 32.0  # the hold doubles after a bounce, up to this
    calm_ratio: float = 0.6  # calm: the lower level's step under this share of its budget
    cap_share: float = 0.8  # level 1 caps replies to fill this share of the budget
    # never cap a reply below this: a whole instruction (task-world replies: 13-24 tokens); a
    # cut one stays in the memory and the model says it again (docs/benchmarks.md)
    min_reply_tokens: int = 32
    strides: tuple[int, ...] = (2, 4)
    frame_mode: Literal["auto", "append", "drop"] = "auto"
    fallback_decoder: str | None = None  # None: the bundle's cheaper decoder, if any
    idle_eps_ms: float = 2.0  # a core that waited longer than this for its frame was not behind


@dataclass(frozen=True)
class Rung:
    """One level of the ladder."""

    name: str
    reply_cap: bool = False
    stride: int = 1
    decoder: str | None = None  # None: the bundle's own


@dataclass(frozen=True)
class Ladder:
    rungs: tuple[Rung, ...]
    frame_mode: FrameMode
    notes: tuple[str, ...] = ()  # why a level is missing, how frames are skipped

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rungs)


@dataclass(frozen=True)
class StepTiming:
    """One step as the controller sees it (durations in ms)."""

    frames: tuple[float, ...]  # the stream times of the step's frames, oldest first
    age_ms: float  # the newest frame's age when the step's decision was known
    busy_ms: float
    idle_ms: float
    decision_ms: float  # encode + decision append: what a reply cap cannot shorten
    reply_tokens: int
    dropped: int = 0  # frames the source dropped since the previous step

    @property
    def t(self) -> float:
        return self.frames[-1]

    def late_frames(self, deadline_ms: float) -> int:
        """Frames of the step decided later than the deadline after their capture."""
        return sum(self.age_ms + 1e3 * (self.t - t) > deadline_ms for t in self.frames)


def frame_mode(bundle: Bundle, stride: int) -> tuple[FrameMode, str]:
    """Whether `stride` frames may go in one append (see the module's table), and why."""
    m = bundle.manifest.model
    if m.sep_token_id is not None and m.sep_token_id != m.not_talk_id:
        return "drop", (f"separator {m.sep_token_id} is not the not-talk token {m.not_talk_id}: "
                        "joined frames would not be the sequence of silent steps")
    need = stride * m.tokens_per_frame + (stride - 1)
    for meta in bundle.manifest.engines.values() if bundle.engine is not None else ():
        most = max(p["shapes"][INPUTS_EMBEDS][2][1] for p in meta.get("profiles", ()))
        if need > most:
            return "drop", f"the TensorRT engine takes at most {most} tokens in one append, {need} needed"
    return "append", "joined frames are the token sequence of silent steps"


def cheaper_decoder(bundle: Bundle) -> str | None:
    """The bundle's decoder graph of the lowest precision below the running one's, if any."""
    graphs = bundle.manifest.graphs
    own = PRECISION_RANK.get(graphs[bundle.decoder_name].precision, len(PRECISION_RANK))
    found = [(PRECISION_RANK[g.precision], name != bundle.decoder_name, name)
             for name, g in graphs.items()
             if g.variant in DECODER_VARIANTS and PRECISION_RANK.get(g.precision, own) < own]
    return min(found)[2] if found else None


def build_ladder(
    bundle: Bundle, settings: StreamSettings, options: LagOptions, control: bool = True
) -> Ladder:
    """The levels this bundle and stream can use (just `full` without `control`)."""
    if not control:
        return Ladder((Rung("full"),), "append", ("lag control off: measured only",))
    strides = sorted({k for k in options.strides if k > 1})
    mode, why = frame_mode(bundle, max(strides, default=1))
    if options.frame_mode != "auto":
        mode, why = options.frame_mode, "asked"
    notes = [f"frames at a stride: {mode} ({why})"]
    rungs = [Rung("full"), Rung("reply_cap", reply_cap=True)]
    rungs += [Rung(f"stride{k}", reply_cap=True, stride=k) for k in strides]
    decoder = options.fallback_decoder or cheaper_decoder(bundle)
    if decoder is None:
        notes.append("no decoder level: the bundle holds no cheaper decoder graph")
    elif decoder not in bundle.manifest.graphs:
        notes.append(f"no decoder level: the bundle has no graph {decoder!r}")
    elif settings.strategy is ContextStrategy.DROP_MIDDLE:
        notes.append(f"no decoder level: {decoder} could only replace the running decoder while "
                     "the memory is empty, and drop_middle never empties it")
    else:
        rungs.append(replace(rungs[-1], name="decoder", decoder=decoder))
    return Ladder(tuple(rungs), mode, tuple(notes))


class DecisionClock(StageObserver):
    """A stage observer that notes when each step's decision append ends (perf_counter)."""

    def __init__(self) -> None:
        self.decided = 0.0

    def stage_ended(self, stage: Stage, out: StepOut | np.ndarray | None) -> None:
        if stage.name == "append":
            self.decided = time.perf_counter()


def mean(old: float | None, x: float, a: float = 0.3) -> float:
    """An exponential running mean (`x` alone at first)."""
    return x if old is None else (1 - a) * old + a * x


class LagController:
    """Chooses the level from the measured steps (see the module docstring).

    `observe(timing)` after each step returns the `lag_level` events of any change; `rung` and
    `reply_cap` say what the next step should run. `clock` (monotonic seconds) times the levels
    and the hold; tests inject one."""

    def __init__(
        self,
        ladder: Ladder,
        period_s: float,
        full_reply_tokens: int,
        options: LagOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        keep_ages: int = 4096,
    ) -> None:
        self.ladder, self.options, self.clock = ladder, options or LagOptions(), clock
        self.period_ms = 1e3 * period_s
        o = self.options
        self.deadline_ms = self.period_ms if o.deadline_ms is None else float(o.deadline_ms)
        if self.deadline_ms <= 0 or self.period_ms <= 0:
            raise ValueError(f"deadline {self.deadline_ms} ms and period {self.period_ms} ms must be > 0")
        self.full_reply_tokens = full_reply_tokens
        self.level = 0
        self.reply_cap: int | None = None
        self.hold_s = o.hold_s
        self._behind = 0
        self._calm_since: float | None = None
        self._settle_t = -float("inf")  # frames captured before this stream time are backlog
        self._entered = clock()
        self._recovered_at: float | None = None
        self._seconds = {name: 0.0 for name in ladder.names}
        self._decision_ms: float | None = None
        self._talk: float | None = None  # the share of steps that reply
        self._token_ms: float | None = None
        self.ages: deque[float] = deque(maxlen=keep_ages)
        self.steps = self.late = self.late_source = self.changes = self.skipped = 0
        self.frames = self.late_frames = 0
        self.top = 0

    @property
    def rung(self) -> Rung:
        return self.ladder.rungs[self.level]

    def budget_ms(self, level: int | None = None) -> float:
        """How long a step may take at `level` (default: the current one). Replies uncapped: the
        whole step, so that the next frame's decision is still within the deadline (stride x
        period + deadline - the decision's time). Replies capped: the frames' decision alone,
        `cap_share` of stride x period, so that it keeps up with room for the replies."""
        rung = self.ladder.rungs[self.level if level is None else level]
        if rung.reply_cap:
            return self.options.cap_share * rung.stride * self.period_ms
        d = self._decision_ms or 0.0
        return max(d, rung.stride * self.period_ms + self.deadline_ms - d)

    # --- measuring -----------------------------------------------------------------------------
    def observe(self, s: StepTiming) -> list[LagLevelEvent]:
        """Account one step; degrade or recover when it is due (the module's rules: behind is
        a step over `budget_ms()`, or frames dropped with replies uncapped). Returns the change
        events."""
        self.steps += 1
        self.frames += len(s.frames)
        self.late_frames += s.late_frames(self.deadline_ms)
        self.ages.append(s.age_ms)
        core_bound = s.idle_ms <= self.options.idle_eps_ms
        late = s.age_ms > self.deadline_ms
        self.late += late
        self.late_source += late and not core_bound
        self._learn(s)
        if s.t < self._settle_t or len(self.ladder.rungs) == 1:
            return []
        capped = self.rung.reply_cap
        cost, budget = (s.decision_ms if capped else s.busy_ms), self.budget_ms()
        if cost > budget or (s.dropped and not capped):
            # a step that took several budgets is as much evidence as several steps behind
            self._behind += max(1, min(self.options.up_after, int(cost // budget)))
            self._calm_since = None
            if self._behind < self.options.up_after or self.level + 1 == len(self.ladder.rungs):
                return []
            why = (f"behind: {'decision' if capped else 'step'} {cost:.0f} ms against a "
                   f"{budget:.0f} ms budget" + (f", {s.dropped} frames dropped" if s.dropped else "")
                   + f"; decision age {s.age_ms:.0f} ms (deadline {self.deadline_ms:.0f} ms)")
            return [self._change(self.level + 1, why, s)]
        self._behind = 0
        if self.level == 0:
            return []
        lower = self.level - 1
        projected, room = self._projected_ms(lower), self.options.calm_ratio * self.budget_ms(lower)
        if core_bound or projected > room:
            self._calm_since = None
            return []
        now = self.clock()
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since < self.hold_s:
            return []
        why = (f"calm for {now - self._calm_since:.1f} s: at {self.ladder.rungs[lower].name} "
               f"{'a decision' if self.ladder.rungs[lower].reply_cap else 'a reply step'} would "
               f"take about {projected:.0f} ms, under {self.options.calm_ratio:.0%} of its "
               f"{self.budget_ms(lower):.0f} ms budget; the core waits for frames")
        return [self._change(lower, why, s)]

    def _projected_ms(self, level: int) -> float:
        """A step at `level` from the running means: the frames' decision as measured at the
        current stride (more frames than a lower stride's: an overestimate), plus, when that
        level does not cap replies, a reply of the current cap's length (a lower bound)."""
        d = self._decision_ms or 0.0
        if self.ladder.rungs[level].reply_cap:
            return d
        return d + (self._token_ms or 0.0) * (self.reply_cap or self.full_reply_tokens)

    def _learn(self, s: StepTiming) -> None:
        """Running means of the decision's time, a reply token's, and the share of steps that
        reply (for the reply cap)."""
        self._decision_ms = mean(self._decision_ms, s.decision_ms)
        self._talk = mean(self._talk, float(s.reply_tokens > 0))
        if s.reply_tokens >= 2:
            self._token_ms = mean(self._token_ms, max(0.0, s.busy_ms - s.decision_ms) / s.reply_tokens)

    def _cap(self) -> int:
        """Reply tokens whose time fits `cap_share` of the step budget after the decision, and
        keeps the core's average step (the decision, and a reply on the share of steps that
        reply) within `cap_share` of stride x period."""
        o, d, full = self.options, self._decision_ms or 0.0, self.full_reply_tokens
        cap = full // 4  # no reply timed yet
        if self._token_ms:
            talk = 1.0 if self._talk is None else max(self._talk, 0.05)
            throughput = (o.cap_share * self.rung.stride * self.period_ms - d) / talk
            cap = int(min(o.cap_share * self.budget_ms(0) - d, throughput) / self._token_ms)
        return max(min(o.min_reply_tokens, full), min(cap, full))

    def _change(self, level: int, reason: str, s: StepTiming) -> LagLevelEvent:
        now = self.clock()
        previous = self.rung
        self._seconds[previous.name] += now - self._entered
        self._entered = now
        up = level > self.level
        if up and self._recovered_at is not None and now - self._recovered_at < self.hold_s:
            self.hold_s = min(2 * self.hold_s, self.options.max_hold_s)  # a bounce
        if not up:
            self._recovered_at = now
        self.level = level
        self.top = max(self.top, level)
        self.changes += 1
        self._behind, self._calm_since = 0, None
        self._settle_t = s.t + s.age_ms / 1e3  # the stream's clock now
        if self.rung.reply_cap and (self.reply_cap is None or not previous.reply_cap):
            self.reply_cap = self._cap()
        elif not self.rung.reply_cap:
            self.reply_cap = None
        r = self.rung
        return LagLevelEvent(
            level=level, name=r.name, previous=previous.name, reason=reason, t=s.t,
            age_ms=s.age_ms, step_ms=s.busy_ms, budget_ms=self.budget_ms(),
            deadline_ms=self.deadline_ms, reply_cap=self.reply_cap, stride=r.stride,
            frame_mode=self.ladder.frame_mode, decoder=r.decoder, hold_s=self.hold_s,
        )

    # --- reporting -----------------------------------------------------------------------------
    def seconds(self) -> dict[str, float]:
        """Seconds spent at each level so far (the current one up to now)."""
        out = dict(self._seconds)
        out[self.rung.name] += self.clock() - self._entered
        return {k: round(v, 3) for k, v in out.items()}

    def summary(self, dropped: int = 0) -> dict[str, Any]:
        """The run summary's `lag` section; `dropped`: the frames the source dropped. `missed`:
        the frames not decided within the deadline of their capture (late, dropped, skipped)."""
        ages = np.asarray(self.ages, dtype=np.float64)
        pct = (lambda q: float(np.percentile(ages, q))) if len(ages) else (lambda q: None)
        return {
            "deadline_ms": self.deadline_ms, "period_ms": self.period_ms,
            "control": len(self.ladder.rungs) > 1, "ladder": list(self.ladder.names),
            "frame_mode": self.ladder.frame_mode, "notes": list(self.ladder.notes),
            "seconds": self.seconds(), "changes": self.changes,
            "top_level": self.ladder.rungs[self.top].name, "level": self.rung.name,
            "decisions": self.steps, "late": self.late, "late_source": self.late_source,
            "frames": self.frames, "late_frames": self.late_frames, "skipped": self.skipped,
            "missed": self.late_frames + self.skipped + dropped,
            "offered": self.frames + self.skipped + dropped,
            "age_ms_p50": pct(50), "age_ms_p95": pct(95),
        }


class DecoderSwitch:
    """Runs the core on another decoder graph of its bundle, swapped in only while the memory is
    empty (see the module docstring). The other decoder is loaded in a background thread when
    first wanted; both stay loaded, so switching back costs nothing."""

    def __init__(self, core: StreamCore) -> None:
        self.core = core
        self.current = core.b.decoder_name
        self._loaded: dict[str, Any] = {self.current: core.dec}
        self._loading: dict[str, Future[Any]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def prepare(self, name: str) -> None:
        if name in self._loaded or name in self._loading:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder-load")
        # a Bundle sharing every session, whose new decoders come from the other graph
        other = replace(self.core.b, decoder_name=name, engine=None)
        self._loading[name] = self._pool.submit(other.new_decoder, self.core.dec.capacity)

    def want(self, name: str | None, t: float) -> DecoderSwitchEvent | None:
        """Before a step: switch to `name` (None: the bundle's own) if the memory is empty and
        the decoder is loaded; an event when it switched."""
        name = name or self.core.b.decoder_name
        if name == self.current:
            return None
        self.prepare(name)
        if self.core.kv_len != 0:
            return None
        future = self._loading.get(name)
        if future is not None:
            if not future.done():
                return None
            self._loaded[name] = future.result()  # a load error surfaces here, in the core thread
            del self._loading[name]
        decoder = self._loaded[name]
        decoder.reset()
        self.core.dec = decoder
        previous, self.current = self.current, name
        return DecoderSwitchEvent(decoder=name, previous=previous, t=t,
                                  reason="the memory is empty (context reset): no KV to carry over")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class LiveLag:
    """The controller wired into the live loop (runtime/loop.py): it holds frames up to the
    stride, applies the level's reply cap and decoder before a step, and hands the controller
    each step's timing after it; the events go to `emit`.

    Holding policy: the core keeps at most the frames of one stride (plus those that arrived
    while it was busy, which the source's own queue bounds); at the end of the stream the held
    frames are stepped; in drop mode all but the newest of a step's frames are counted in
    `skipped` and never enter the memory."""

    def __init__(
        self, core: StreamCore, fps: float, options: LagOptions, control: bool,
        emit: Callable[[Event], None],
    ) -> None:
        self.core, self.emit = core, emit
        ladder = build_ladder(core.b, core.s, options, control)
        self.controller = LagController(ladder, 1.0 / fps, core.s.max_reply_tokens, options)
        self.decoders = DecoderSwitch(core) if any(r.decoder for r in ladder.rungs) else None
        self.clock = DecisionClock()
        core.observers.append(self.clock)
        self.held: list[Frame] = []
        self.idle_s = 0.0  # the core's wait for frames since its last step
        self.drops_seen = 0

    def next_frames(self, grabber: ThreadedSource, wait_s: float) -> list[Frame]:
        """The next step's frames: all that wait once `stride` do ([] at the end of the stream);
        raises TimeoutError while fewer do, so the loop looks at its stop flag."""
        c = self.controller
        t0 = time.perf_counter()
        try:
            got = grabber.get_batch(timeout=wait_s)
        finally:
            self.idle_s += time.perf_counter() - t0
        self.held += got
        if got and len(self.held) < c.rung.stride:
            raise TimeoutError("holding frames until the stride")
        batch, self.held = self.held, []
        if c.rung.stride > 1 and c.ladder.frame_mode == "drop" and len(batch) > 1:
            c.skipped += len(batch) - 1
            batch = batch[-1:]
        return batch

    def before_step(self, t: float) -> None:
        c, core = self.controller, self.core
        cap = c.reply_cap or c.full_reply_tokens
        if core.s.max_reply_tokens != cap:
            core.s = replace(core.s, max_reply_tokens=cap)
        if self.decoders is not None and (event := self.decoders.want(c.rung.decoder, t)):
            self.emit(event)

    def after_step(
        self, frames: Sequence[Frame], lag_s: float | None, t0: float, step_ms: float, tokens: int,
        dropped: int,
    ) -> None:
        """`lag_s`: the newest frame's age at the step's start; `t0`: its perf_counter start;
        `dropped`: the source's drops so far."""
        if lag_s is None:
            return
        decision_ms = 1e3 * max(0.0, self.clock.decided - t0)
        timing = StepTiming(
            frames=tuple(f.t for f in frames), age_ms=1e3 * lag_s + decision_ms, busy_ms=step_ms,
            idle_ms=1e3 * self.idle_s, decision_ms=decision_ms, reply_tokens=tokens,
            dropped=dropped - self.drops_seen,
        )
        self.idle_s, self.drops_seen = 0.0, dropped
        for event in self.controller.observe(timing):
            log.info("lag control: %s -> %s (%s)", event.previous, event.name, event.reason)
            self.emit(event)
        decoder = self.controller.rung.decoder
        if self.decoders is not None and decoder is not None:
            self.decoders.prepare(decoder)  # loads in the background while the memory fills

    def close(self, dropped: int) -> dict[str, Any]:
        """The run summary's `lag` section (`dropped`: the source's drops in the run)."""
        if self.decoders is not None:
            self.decoders.close()
        return self.controller.summary(dropped)

