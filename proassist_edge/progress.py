"""Stage progress for the long tools (export, quantize): a tqdm bar whose postfix names the
stage, plus what each stage cost (seconds, and the process's peak RSS when it ended), which the
tools bench reads from the tools' summaries."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Stages:
    """`stage(name)` ends the running stage and starts NAME; `update()` advances the bar;
    `close()` ends the last stage. `record` maps each stage to its seconds, the process's peak RSS
    when it ended and its RSS then."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled)
        self.record: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._t0 = time.perf_counter()

    def _end(self) -> None:
        if self._name is not None:
            took = time.perf_counter() - self._t0
            entry = self.record.setdefault(self._name, {"seconds": 0.0})
            entry["seconds"] = round(entry["seconds"] + took, 3)
            entry["peak_rss_bytes"] = peak_rss_bytes()
            entry["rss_bytes"] = rss_bytes()  # at the stage's end: what it left behind
        self._name, self._t0 = None, time.perf_counter()

    def stage(self, name: str) -> None:
        self._end()
        self._name = name
        self.bar.set_postfix_str(name)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix_str(self, text: str) -> None:  # tqdm's name, for callers that pass a bar
        self.stage(text)

    def close(self) -> None:
        self._end()
        self.bar.close()

    def summary(self) -> dict[str, Any]:
        return {"stages": self.record, "peak_rss_bytes": peak_rss_bytes()}
