"""An engine is recorded only when it agrees with onnxruntime: `build-engine` replays one stream
through the new engine and through the bundle's onnxruntime decoder and compares every frame's
decision and reply tokens (and a summary's, where the stream holds one).

The comparison takes any `capacity -> Decoder` factory, so the refusal and record paths run on
the CPU with an onnxruntime session standing in for the engine (tests/test_engine_check.py);
the engine itself is checked on a GPU by scripts/gpu_check.sh. Not yet run on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import ExportError
from proassist_edge.manifest import load_manifest, write_manifest
from proassist_edge.runtime.backend import Decoder
from proassist_edge.runtime.bundle import Bundle
from proassist_edge.runtime.core import StreamCore, settings_from_manifest
from proassist_edge.runtime.messages import FrameResult, TextMessage

COMPARED = ("talk", "token_ids", "summary_ids", "reset")
KNOWLEDGE = "Task knowledge: 1. Pick up the part. 2. Fit it to the base. 3. Check the fit."


class EngineRefusedError(ExportError):
    """A built engine disagrees with the onnxruntime bundle; it is not recorded."""


@dataclass(frozen=True)
class EngineCheck:
    """The replay's verdict: `agree`, and where not, the first frame and field that differ."""

    agree: bool
    frames: int
    talks: int
    tokens: int
    max_p_diff: float
    difference: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_stream(image_size: int, frames: int, fps: float,
                 seed: int = 0) -> tuple[np.ndarray, list[TextMessage]]:
    """Random frames with a user question a third of the way in and the task knowledge first:
    a long first prompt, a reply and (with a short context) a reduction."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, image_size, image_size, 3), dtype=np.uint8)
    return pixels, [TextMessage("user", "What should I do next?", (frames // 3) / fps)]


def compare_engine(bundle: Bundle, engine: Callable[[int], Decoder], frames: int = 24,
                   max_seq_len: int | None = None, seed: int = 0) -> EngineCheck:
    """Replay one stream with `bundle`'s onnxruntime decoder and with `engine` in its place."""
    m = bundle.manifest.model
    settings = settings_from_manifest(bundle, max_seq_len=max_seq_len)
    pixels, messages = check_stream(m.image_size, frames, m.fps, seed)
    ref_bundle = dataclasses.replace(bundle, engine=None)
    new_bundle = dataclasses.replace(bundle, engine=engine)
    ref = list(StreamCore(ref_bundle, settings, None, KNOWLEDGE).replay(pixels, messages, m.fps))
    got = list(StreamCore(new_bundle, settings, None, KNOWLEDGE).replay(pixels, messages, m.fps))
    return _verdict(ref, got)


def _verdict(ref: list[FrameResult], got: list[FrameResult]) -> EngineCheck:
    diff = max((abs(a.p_not_talk - b.p_not_talk) for a, b in zip(ref, got, strict=True)),
               default=0.0)
    first = ""
    for a, b in zip(ref, got, strict=True):
        for f in COMPARED:
            if getattr(a, f) != getattr(b, f):
                first = (f"frame {a.index}: {f} {getattr(b, f)!r} from the engine, "
                         f"{getattr(a, f)!r} from onnxruntime (P(not talk) {b.p_not_talk:.4f} vs "
                         f"{a.p_not_talk:.4f})")
                break
        if first:
            break
    return EngineCheck(not first, len(ref), sum(r.talk for r in ref),
                       sum(len(r.token_ids) for r in ref), float(diff), first)


def record_engine(root: Path, graph: str, built: Path, meta: dict[str, Any], check: EngineCheck,
                  ) -> Path:
    """Move the engine built at `built` (and its .json) into the bundle and list it in the
    manifest when `check` agrees; else delete it and raise EngineRefusedError saying why."""
    meta_file = built.with_name(built.name + ".json")
    if not check.agree:
        built.unlink(missing_ok=True)
        meta_file.unlink(missing_ok=True)
        raise EngineRefusedError(
            f"the TensorRT engine for {graph} disagrees with onnxruntime over a {check.frames}-frame "
            f"replay ({check.difference}); it was not recorded. Build it with --fp32, or keep "
            "running on onnxruntime (the bundle is unchanged)")
    target = root / f"{graph}.engine"
    shutil.move(str(built), target)
    full = {**meta, "file": target.name, "check": check.to_dict()}
    (root / f"{target.name}.json").write_text(json.dumps(full, indent=2))
    meta_file.unlink(missing_ok=True)
    manifest = load_manifest(root, verify=False)
    manifest.engines = {graph: full}  # the runtime checks it against the device
    write_manifest(root, manifest)
    return target
