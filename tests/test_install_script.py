"""scripts/install.sh in --dry-run: what each platform (Jetson, x86 with a GPU, CPU) would install.

Nothing here installs anything: the script prints each command with a '+ ' prefix and runs none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install.sh"
L4T_36 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n"
# The interpreter outside any venv: the Jetson branch makes its own venv unless PYTHON is a venv's
# (tested below), and the tests may themselves run in a venv (the README's set-up in one does).
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
CUDA_JSON = '{\n   "cuda" : {\n      "name" : "CUDA SDK",\n      "version" : "%s"\n   }\n}\n'


def jetson_root(tmp_path: Path, l4t: str = L4T_36, cuda: str | None = "12.6.68") -> Path:
    """A fake filesystem with a Jetson's /etc/nv_tegra_release and CUDA version file."""
    (tmp_path / "etc").mkdir(parents=True)
    (tmp_path / "etc/nv_tegra_release").write_text(l4t)
    if cuda is not None:
        (tmp_path / "usr/local/cuda").mkdir(parents=True)
        (tmp_path / "usr/local/cuda/version.json").write_text(CUDA_JSON % cuda)
    return tmp_path


def dry_run(platform: str | None, sysroot: Path | None = None, path: str | None = None,
            **env: str) -> tuple[list[str], str]:
    """(the commands it would run, all of stdout) of `install.sh --dry-run`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PROASSIST_EDGE_")}
    full["PYTHON"] = sys.executable
    if platform is not None:
        full["PROASSIST_EDGE_PLATFORM"] = platform
    if sysroot is not None:
        full["PROASSIST_EDGE_SYSROOT"] = str(sysroot)
    if path is not None:
        full["PATH"] = path
    full.update(env)
    bash = shutil.which("bash") or "/bin/bash"
    proc = subprocess.run([bash, str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          env=full, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    return cmds, proc.stdout


def pip_installs(cmds: list[str]) -> list[str]:
    return [c.split(" -m pip install ", 1)[1] for c in cmds if " -m pip install " in c]


def test_jetson_branch_keeps_nvidias_onnxruntime(tmp_path: Path) -> None:
    cmds, out = dry_run("jetson", jetson_root(tmp_path), PYTHON=BASE_PYTHON)
    index = "https://pypi.jetson-ai-lab.io/jp6/cu126"
    assert f"L4T R36, JetPack 6, CUDA 12.6; onnxruntime-gpu from {index}" in out
    assert "dry run: nothing is changed" in out
    # A venv that sees JetPack's TensorRT (the system's dist-packages), then everything goes there.
    venv = [c for c in cmds if " -m venv " in c]
    assert venv == [f"{BASE_PYTHON} -m venv --system-site-packages .venv"]
    after = cmds[cmds.index(venv[0]) + 1:]
    assert all(c.startswith((".venv/bin/python ", "(if pip")) for c in after if "apt-get" not in c)
    pips = pip_installs(cmds)
    assert f"-q --extra-index-url {index} onnxruntime-gpu" in pips
    assert "-q cuda-python>=12,<13" in pips
    # piper without its onnxruntime pin, and the project with no cpu/gpu extra
    assert "-q --no-deps piper-tts>=1.2" in pips
    project = [p for p in pips if " -e ." in p]
    assert len(project) == 1 and project[0].startswith("-q -e .[tts,camera,jetson")
    for p in pips:
        words = p.replace("[", " ").replace("]", " ").replace(",", " ").split()
        assert "onnxruntime" not in words and "cpu" not in words and "piper" not in words, p
        assert "torch==2.13.0" not in words and "tensorrt" not in words, p  # JetPack's TensorRT
    assert any("pip uninstall -y onnxruntime" in c for c in cmds)  # the guard, should pip pull it
    assert any("gstreamer1.0-plugins-good" in c and "nvidia-l4t-gstreamer" in c for c in cmds)
    assert cmds[-1] == ".venv/bin/python -m proassist_edge.cli doctor"
    assert "source .venv/bin/activate" in out


def test_jetson_index_follows_l4t_and_cuda_and_can_be_overridden(tmp_path: Path) -> None:
    _, out = dry_run("jetson", jetson_root(tmp_path / "a", cuda="12.2.140"))
    assert "onnxruntime-gpu from https://pypi.jetson-ai-lab.io/jp6/cu122" in out
    l4t_35 = "# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref, EABI: aarch64, DATE: x\n"
    cmds, out = dry_run("jetson", jetson_root(tmp_path / "b", l4t_35, cuda=None))
    assert "JetPack 5, CUDA 11.4; onnxruntime-gpu from https://pypi.jetson-ai-lab.io/jp5/cu114" in out
    assert "-q cuda-python>=11,<12" in pip_installs(cmds)
    mirror = "https://wheels.example.org/jp6/cu126"
    cmds, out = dry_run("jetson", jetson_root(tmp_path / "c"), PROASSIST_EDGE_JETSON_INDEX=mirror)
    assert f"-q --extra-index-url {mirror} onnxruntime-gpu" in pip_installs(cmds)


def test_jetson_branch_reuses_a_venv_it_is_given(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    cmds, out = dry_run("jetson", jetson_root(tmp_path / "root"), PYTHON=python)
    assert not any(" -m venv " in c for c in cmds)
    assert f"using the venv of {python}" in out
    assert any("jetpack-tensorrt.pth" in c for c in cmds)  # a .pth to JetPack's TensorRT


def test_x86_gpu_branch_installs_onnxruntime_gpu_and_tensorrt_from_pypi(tmp_path: Path) -> None:
    cmds, _ = dry_run("gpu")
    pips = pip_installs(cmds)
    project = [p for p in pips if " -e ." in p]
    assert len(project) == 1 and project[0].startswith("-q -e .[gpu,trt,export,")
    assert "cpu" not in project[0] and "piper" not in project[0]
    assert "-q --no-deps piper-tts>=1.2" in pips
    assert not any("jetson-ai-lab" in c or " -m venv " in c for c in cmds)
    assert any("pip uninstall -y onnxruntime" in c for c in cmds)


def test_cpu_branch_is_the_ci_install(tmp_path: Path) -> None:
    cmds, out = dry_run("cpu")
    pips = pip_installs(cmds)
    assert pips[:2] == ["-q --upgrade pip", "-q torch==2.13.0"]  # torch before anything pulls one
    project = [p for p in pips if " -e ." in p]
    assert len(project) == 1 and project[0].startswith("-q -e .[cpu,export,tts,piper,camera,eval,dev")
    assert not any("onnxruntime-gpu" in c or "uninstall" in c for c in cmds)
    assert cmds[-1] == f"{sys.executable} -m proassist_edge.cli doctor"


def test_detection_without_nvidia_is_cpu() -> None:
    if shutil.which("nvidia-smi") or Path("/etc/nv_tegra_release").exists():
        pytest.skip("this machine has an NVIDIA GPU or is a Jetson")
    _, out = dry_run(None)
    assert "platform cpu" in out


def test_detection_finds_a_jetson_only_on_aarch64(tmp_path: Path) -> None:
    _, out = dry_run(None, jetson_root(tmp_path))
    machine = os.uname().machine
    assert ("platform jetson" in out) == (machine == "aarch64")


def test_without_apt_or_root_it_says_so_and_installs_the_rest(tmp_path: Path) -> None:
    """A PATH with the script's tools but no apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "head", "uname", "id", "dirname", "env", "pkg-config", "cc"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    cmds, out = dry_run("cpu", path=str(bin_dir))
    assert "no apt-get here: install these yourself" in out and "gstreamer1.0-tools" in out
    assert not any("apt-get" in c for c in cmds)
    assert any(" -e .[cpu," in c for c in cmds)


def test_unknown_platform_or_option_fails() -> None:
    env = {**os.environ, "PROASSIST_EDGE_PLATFORM": "tpu"}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert proc.returncode == 2 and "use cpu, gpu or jetson" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "unknown option" in proc.stderr
