"""Platform probe: Jetson board, L4T / JetPack, power mode, memory and CPU. Never raises."""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# L4T release -> JetPack, for boards without the nvidia-jetpack package metadata.
# Only releases we have seen; anything else is reported as L4T alone.
_JETPACK_BY_L4T = {
    "32.7": "4.6.x",
    "35.1": "5.0.2",
    "35.2": "5.1",
    "35.3": "5.1.1",
    "35.4": "5.1.2",
    "35.5": "5.1.3",
    "35.6": "5.1.4",
    "36.2": "6.0 DP",
    "36.3": "6.0",
    "36.4": "6.1 / 6.2",
}


def _read(root: Path, path: str) -> str | None:
    try:
        # Device-tree strings end with a NUL byte.
        return (root / path.lstrip("/")).read_text(errors="replace").strip().strip("\x00")
    except OSError:
        return None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def parse_l4t(text: str) -> str | None:
    """'# R36 (release), REVISION: 3.0, ...' -> '36.3.0'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_meminfo(text: str) -> dict[str, int]:
    """MemTotal / MemAvailable / SwapTotal of /proc/meminfo in MiB."""
    out: dict[str, int] = {}
    for key, name in (
        ("MemTotal", "memory_total_mb"),
        ("MemAvailable", "memory_available_mb"),
        ("SwapTotal", "swap_total_mb"),
    ):
        m = re.search(rf"^{key}:\s+(\d+)\s*kB", text, re.MULTILINE)
        if m:
            out[name] = int(m.group(1)) // 1024
    return out


def parse_power_mode(text: str) -> str | None:
    """'NV Power Mode: MAXN\\n0' -> 'MAXN (0)'."""
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if not m:
        return None
    rest = text[m.end() :].split()
    return f"{m.group(1)} ({rest[0]})" if rest and rest[0].isdigit() else m.group(1)


def _cpu_model(cpuinfo: str | None) -> str:
    if cpuinfo:
        for key in ("model name", "Hardware", "Model"):
            m = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
            if m:
                return m.group(1).strip()
    return platform.processor() or platform.machine()


def _jetpack_package() -> str | None:
    version = _run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"])
    return version.split("-")[0].split("+")[0] if version else None


def jetpack_from_l4t(l4t: str | None) -> str | None:
    """JetPack release of an L4T version ('36.3.0' -> '6.0'), None if unknown."""
    return _JETPACK_BY_L4T.get(".".join(l4t.split(".")[:2])) if l4t else None


def _jtop_facts() -> dict[str, Any] | None:
    try:
        from jtop import jtop
    except ImportError:
        return None
    try:
        with jtop() as jetson:
            if not jetson.ok():
                return None
            board = jetson.board
            return {
                "hardware": dict(board.get("hardware", {})),
                "libraries": dict(board.get("libraries", {})),
                "nvpmodel": str(jetson.nvpmodel) if jetson.nvpmodel else None,
            }
    except Exception as e:  # noqa: BLE001 - jtop raises its own types when its service is down
        log.debug("jtop unavailable: %s", e)
        return {"error": str(e)}


def probe(root: str | Path = "/") -> dict[str, Any]:
    """Facts about this machine; `jetson` is True on NVIDIA Jetson boards.

    Keys: jetson, model, l4t, jetpack, power_mode, cpu_model, cpu_cores, machine,
    memory_total_mb, memory_available_mb, swap_total_mb, jtop. `root` lets tests
    point at a fake filesystem (commands run only when root is "/").
    """
    root = Path(root)
    facts: dict[str, Any] = {
        "jetson": False,
        "machine": platform.machine(),
        "cpu_model": _cpu_model(_read(root, "/proc/cpuinfo")),
        "cpu_cores": os.cpu_count(),
        "model": None,
        "l4t": None,
        "jetpack": None,
        "power_mode": None,
        "jtop": None,
    }
    try:
        facts.update(parse_meminfo(_read(root, "/proc/meminfo") or ""))
        model = _read(root, "/proc/device-tree/model")
        release = _read(root, "/etc/nv_tegra_release")
        facts["model"] = model
        facts["l4t"] = parse_l4t(release) if release else None
        is_jetson = release is not None or bool(model and "jetson" in model.lower())
        facts["jetson"] = is_jetson
        if is_jetson and root == Path("/"):
            facts["jetpack"] = _jetpack_package()
            query = _run(["nvpmodel", "-q"])
            facts["power_mode"] = parse_power_mode(query) if query else None
            facts["jtop"] = _jtop_facts()
        if is_jetson and facts["jetpack"] is None:
            facts["jetpack"] = jetpack_from_l4t(facts["l4t"])
    except Exception as e:  # noqa: BLE001 - a probe reports what it could, it never fails
        log.debug("probe incomplete: %s", e)
        facts["error"] = f"{type(e).__name__}: {e}"
    return facts
