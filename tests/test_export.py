"""Checkpoint -> bundle: graphs, manifest, verification figures, typed failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from proassist_edge.cli import main
from proassist_edge.errors import BundleError, CheckpointError, ExportError, ToleranceError
from proassist_edge.export.bundle import ExportOptions, export_bundle
from proassist_edge.export.verify import Tolerance
from proassist_edge.manifest import load_manifest
from proassist_edge.runtime.bundle import open_bundle

COVERING = [(1, "lm", 1), (5, "head-linear", 2), (10, "head-mlp", 1)]


@pytest.mark.parametrize("tpf,w2t,rounds", COVERING)
def test_fixture_exports_and_verifies_both_decoders(
    tiny_bundle, tpf: int, w2t: str, rounds: int
) -> None:
    bundle, _, _ = tiny_bundle(tpf, w2t, rounds)
    report = json.loads((bundle / "verify.json").read_text())
    for key in (
        "max_abs_logit_diff",
        "max_abs_p_not_talk_diff",
        "decision_agreement",
        "token_match_rate",
        "frames",
    ):
        assert key in report
    assert set(report["decoders"]) == {"decoder", "decoder_gqa"}
    for figures in report["decoders"].values():
        assert figures["decision_agreement"] == 1.0
        assert figures["token_match_rate"] == 1.0
        assert figures["max_abs_logit_diff"] < 1e-3
    # the quick check: a small context whose first reset comes early, the stream ends 8 frames on
    assert report["mode"] == "quick" and report["resets_reference"] >= 1
    assert report["max_seq_len"] == 512 and report["max_reply_tokens"] == 6
    assert 8 < report["frames"] <= 150
    n = report["frames"]
    assert 0 < report["talk_frames_reference"] < n, "the stream must exercise talk and silence"
    m = load_manifest(bundle)  # every sha256 checks
    assert m.model.tokens_per_frame == tpf
    assert m.model.w2t_mode == ("lm" if w2t == "lm" else "head")
    assert ("head" in m.graphs) == (w2t != "lm")
    assert m.verify["decision_agreement"] == 1.0
    assert any("default decoder" in n for n in m.notes)
    b = open_bundle(bundle)
    frames = np.zeros((2, 120, 160, 3), np.uint8)
    assert b.encode_frames(frames).shape == (2, tpf, m.model.hidden_size)
    ops = [n.name for n in onnx.load(str(bundle / m.graphs["decoder_gqa"].file)).graph.node]
    assert sum("/gate_up_proj/MatMul" in n for n in ops) == m.model.num_layers  # fused, verified
    assert not any("/gate_proj/" in n or "/up_proj/" in n for n in ops)
    for path in (bundle, *bundle.iterdir()):  # readable by the user the runtime runs as
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_full_verification_runs_the_bundles_own_context(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = tiny_ckpt(5, "lm", 1)
    with pytest.raises(ExportError, match="verify mode"):
        export_bundle(ckpt, tmp_path / "bad", options=ExportOptions(verify="thorough"))
    assert not (tmp_path / "bad").exists()
    opts = ExportOptions(verify="full", verify_frames=12, max_reply_tokens=3, variants=("portable",))
    summary = export_bundle(ckpt, tmp_path / "full", options=opts)
    report = json.loads((tmp_path / "full" / "verify.json").read_text())
    assert report["mode"] == "full" and report["frames"] == 12 and report["resets_reference"] == 0
    assert report["max_seq_len"] == load_manifest(tmp_path / "full").model.max_seq_len
    assert report["max_reply_tokens"] == 3
    assert summary["stages"]["verifying against PyTorch (full)"]["seconds"] > 0
    assert summary["peak_rss_bytes"] > 0


def test_embedding_table_is_memory_mapped(tiny_bundle) -> None:
    b = open_bundle(tiny_bundle(1, "lm", 1)[0])
    assert isinstance(b.embeddings, np.memmap)


def test_existing_target_is_refused(tiny_bundle, tiny_ckpt) -> None:
    bundle, ckpt, _ = tiny_bundle(1, "lm", 1)
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(ckpt, bundle)


def test_failed_verification_leaves_nothing_behind(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = tiny_ckpt(1, "lm", 1)
    opts = ExportOptions(
        verify_frames=4,
        max_reply_tokens=2,
        variants=("portable",),
        tolerance=Tolerance(logits=-1.0),
    )
    with pytest.raises(ToleranceError, match="verification failed"):
        export_bundle(ckpt, tmp_path / "out", options=opts)
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_bad_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "b")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        export_bundle(tmp_path, tmp_path / "b2")


def test_corrupt_bundle_file_is_detected(tiny_bundle, tmp_path: Path) -> None:
    import shutil

    src = tiny_bundle(1, "lm", 1)[0]
    copy = tmp_path / "b"
    shutil.copytree(src, copy)
    data = bytearray((copy / "vision.onnx").read_bytes())
    (copy / "vision.onnx").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version"):
        open_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(copy)
