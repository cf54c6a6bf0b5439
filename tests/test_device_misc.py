"""Doctor report, Jetson probe, TensorRT profiles and engine compatibility."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from proassist_edge.device.doctor import (
    PRIVACY,
    add_doctor_parser,
    doctor_report,
    format_report,
    run_doctor,
)
from proassist_edge.device.jetson import parse_l4t, parse_power_mode, probe
from proassist_edge.device.tensorrt import (
    ATTENTION_MASK,
    INPUTS_EMBEDS,
    EngineMismatchError,
    build_engine,
    check_engine_compat,
    engine_meta,
    optimization_profiles,
    past_key_value_names,
)
from proassist_edge.errors import BundleError, MissingDependencyError


def test_doctor_reports_onnxruntime_and_privacy() -> None:
    checks = doctor_report()
    by_name = {c.name: c for c in checks}
    assert by_name["onnxruntime"].ok and by_name["onnxruntime"].required
    assert "CPUExecutionProvider" in by_name["onnxruntime"].detail
    assert by_name["privacy"].detail == PRIVACY
    assert {"TensorRT", "OpenCV", "PyAV", "cameras (V4L2)", "picamera2", "audio output",
            "pyttsx3 + espeak-ng", "piper", "jetson-stats", "torch"} <= set(by_name)
    assert all(c.fix for c in checks if not c.ok)  # every failure says what to do
    text = format_report(checks)
    assert "onnxruntime" in text and PRIVACY in text


def test_doctor_cli(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="proassist-edge")
    add_doctor_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--json"])
    assert args.func(args) == 0 and args.func is run_doctor
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "privacy" for r in rows)


def test_probe_off_jetson_reports_cpu_and_memory() -> None:
    facts = probe()
    if facts["jetson"]:
        pytest.skip("running on a Jetson")
    assert facts["cpu_cores"] >= 1 and facts["cpu_model"]
    assert facts["memory_total_mb"] > 0 and facts["l4t"] is None


def test_probe_reads_a_jetson_filesystem(tmp_path: Path) -> None:
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64\n"
    )
    (tmp_path / "proc/meminfo").write_text("MemTotal:       32768000 kB\nMemAvailable: 1024 kB\n")
    facts = probe(tmp_path)
    assert facts["jetson"] is True
    assert facts["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert facts["l4t"] == "36.3.0" and facts["jetpack"] == "6.0"
    assert facts["memory_total_mb"] == 32000


def test_probe_never_raises_on_garbage(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_bytes(b"\xff\xfe garbage")
    facts = probe(tmp_path)
    assert facts["jetson"] is True and facts["l4t"] is None


def test_parsers() -> None:
    assert parse_l4t("# R35 (release), REVISION: 4.1, GCID: 1") == "35.4.1"
    assert parse_power_mode("NV Power Mode: MAXN\n0") == "MAXN (0)"
    assert parse_power_mode("nothing") is None


def test_optimization_profiles_shapes() -> None:
    decode, frame = optimization_profiles(
        tokens_per_frame=10, max_seq_len=4096, num_layers=2, num_kv_heads=3, head_dim=64,
        hidden=576,
    )
    assert (decode.name, frame.name) == ("decode", "frame")
    names = [INPUTS_EMBEDS, *past_key_value_names(2)]
    assert past_key_value_names(2) == [
        "past_key_values.0.key", "past_key_values.0.value",
        "past_key_values.1.key", "past_key_values.1.value",
    ]
    for profile in (decode, frame):
        assert list(profile.shapes) == names
        for low, opt, high in profile.shapes.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
        assert profile.shapes["past_key_values.1.value"] == (
            (1, 3, 0, 64), (1, 3, 2048, 64), (1, 3, 4095, 64)
        )
    assert decode.shapes[INPUTS_EMBEDS] == ((1, 1, 576),) * 3
    assert frame.shapes[INPUTS_EMBEDS] == ((1, 1, 576), (1, 10, 576), (1, 256, 576))
    assert json.dumps(frame.to_dict())
    masked = optimization_profiles(10, 4096, 2, 3, 64, 576, attention_mask=True)[1]
    assert masked.shapes[ATTENTION_MASK] == ((1, 1), (1, 2048 + 10), (1, 4096))  # = past + new


def test_profiles_fit_the_exported_portable_decoder(tiny_bundle) -> None:
    """The names and ranks build-engine gives TensorRT are those of the real portable graph."""
    import onnx

    from proassist_edge.device.tensorrt import _check_profiles
    from proassist_edge.manifest import load_manifest

    bundle, _, _ = tiny_bundle(5, "lm", 1)
    m = load_manifest(bundle).model
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph
    inputs = {i.name: tuple(d.dim_value if d.HasField("dim_value") else -1
                            for d in i.type.tensor_type.shape.dim) for i in graph.input}
    profiles = optimization_profiles(m.tokens_per_frame, m.max_seq_len, m.num_layers, m.num_kv_heads,
                                     m.head_dim, m.hidden_size)
    _check_profiles(inputs, profiles)
    for p in profiles:
        assert {k: len(v[0]) for k, v in p.shapes.items()} == {k: len(v) for k, v in inputs.items()}


def test_optimization_profiles_reject_bad_sizes() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        optimization_profiles(10, 200, 2, 3, 64, 576)
    with pytest.raises(ValueError, match="tokens_per_frame"):
        optimization_profiles(300, 4096, 2, 3, 64, 576)


def test_engine_compat() -> None:
    built = {"device": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}
    check_engine_compat(built, dict(built))
    check_engine_compat(built, {"device": None, "tensorrt": "10.3.0"})  # unknowns not compared
    with pytest.raises(EngineMismatchError) as info:
        check_engine_compat(built, {**built, "tensorrt": "10.7.0", "device": "Thor"})
    message = str(info.value)
    assert "10.3.0" in message and "10.7.0" in message and "Orin" in message and "Thor" in message
    assert isinstance(info.value, BundleError)


def test_engine_meta_here() -> None:
    meta = engine_meta()
    assert set(meta) >= {"device", "compute_capability", "tensorrt"}


def test_build_engine_needs_tensorrt(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    profiles = optimization_profiles(10, 4096, 2, 3, 64, 576)
    with pytest.raises(MissingDependencyError, match="JetPack"):
        build_engine(tmp_path / "decoder.onnx", tmp_path / "decoder.engine", profiles)


def test_engine_profile_choice_and_kv_repack() -> None:
    from proassist_edge.runtime.trt_decoder import choose_profile, repack_kv

    profiles = [p.to_dict() for p in optimization_profiles(5, 1024, 2, 2, 8, 32)]
    as_tuples = [{"shapes": {k: [tuple(s) for s in v] for k, v in p["shapes"].items()}} for p in profiles]
    assert choose_profile(as_tuples, 1, 0) == 0  # a decoded token
    assert choose_profile(as_tuples, 5, 700) == 1  # a frame
    assert choose_profile(as_tuples, 40, 10) == 1  # a frame with a user message
    with pytest.raises(BundleError, match="build-engine"):
        choose_profile(as_tuples, 300, 10)
    kv = np.arange(2 * 10 * 3, dtype=np.float32).reshape(1, 2, 10, 3)
    packed = repack_kv(kv, 2, 6, 9)
    assert packed.shape == (1, 2, 5, 3) and packed.flags.c_contiguous
    np.testing.assert_array_equal(packed[:, :, 2:], kv[:, :, 6:9])


def test_engine_built_elsewhere_falls_back_to_onnxruntime(tiny_bundle, tmp_path: Path) -> None:
    """A manifest that lists an engine this machine cannot run (no TensorRT here, or another
    device): the bundle opens on onnxruntime, says why, and streams the same as without it."""
    import shutil

    from proassist_edge.manifest import MANIFEST
    from proassist_edge.runtime.bundle import open_bundle
    from proassist_edge.runtime.core import StreamCore
    from proassist_edge.runtime.prompt import StreamSettings

    src, _, thr = tiny_bundle(1, "lm", 1)
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    (bundle / "decoder.engine").write_bytes(b"not an engine for this machine")
    data = json.loads((bundle / MANIFEST).read_text())
    profiles = [p.to_dict() for p in optimization_profiles(1, 4096, 2, 2, 32, 128)]
    data["engines"] = {"decoder": {"file": "decoder.engine", "device": "Orin", "compute_capability": "8.7",
                                   "tensorrt": "10.3.0", "profiles": profiles}}
    (bundle / MANIFEST).write_text(json.dumps(data))
    b = open_bundle(bundle)
    assert b.engine is None and len(b.notes) == 1
    assert "TensorRT engine not used, running on onnxruntime" in b.notes[0]
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    settings = StreamSettings(threshold=thr, max_reply_tokens=4)
    got = [(r.talk, r.text) for r in StreamCore(b, settings).replay(frames)]
    want = [(r.talk, r.text) for r in StreamCore(open_bundle(src), settings).replay(frames)]
    assert got == want
