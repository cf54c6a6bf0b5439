"""How busy the rest of the machine was while the benchmark measured.

On a shared machine another process's work shows up as our latency: one busy core out of two
made the int4 decode step 2.5-3x slower here, while a large-array read lost only a third of its
bandwidth, so a decode-over-floor ratio measured on a busy machine says more about the neighbours
than about the runtime. The benchmark therefore records the CPU time every other process used
during each measurement (the machine's busy time from /proc/stat, hypervisor steal included,
minus this process's own), in cores, and warns above `BUSY_CORES`. `burn_cores` makes such a
neighbour on purpose (the lag benchmark and the lag controller's tests).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_CORES = 0.25  # other processes' average cores above which figures are flagged
_STAT = Path("/proc/stat")


def _machine_busy_s() -> float | None:
    """Seconds of CPU time the whole machine has spent busy since boot (None off Linux)."""
    try:
        fields = _STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """This process's CPU time, every thread (onnxruntime's pools too) and reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class OtherLoad:
    """Average cores used by other processes between construction and `cores()`."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.machine0 = _machine_busy_s()
        self.own0 = _own_cpu_s()

    def cores(self) -> float | None:
        machine = _machine_busy_s()
        wall = time.monotonic() - self.t0
        if machine is None or self.machine0 is None or wall <= 0:
            return None
        others = (machine - self.machine0) - (_own_cpu_s() - self.own0)
        # the two clocks tick at different resolutions (jiffies vs microseconds): never below 0
        return max(0.0, others / wall)


def busy_note(what: str, cores: float | None) -> str | None:
    """A warning for the report when other processes used more than `BUSY_CORES`."""
    if cores is None or cores <= BUSY_CORES:
        return None
    return (f"other processes used {cores:.2f} cores on average during {what}: its figures are "
            "slower than this machine can do; rerun on a quiet machine to compare runs")


@contextmanager
def burn_cores(n: int = 1) -> Iterator[list[int]]:
    """`n` other processes, each spinning one core at 100% until the block ends (a busy
    neighbour: SLAM, the display, another model); yields their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
