"""A decoder variant that cannot be built, run or verified is left out with the reason in the
manifest; the portable decoder carries the export, and a portable failure still fails it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from proassist_edge.cli import main
from proassist_edge.errors import ExportError, ToleranceError
from proassist_edge.export import bundle as export
from proassist_edge.export import decoders, parts
from proassist_edge.export.bundle import ExportOptions, export_bundle
from proassist_edge.manifest import load_manifest
from proassist_edge.runtime.bundle import open_bundle


@pytest.fixture(scope="module")
def head_dim_8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle, checkpoint) of a tiny model with head_dim 8 (hidden 64 over 8 heads)."""
    from proassist_edge.export.fixture import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("hd8")
    ckpt = write_tiny_checkpoint(root / "ckpt", tokens_per_frame=5, head_dim=8)
    out = root / "bundle"
    export_bundle(ckpt, out, options=ExportOptions(verify_frames=20, max_reply_tokens=4))
    return out, ckpt


def test_head_dim_8_exports_and_runs_on_the_portable_decoder(head_dim_8) -> None:
    from proassist_edge.export.verify import synthetic_stream
    from proassist_edge.runtime.core import StreamCore
    from proassist_edge.runtime.prompt import StreamSettings

    bundle, _ = head_dim_8
    m = load_manifest(bundle)  # every listed sha256 checks: nothing of decoder_gqa is listed
    assert m.model.head_dim == 8
    assert set(m.graphs) == {"vision", "decoder"} and m.default_decoder == "decoder"
    assert not (bundle / "decoder_gqa.onnx").exists() and not (bundle / "model.onnx.data").exists()
    (why,) = [n for n in m.notes if n.startswith("decoder_gqa left out:")]
    assert "GroupQueryAttention" in why and "head_dim 8" in why and "'decoder'" in why
    assert "default decoder decoder: the only one left" in m.notes[-1]
    report = json.loads((bundle / "verify.json").read_text())
    assert set(report["decoders"]) == {"decoder"} and report["frames"] == 20
    assert report["decision_agreement"] == 1.0 and report["token_match_rate"] == 1.0

    b = open_bundle(bundle)
    assert b.decoder_name == "decoder"
    core = StreamCore(b, StreamSettings(max_reply_tokens=4, threshold=m.model.default_threshold))
    results = list(core.replay(synthetic_stream(12)))
    assert len(results) == 12 and all(math.isfinite(r.p_not_talk) for r in results)


def test_run_and_doctor_say_which_decoder_runs_and_why(head_dim_8, capsys) -> None:
    from proassist_edge.device.doctor import doctor_report
    from proassist_edge.runtime.bundle import decoder_line

    bundle, _ = head_dim_8
    line = decoder_line(open_bundle(bundle))
    assert line.startswith("decoder: decoder (portable, fp32)") and "; default decoder decoder" in line
    assert "decoder_gqa left out:" in line
    assert "chosen with --decoder" in decoder_line(open_bundle(bundle, "decoder"), "decoder")

    checks = {c.name: c for c in doctor_report(bundle)}
    assert checks["bundle"].ok and checks["bundle decoder"].ok
    assert "decoder_gqa left out:" in checks["bundle decoder"].detail

    rc = main(["run", str(bundle), "--source", "synthetic", "--tts", "none", "--no-realtime",
               "--max-seconds", "1", "--max-reply-tokens", "2", "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "decoder: decoder (portable, fp32)" in err and "decoder_gqa left out:" in err


def test_head_dim_8_without_a_portable_decoder_fails_typed(head_dim_8, tmp_path: Path) -> None:
    _, ckpt = head_dim_8
    opts = ExportOptions(verify=False, variants=("optimized",))
    with pytest.raises(ExportError, match="nothing else can carry the bundle"):
        export_bundle(ckpt, tmp_path / "out", options=opts)
    assert list(tmp_path.iterdir()) == []


def _refuse_builder(*args: Any, **kwargs: Any) -> Any:
    raise ExportError("onnxruntime-genai's builder failed (exit 1):\nValueError: unsupported")


def test_optional_decoder_that_does_not_build_or_verify_is_left_out(
    tiny_ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tiny_ckpt(1, "lm", 1)
    real_compare = export.compare_bundle
    calls: list[list[str]] = []

    def gqa_mismatch(ref: Any, root: Path, decoders: list[str], *a: Any, **kw: Any) -> Any:
        calls.append(list(decoders))
        if "decoder_gqa" in decoders:
            raise ToleranceError("verification failed: max abs logit diff 3.0e-01 > 0.001 "
                                 "(figures: {'decoders': {}})")
        return real_compare(ref, root, decoders, *a, **kw)

    monkeypatch.setattr(export, "compare_bundle", gqa_mismatch)
    opts = ExportOptions(verify_frames=6, max_reply_tokens=2)
    summary = export_bundle(ckpt, tmp_path / "mismatch", options=opts)
    assert calls == [["decoder", "decoder_gqa"], ["decoder"]]
    m = load_manifest(tmp_path / "mismatch")
    assert set(m.graphs) == {"vision", "decoder"} and summary["default_decoder"] == "decoder"
    (why,) = [n for n in m.notes if "left out" in n and n.startswith("decoder_gqa")]
    assert "does not match the PyTorch model" in why and "figures" not in why
    assert set(json.loads((tmp_path / "mismatch" / "verify.json").read_text())["decoders"]) == {
        "decoder"
    }

    monkeypatch.setattr(parts, "build_optimized_decoder", _refuse_builder)
    export_bundle(ckpt, tmp_path / "nobuild", options=ExportOptions(verify=False))
    m = load_manifest(tmp_path / "nobuild")
    assert set(m.graphs) == {"vision", "decoder"} and m.default_decoder == "decoder"
    assert any(n.startswith("decoder_gqa left out: onnxruntime-genai's builder") for n in m.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mismatch", "nobuild"]


def test_portable_decoder_that_cannot_run_fails_the_export(
    tiny_ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proassist_edge.runtime.backend import PortableDecoder

    real_run = decoders.run_once

    def broken_portable(dec: Any, *a: Any) -> None:
        if isinstance(dec, PortableDecoder):
            raise RuntimeError("Error in execution: broken kernel")
        real_run(dec, *a)

    monkeypatch.setattr(decoders, "run_once", broken_portable)
    monkeypatch.setattr(parts, "build_optimized_decoder", _refuse_builder)
    with pytest.raises(ExportError, match="decoder \\(portable\\) does not run.*broken kernel"):
        export_bundle(tiny_ckpt(1, "lm", 1), tmp_path / "out", options=ExportOptions(verify=False))
    assert list(tmp_path.iterdir()) == []


def test_fixture_head_dim_sets_the_heads() -> None:
    from proassist_edge.export.fixture import tiny_llama_config

    c = tiny_llama_config(hidden=64, head_dim=8)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 4, 8)
    c = tiny_llama_config()
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    with pytest.raises(ValueError):
        tiny_llama_config(hidden=64, head_dim=48)
