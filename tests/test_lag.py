"""The lag controller (runtime/lag.py): its levels and hysteresis on an injected clock, the
ladder a bundle allows, and live runs with real onnxruntime sessions under a real load (another
process spinning a core, long replies at a high frame rate), a slowed source, and a decoder
switch at a context reset."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from proassist_edge.bench.busy import burn_cores
from proassist_edge.device.sources import SyntheticSource
from proassist_edge.events import DecoderSwitchEvent, Event, LagLevelEvent, to_record
from proassist_edge.manifest import GraphEntry
from proassist_edge.runtime.assistant import build_assistant
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.lag import (
    Ladder,
    LagController,
    LagOptions,
    Rung,
    StepTiming,
    build_ladder,
    cheaper_decoder,
    frame_mode,
)
from proassist_edge.runtime.loop import Assistant, LoopOptions, RunSummary, format_summary
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.stages import Stage, StageObserver

PERIOD = 0.5  # s: 2 fps
LADDER = Ladder((Rung("full"), Rung("reply_cap", reply_cap=True),
                 Rung("stride2", reply_cap=True, stride=2), Rung("stride4", reply_cap=True, stride=4)),
                "append")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def timing(t: float, age: float = 50, busy: float = 100, idle: float = 300, decision: float = 40,
           tokens: int = 0, dropped: int = 0, frames: int = 1) -> StepTiming:
    ts = tuple(t - PERIOD * i for i in reversed(range(frames)))
    return StepTiming(ts, age, busy, idle, decision, tokens, dropped)


def controller(clock: Clock, **options: Any) -> LagController:
    return LagController(LADDER, PERIOD, 100, LagOptions(**{"min_reply_tokens": 8, **options}),
                         clock=clock)


# --- levels and hysteresis, on an injected clock ------------------------------------------------
def test_a_long_reply_caps_replies_until_they_fit_again() -> None:
    clock, t = Clock(), 0.0
    c = controller(clock, hold_s=4.0)

    def step(dt: float = PERIOD, **kw: Any) -> list[LagLevelEvent]:
        nonlocal t
        t += PERIOD
        clock.now += dt
        return c.observe(timing(t, **kw))

    for _ in range(5):  # on time, the core waiting for its frames
        assert step() == []
    # the budget: the next frame's decision within the 500 ms deadline after a 40 ms decision
    assert c.budget_ms() == 500 + 500 - 40
    # a 50-token reply at 40 ms per token: 2040 ms, over two budgets: as good as two steps behind
    (event,) = step(dt=2.04, busy=2040, tokens=50)
    assert isinstance(event, LagLevelEvent) and (event.previous, event.name, event.level) == (
        "full", "reply_cap", 1)
    assert "behind: step 2040 ms against a 960 ms budget" in event.reason
    # the cap fills 80% of the budget after the decision at the measured 40 ms per token
    assert event.reply_cap == c.reply_cap == int((0.8 * 960 - 40) / 40) == 18
    assert to_record(event)["type"] == "lag_level" and to_record(event)["version"] == 1
    # a backlog from before the change is no evidence against the new level
    assert c.observe(timing(t, age=1500, busy=90, idle=0, frames=3)) == []
    # capped replies that still overrun are no reason to step fewer frames (a stride would
    # only make more frames late), nor, while a token costs 40 ms, to lift the cap
    for _ in range(12):
        assert step(dt=0.76, busy=760, tokens=18) == []
        assert step(busy=40) == []
    assert c.level == 1
    # replies get cheap (10 ms per token): once a capped one would fit 60% of the budget
    # uncapped, the calm must last the hold on the controller's clock
    events = []
    for _ in range(12):
        events += step(busy=220, tokens=18)
    assert [(e.previous, e.name) for e in events] == [("reply_cap", "full")]
    assert "calm for 4.0 s" in events[0].reason and events[0].reply_cap is None
    assert c.reply_cap is None
    seconds = c.seconds()
    assert set(seconds) == {"full", "reply_cap", "stride2", "stride4"}
    assert sum(seconds.values()) == pytest.approx(clock.now - 100.0)
    # calm from the second cheap reply (the running mean per token is then 25 ms), 4 s on
    assert seconds["reply_cap"] == pytest.approx(12 * (0.76 + 0.5) + 0.5 * 10, abs=1e-6)


def test_decisions_that_cannot_keep_up_step_fewer_frames_and_recover() -> None:
    """Replies capped, the frames' own decision over 80% of stride x period: the stride; a
    capped reply that overruns, or frames dropped during one, are no reason for it."""
    clock, t = Clock(), 0.0
    c = controller(clock, up_after=2, hold_s=2.0)

    def step(**kw: Any) -> list[str]:
        nonlocal t
        t += PERIOD
        clock.now += PERIOD
        return [e.name for e in c.observe(timing(t, **kw))]

    assert step(busy=2000, tokens=40, idle=0) == ["reply_cap"]  # two budgets: at once
    assert c.budget_ms() == 0.8 * 500  # the decision's budget now
    assert step(busy=1500, tokens=32, idle=0, dropped=2) == []
    events: list[LagLevelEvent] = []
    for _ in range(10):
        t += PERIOD
        clock.now += PERIOD
        events += c.observe(timing(t, busy=900, decision=900, idle=0))
    assert [e.name for e in events] == ["stride2", "stride4"] and c.rung.stride == 4
    assert "behind: decision 900 ms against a 800 ms budget" in events[1].reason
    # decisions get cheap: back one level per calm hold (the projection of a smaller stride
    # uses the decision measured at the larger one, an overestimate); the cap stays while a
    # reply token still costs ~48 ms
    names = []
    for _ in range(40):
        names += step(busy=150, decision=150)
    assert names == ["stride2", "reply_cap"]
    assert c.summary()["changes"] == 5 and c.summary()["top_level"] == "stride4"


def test_a_late_source_is_not_the_cores_fault() -> None:
    """Frames that arrive old while the core waits for them: misses, the source's, no change."""
    clock, t = Clock(), 0.0
    c = controller(clock)
    for i in range(20):
        t += PERIOD
        clock.now += PERIOD
        assert c.observe(timing(t, age=300 + 100 * i, busy=50, idle=400)) == []
    s = c.summary(dropped=0)
    assert s["late"] == s["late_source"] == 17 and s["changes"] == 0
    assert s["missed"] == s["late_frames"] == 17 and s["offered"] == 20


def test_a_bounce_doubles_the_hold() -> None:
    clock, t = Clock(), 0.0
    c = controller(clock, hold_s=2.0, up_after=1)

    def step(**kw: Any) -> list[str]:
        nonlocal t
        t += PERIOD
        clock.now += PERIOD
        return [e.name for e in c.observe(timing(t, **kw))]

    assert step(busy=2000, idle=0) == ["reply_cap"]
    got: list[str] = []
    while not got:
        got = step(busy=100)
    assert got == ["full"] and c.hold_s == 2.0
    assert step(busy=2000, idle=0) == ["reply_cap"]  # within the hold after recovering: a bounce
    assert c.hold_s == 4.0
    assert sum(len(step(busy=100)) for _ in range(8)) == 0  # calm for 3.5 s: not yet
    assert step(busy=100) == ["full"]


def test_misses_count_every_frame_of_a_joined_step() -> None:
    c = controller(Clock())
    c.observe(timing(2.0, age=100, frames=4, idle=0))  # frames 0.5 s apart: ages 100..1600 ms
    s = c.summary(dropped=3)
    assert s["late_frames"] == 3 and s["frames"] == 4
    assert s["missed"] == 6 and s["offered"] == 7


def test_without_control_it_only_measures() -> None:
    c = LagController(Ladder((Rung("full"),), "append"), PERIOD, 100, clock=Clock())
    for i in range(10):
        assert c.observe(timing(i * PERIOD, busy=2000, idle=0, dropped=2)) == []
    assert c.summary(dropped=20)["control"] is False and c.summary()["late"] == 0


# --- the ladder a bundle allows -----------------------------------------------------------------
def fake_bundle(graphs: dict[str, tuple[str, str]], sep: int | None = None, engines: Any = None,
                decoder: str = "decoder") -> Any:
    model = SimpleNamespace(sep_token_id=sep, not_talk_id=2, tokens_per_frame=5)
    entries = {name: GraphEntry(f"{name}.onnx", precision, [], [], "", variant)
               for name, (precision, variant) in graphs.items()}
    manifest = SimpleNamespace(model=model, graphs=entries, engines=engines or {})
    return SimpleNamespace(manifest=manifest, engine=object() if engines else None,
                           decoder_name=decoder)


def test_ladder_follows_the_bundle() -> None:
    fp32 = {"vision": ("fp32", ""), "decoder": ("fp32", "portable"),
            "decoder_gqa": ("fp32", "optimized")}
    b = fake_bundle(fp32)
    s = StreamSettings(context_strategy="summarize_and_drop")
    ladder = build_ladder(b, s, LagOptions())
    assert ladder.names == ("full", "reply_cap", "stride2", "stride4")
    assert any("no cheaper decoder" in n for n in ladder.notes) and ladder.frame_mode == "append"
    mixed = {**fp32, "decoder_int4": ("int4", "optimized"), "decoder_qdq": ("int8-qdq", "qdq"),
             "decoder_int8": ("int8", "portable")}
    assert cheaper_decoder(fake_bundle(mixed)) == "decoder_int4"
    assert cheaper_decoder(fake_bundle(mixed, decoder="decoder_int4")) is None
    ladder = build_ladder(fake_bundle(mixed), s, LagOptions())
    assert ladder.names[-1] == "decoder" and ladder.rungs[-1].decoder == "decoder_int4"
    assert ladder.rungs[-1].stride == 4 and ladder.rungs[-1].reply_cap
    # drop_middle never empties the memory: no safe moment to switch
    dm = build_ladder(fake_bundle(mixed), StreamSettings(context_strategy="drop_middle"), LagOptions())
    assert "decoder" not in dm.names and any("drop_middle" in n for n in dm.notes)
    # a separator that is not the not-talk token: joined frames are not silent steps
    assert frame_mode(fake_bundle(fp32, sep=7), 4)[0] == "drop"
    assert frame_mode(fake_bundle(fp32, sep=2), 4)[0] == "append"
    # a TensorRT profile that takes at most 12 tokens in one append: 4 frames of 5 do not fit
    profile = {"shapes": {"inputs_embeds": [[1, 1, 576], [1, 8, 576], [1, 12, 576]]}}
    engines = {"decoder": {"profiles": [profile]}}
    assert frame_mode(fake_bundle(fp32, engines=engines), 4)[0] == "drop"
    assert frame_mode(fake_bundle(fp32, engines=engines), 2)[0] == "append"
    assert build_ladder(b, s, LagOptions(), control=False).names == ("full",)


# --- real sessions ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_dir(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fixture's portable decoder, exported without verification (the parity tests
    verify it; 1 token per frame; the random model never ends a reply by itself), and the
    same graph listed again as an int8 `decoder_lite`: a bundle with a cheaper decoder."""
    from proassist_edge.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("lag") / "tiny"
    export_bundle(tiny_ckpt(1, "lm", 1), out,
                  options=ExportOptions(verify="none", variants=("portable",)))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["decoder_lite"] = {**manifest["graphs"]["decoder"], "precision": "int8"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def on_event(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.type == kind]


def live(bundle: Path, source: SyntheticSource, settings: StreamSettings, control: bool,
         **lag: Any) -> tuple[Assistant, Recorder]:
    rec = Recorder()
    options = LoopOptions(realtime=True, lag_control=control, lag=LagOptions(**lag))
    assistant = build_assistant(open_bundle(bundle), source, None, settings, events=[rec],
                                options=options)
    return assistant, rec


def live_run(bundle: Path, source: SyntheticSource, settings: StreamSettings, control: bool,
             **lag: Any) -> tuple[RunSummary, Recorder]:
    assistant, rec = live(bundle, source, settings, control, **lag)
    return assistant.run(), rec


def test_joined_frames_are_the_sequence_of_silent_steps(bundle_dir: Path) -> None:
    """What makes the stride's append mode keep the model's semantics (no-separator model)."""
    b = open_bundle(bundle_dir)
    silent = StreamSettings(threshold=1e-9)  # P(not talk) always exceeds it
    frames = np.stack([SyntheticSource(size=(32, 32))._pattern(i) for i in range(3)])
    one = StreamCore(b, silent)
    steps = [one.step(frames[i : i + 1], i, i / 2) for i in range(3)]
    joined = StreamCore(b, silent).step(frames, 2, 1.0)
    assert not any(r.talk for r in steps) and not joined.talk
    assert joined.context_len == steps[-1].context_len
    assert joined.p_not_talk == pytest.approx(steps[-1].p_not_talk, rel=1e-4)


def test_under_a_busy_core_the_controller_keeps_decisions_on_time(bundle_dir: Path) -> None:
    """A frame rate at which a 60-token reply takes ~3 periods, replies at every frame, while another
    process spins a core: without control every step overruns the period and most
    frames are decided late; with it the replies are capped to what the measured token time
    fits in the budget, and most frames are decided in time."""
    talk = StreamSettings(threshold=1.0, max_reply_tokens=60, context_strategy="drop_all")
    # the frame rate at which a replying step takes about three periods on THIS machine (a fixed
    # rate left a fast CI machine on time without any control)
    core = StreamCore(open_bundle(bundle_dir), talk)
    frame = SyntheticSource(size=(32, 32))._pattern(0)[None]
    core.step(frame, 0, 0.0)
    t0 = time.perf_counter()
    core.step(frame, 1, 0.1)
    fps = max(10.0, 3.0 / (time.perf_counter() - t0))
    with burn_cores(1):
        off, _ = live_run(bundle_dir, SyntheticSource(fps, size=(32, 32), n_frames=40), talk, False)
        on, rec = live_run(bundle_dir, SyntheticSource(fps, size=(32, 32), n_frames=40), talk, True,
                           min_reply_tokens=4)
    assert off.lag is not None and on.lag is not None
    assert off.lag["control"] is False and off.lag["changes"] == 0
    assert off.lag["offered"] == on.lag["offered"] == 40
    assert off.lag["missed"] >= 20, off.lag
    assert on.lag["missed"] <= 0.7 * off.lag["missed"], (on.lag, off.lag)
    changes = rec.of("lag_level")
    assert changes and isinstance(changes[0], LagLevelEvent)
    first = changes[0]
    assert (first.previous, first.name) == ("full", "reply_cap") and "behind" in first.reason
    assert first.reply_cap is not None and 4 <= first.reply_cap < 60
    after = [e for e in rec.of("frame") if e.t > first.t]
    assert after and max(len(e.token_ids) for e in after) <= first.reply_cap
    seconds = on.lag["seconds"]
    assert seconds["reply_cap"] > 0 and sum(seconds.values()) == pytest.approx(on.wall_s, abs=0.5)
    stop = to_record(rec.of("stop")[0])
    assert stop["lag"]["seconds"] == seconds and stop["version"] == 1
    assert "lag control       on" in format_summary(on)


class SlowCamera(SyntheticSource):
    """A camera whose frames come out late: each takes 150 ms to read at 10 fps."""

    def _pattern(self, index: int) -> np.ndarray:
        time.sleep(0.15)
        return super()._pattern(index)


def test_a_slowed_source_is_not_met_by_degrading(bundle_dir: Path) -> None:
    short = StreamSettings(threshold=1.0, max_reply_tokens=4)
    with burn_cores(1):
        summary, rec = live_run(bundle_dir, SlowCamera(10.0, size=(32, 32), n_frames=12), short, True)
    lag = summary.lag
    assert lag is not None and lag["late"] >= 8, lag  # the frames are old when they arrive...
    assert lag["late_source"] == lag["late"]  # ...while the core waits for each one
    assert rec.of("lag_level") == [] and lag["seconds"]["reply_cap"] == 0.0
    assert summary.dropped == 0 and lag["frames"] == 12


class SlowVision(StageObserver):
    """A vision encoder slowed to 60 ms a frame (a stage observer that waits, as a hot device)."""

    def __init__(self) -> None:
        self.never = threading.Event()

    def stage_started(self, stage: Stage) -> None:
        if stage.name == "encode":
            self.never.wait(0.06 * stage.tokens)


class StopAfterSwitch:
    """Ends the run two steps after a decoder switch."""

    def __init__(self, assistant: Assistant) -> None:
        self.assistant, self.steps = assistant, -1

    def on_event(self, event: Event) -> None:
        if isinstance(event, DecoderSwitchEvent):
            self.steps = 0
        elif event.type == "frame" and self.steps >= 0:
            self.steps += 1
            if self.steps == 2:
                self.assistant.stop()


def test_the_decoder_switches_only_when_the_memory_is_empty(bundle_dir: Path) -> None:
    """Decisions that cannot keep up at any stride (20 fps, 60 ms a frame) take the core up to
    the bundle's cheaper decoder, which it moves to at the first drop_all reset after."""
    settings = StreamSettings(threshold=1.0, max_reply_tokens=60, context_strategy="drop_all",
                              max_seq_len=300)
    source = SyntheticSource(20.0, size=(32, 32), n_frames=120)
    assistant, rec = live(bundle_dir, source, settings, True, up_after=1, hold_s=60.0)
    assistant.core.observers.append(SlowVision())
    assistant.bus.add(StopAfterSwitch(assistant))
    own = assistant.core.dec
    summary = assistant.run()
    assert summary.lag is not None and summary.lag["ladder"][-1] == "decoder"
    names = [e.name for e in rec.of("lag_level")]
    assert names == ["reply_cap", "stride2", "stride4", "decoder"], names
    (switch,) = rec.of("decoder_switch")
    assert isinstance(switch, DecoderSwitchEvent)
    assert (switch.previous, switch.decoder) == ("decoder", "decoder_lite")
    before = [e for e in rec.of("frame") if e.t < switch.t]
    assert before[-1].reset == "drop_all"  # the step before the switch emptied the memory
    assert [e.name for e in rec.of("lag_level") if e.t <= before[-1].t][-1] == "decoder"
    assert assistant.core.dec is not own and assistant.core.dec.capacity == own.capacity
    later = [e for e in rec.of("frame") if e.t > switch.t]
    assert later and all(np.isfinite(e.p_not_talk) for e in later)


def test_bench_table_reads_the_rows() -> None:
    from proassist_edge.bench.lag import lag_table

    live = {"condition": "busy+control", "other_processes_cores": 1.02, "missed": 6, "offered": 120,
            "missed_share": 0.05, "decisions": 110, "late": 3, "dropped": 2, "skipped": 0,
            "step_ms_p95": 812.4, "seconds": {"full": 10.0, "reply_cap": 52.5, "stride2": 0.0},
            "f1": 0.5, "replies": 12}
    replay = {"condition": "replay", "missed": None, "decisions": 120, "f1": 0.6, "replies": 13}
    table = lag_table({"rows": [live, replay]}).splitlines()
    assert table[2] == ("| busy+control | 1.02 | 6 of 120 (5%) | 110 (3) | 2 / 0 | 812 | "
                        "full 10, reply_cap 52.5 | 0.500 | 12 |")
    assert table[3].startswith("| replay |") and "0.600" in table[3]
