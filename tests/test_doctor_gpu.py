"""doctor's GPU stack: the providers --ep can take, the CUDA / cuDNN / TensorRT versions from a
fake filesystem, and cuda-python."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from proassist_edge.device.doctor import _gpu_stack, cuda_versions, doctor_report


def fake_root(root: Path) -> Path:
    (root / "usr/local/cuda").mkdir(parents=True)
    (root / "usr/local/cuda/version.json").write_text(json.dumps({"cuda": {"version": "12.6.68"}}))
    inc = root / "usr/include/aarch64-linux-gnu"
    inc.mkdir(parents=True)
    (inc / "cudnn_version.h").write_text(
        "#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 3\n#define CUDNN_PATCHLEVEL 0\n")
    (inc / "NvInferVersion.h").write_text(
        "#define NV_TENSORRT_MAJOR 10\n#define NV_TENSORRT_MINOR 3\n#define NV_TENSORRT_PATCH 0\n")
    return root


def test_versions_from_a_jetpack_like_filesystem(tmp_path: Path) -> None:
    v = cuda_versions(fake_root(tmp_path))
    assert (v["cuda"], v["cudnn"], v["tensorrt"]) == ("12.6.68", "9.3.0", "10.3.0")


def test_gpu_stack_lists_providers_versions_and_cuda_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    checks = {c.name: c for c in _gpu_stack(fake_root(tmp_path))}
    assert "--ep auto picks cuda; offered: cuda, cpu" in checks["execution providers"].detail
    assert checks["CUDA / cuDNN / TensorRT"].ok
    assert checks["CUDA / cuDNN / TensorRT"].detail == "cuda 12.6.68; cudnn 9.3.0; tensorrt 10.3.0"
    cp = checks["cuda-python"]
    assert cp.ok or "proassist-edge[trt]" in cp.fix
    assert {"execution providers", "cuda-python"} <= {c.name for c in doctor_report()}
