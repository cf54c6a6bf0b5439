#!/usr/bin/env bash
# The GPU check of issue #20, in one command: exports the tiny fixture at fp32 and fp16, runs
# doctor, replays an episode on the CPU, the CUDA EP and the TensorRT EP and compares decisions
# and reply tokens with the fp32 CPU stream, builds a TensorRT engine with build-engine and
# checks it is accepted, benches each decoder, and writes one JSON (gpu_check.json) to $OUT,
# or to --out DIR. A step that cannot run (no CUDA EP, no TensorRT) is recorded as skipped with
# the reason, never as passed. Installs nothing, fetches nothing.
#
#   scripts/gpu_check.sh            # on a machine with a GPU and onnxruntime-gpu
#   scripts/gpu_check.sh --cpu      # the same steps on the CPU provider (CI): GPU steps skipped
#
# Options: --out DIR, --checkpoint CKPT (instead of the tiny fixture), --quick (exports
# without verification), --keep (keep the bundles). Exit status 1 when a step failed.
# Status: not yet run on a GPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
exec "$python" "$here/gpu_check.py" "$@"
