"""What a TensorRT engine depends on, checked before the runtime uses one: the device, its
compute capability and the TensorRT version (`device/tensorrt.py` builds engines and records the
same facts). `tensorrt` is imported lazily, with a clear error where it is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proassist_edge.errors import BundleError, MissingDependencyError

INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
# Jetson GPUs by board family: nvidia-smi is absent or partial on L4T.
_JETSON_COMPUTE = {"orin": "8.7", "xavier": "7.2", "tx2": "6.2", "nano": "5.3", "tx1": "5.3"}


class EngineMismatchError(BundleError):
    """A TensorRT engine was built for another GPU or TensorRT version than this one."""


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependencyError(
            "tensorrt",
            "Building and running TensorRT engines",
            "TensorRT comes with JetPack on Jetson (`sudo apt install nvidia-jetpack` gives "
            "python3-libnvinfer); on x86 install NVIDIA's TensorRT for your CUDA version.",
        ) from e
    return tensorrt


def past_key_value_names(num_layers: int) -> list[str]:
    """`past_key_values.{i}.key|value` for every layer, in graph order."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _gpu_from_nvidia_smi() -> tuple[str | None, str | None]:
    if shutil.which("nvidia-smi") is None:
        return None, None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    first = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) == 2 and re.fullmatch(r"\d+\.\d+", parts[1]):
        return parts[0], parts[1]
    return (parts[0] or None), None


def _tensorrt_version() -> str | None:
    try:
        return str(import_tensorrt().__version__)
    except MissingDependencyError:
        return None


def _jetson_model(root: Path = Path("/")) -> str | None:
    """The board name on a Jetson (nvidia-smi is absent or partial on L4T)."""
    try:
        model = (root / "proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
    except OSError:
        return None
    return model if "jetson" in model.lower() else None


def engine_identity(jetson_model: str | None = None) -> dict[str, Any]:
    """What an engine depends on: the device, its compute capability, the TensorRT version."""
    device, compute = _gpu_from_nvidia_smi()
    model = jetson_model if jetson_model is not None else _jetson_model()
    if model:
        device = device or model
        family = next((k for k in _JETSON_COMPUTE if k in model.lower()), None)
        compute = compute or (_JETSON_COMPUTE[family] if family else None)
    return {"device": device, "compute_capability": compute, "tensorrt": _tensorrt_version()}


def check_engine_compat(meta: Mapping[str, Any], current: Mapping[str, Any] | None = None) -> None:
    """Raise EngineMismatchError when `meta` (saved with an engine) does not match
    `current` (default: this machine) in device, compute capability or TensorRT
    version. Facts unknown on either side are not compared."""
    now = engine_identity() if current is None else current
    differences = [
        f"{key} {meta.get(key)!r} (engine) vs {now.get(key)!r} (here)"
        for key in ("device", "compute_capability", "tensorrt")
        if meta.get(key) and now.get(key) and str(meta.get(key)) != str(now.get(key))
    ]
    if differences:
        raise EngineMismatchError(
            "TensorRT engine was built elsewhere: "
            + "; ".join(differences)
            + ". Rebuild it on this device (engines are tied to GPU and TensorRT version)."
        )
