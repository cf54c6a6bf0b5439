"""The one place an assistant is wired: a bundle, a source, a sink and settings in; the core, its
event bus and its observers out. `run`, `replay`, `demo`, `eval`, `soak` and `bench` all build
their core here."""

from __future__ import annotations

from collections.abc import Sequence

from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.events import EventBus, LatencyObserver, Observer, StageTimer
from proassist_edge.runtime.loop import Assistant, LoopOptions
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.source_base import FrameSource
from proassist_edge.runtime.speech_base import SpeechSink
from proassist_edge.runtime.stages import StageObserver


def build_assistant(
    bundle: Bundle,
    source: FrameSource | None = None,
    sink: SpeechSink | None = None,
    settings: StreamSettings | None = None,
    *,
    system: str | None = None,
    knowledge: str = "",
    events: Sequence[Observer] = (),
    stages: Sequence[StageObserver] = (),
    options: LoopOptions | None = None,
    opening: bool = True,
) -> Assistant:
    """The assistant over `bundle` (settings: the manifest's when None; system: the bundle's
    prompt when None; `opening` False: no opening system message), with `events` observing its
    event bus and `stages` its core's stages.

    With a source it is the live loop (`run()`): its stages are timed into `stage` events, a
    LatencyObserver on the bus fills the run summary's latency, and the source reports to the
    bus. Without one, callers that step the core themselves (replay, eval, soak, bench) use
    `assistant.core` and `assistant.bus`.
    """
    core = StreamCore(bundle, settings, system, knowledge, observers=stages, opening=opening)
    bus = EventBus(events)
    latency = None
    if source is not None:
        latency = LatencyObserver()
        bus.add(latency)
        core.observers.append(StageTimer(bus.emit))
        if source.on_event is None:
            source.on_event = bus.emit
    return Assistant(core, source, sink, bus, options, latency)
