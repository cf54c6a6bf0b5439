"""scripts/gpu_check.sh --cpu on the tiny fixture: the GPU check runs in CI so that it never
rots. Every step is recorded; the GPU steps are skipped with the reason (never passed), the CPU
steps pass, and the CUDA decoder of the fp16 bundle is named by its manifest and replays on
the CPU EP with the fp32 stream's decisions. On a GPU: not yet run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"
GPU_STEPS = {"replay_fp16_cuda", "replay_fp16_tensorrt_ep", "build_engine", "replay_engine",
             "bench_cuda_ep", "bench_tensorrt_ep", "bench_engine"}


def test_gpu_check_cpu_mode_writes_one_json(tmp_path: Path) -> None:
    proc = subprocess.run([str(SCRIPT), "--cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in r["steps"]}
    assert r["mode"] == "cpu" and r["ok"] and r["counts"]["failed"] == 0
    assert set(steps) >= GPU_STEPS | {"fixture", "export_fp32", "export_fp16", "doctor",
                                      "replay_fp32_cpu", "replay_cuda_graph_on_cpu_ep",
                                      "bench_cpu_fp32", "bench_cuda_graph_on_cpu_ep"}
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped" and steps[name]["reason"], name
    for name in set(steps) - GPU_STEPS:
        assert steps[name]["status"] == "passed", steps[name]
    assert all(isinstance(s["seconds"], float | int) for s in r["steps"])
    assert steps["export_fp16"]["ep_decoders"] == {"cuda": "decoder_cuda", "tensorrt": "decoder"}
    cuda_on_cpu = steps["replay_cuda_graph_on_cpu_ep"]
    assert cuda_on_cpu["decoder"] == "decoder_cuda" and cuda_on_cpu["decision_agreement"] >= 0.95
    assert steps["bench_cuda_graph_on_cpu_ep"]["matches_greedy_generate"]
    assert r["environment"]["onnxruntime"] and "cpu" in r["environment"]["providers"]
    assert not (tmp_path / "work").exists()  # scratch removed without --keep
