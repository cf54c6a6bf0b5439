"""quant/: int8, int4 and fp16 children of the tiny fixture bundle, their reports, calibration on
multimodal streams, and the refusals (corrupt parent, other schema, existing output)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from proassist_edge.errors import BundleError, DataError
from proassist_edge.manifest import load_manifest
from proassist_edge.quant.calibration import episode_streams, frame_streams, plain_streams, record_feeds
from proassist_edge.quant.graphs import QuantizeError
from proassist_edge.quant.quantize import quantize_bundle
from proassist_edge.quant.report import Targets, compare_decoders, paper_metrics, render, with_component
from proassist_edge.quant.sensitivity import layer_sensitivity
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore, settings_from_manifest
from proassist_edge.runtime.messages import TextMessage

TPF = 5
# small and fast: per-tensor int8 scales (per-channel quantizes the 128k-row lm_head in a Python
# loop), one short stream, two reply tokens, one onnxruntime thread on shared cores
FAST: dict[str, Any] = dict(streams=1, frames=6, reply_tokens=2, per_channel=False,
                            max_calibration_samples=16, threads=1, progress=False)


@pytest.fixture(scope="module")
def parent(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny LM-mode bundle (the tests must not touch the shared one)."""
    src, _, _ = tiny_bundle(TPF, "lm", 1)
    return Path(shutil.copytree(src, tmp_path_factory.mktemp("quant") / "bundle"))


@pytest.fixture(scope="module")
def children(parent: Path) -> dict[str, Path]:
    out = {}
    for precision in ("int8", "fp16"):
        out[precision] = parent.parent / f"child-{precision}"
        quantize_bundle(parent, out[precision], precision, sensitivity_on_miss=False, **FAST)
    # int4 through the command line, as a user would
    from proassist_edge.cli import main

    out["int4"] = parent.parent / "child-int4"
    argv = ["quantize", str(parent), "-o", str(out["int4"]), "--precision", "int4", "--block-size", "64",
            "--accuracy-level", "4", "--streams", "1", "--frames", "6", "--reply-tokens", "2",
            "--per-tensor", "--no-sensitivity", "--threads", "1"]
    assert main(argv) == 0
    return out


def hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def report_of(child: Path) -> dict[str, Any]:
    return json.loads((child / "quant_report.json").read_text())


@pytest.mark.parametrize("precision", ["int8", "int4", "fp16"])
def test_child_loads_and_streams(children: dict[str, Path], precision: str) -> None:
    child = children[precision]
    manifest = load_manifest(child, verify=True)
    frames = frame_streams(None, 1, 3, offset=7)[0]
    for name, g in manifest.graphs.items():
        if not g.variant:
            continue
        b = open_bundle(child, decoder=name)
        core = StreamCore(b, settings_from_manifest(b, max_reply_tokens=2))
        got = list(core.replay(frames, [TextMessage("user", "What next?", t=0.5)]))
        assert len(got) == 3 and all(0.0 <= r.p_not_talk <= 1.0 for r in got)


@pytest.mark.parametrize("precision", ["int8", "int4", "fp16"])
def test_report_has_sane_figures(children: dict[str, Path], parent: Path, precision: str) -> None:
    r = report_of(children[precision])
    for key in ("precision", "decision_agreement", "p_not_talk_mae", "logit_cosine", "token_match_rate",
                "size_bytes", "parent_size_bytes", "graphs", "decoders", "vision", "embeddings", "eval"):
        assert key in r, key
    assert r["precision"] == precision
    assert 0.9 <= r["decision_agreement"] <= 1.0
    assert 0.0 <= r["p_not_talk_mae"] < 0.05
    assert 0.95 < r["logit_cosine"] <= 1.0 + 1e-9
    assert 0.0 <= r["token_match_rate"] <= 1.0
    assert r["size_bytes"] < r["parent_size_bytes"]
    assert set(r["decoders"]) == {n for n, g in r["graphs"].items() if g["variant"]}
    for d in r["decoders"].values():
        assert d["frames"] == FAST["frames"] and d["variant"] in ("portable", "optimized")
    assert r["eval"] == "not requested"
    assert "decoder" in render(r) and "bundle" in render(r)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_integer_decoders_are_smaller(children: dict[str, Path], precision: str) -> None:
    r = report_of(children[precision])
    for name in ("decoder", "decoder_gqa"):
        g = r["graphs"][name]
        assert g["precision"] == precision
        assert g["size_bytes"] < g["parent_size_bytes"] / 2, (name, g)


def test_child_manifests(children: dict[str, Path], parent: Path) -> None:
    pm = load_manifest(parent)
    m8 = load_manifest(children["int8"])
    assert m8.graphs["decoder"].precision == "int8" and m8.graphs["decoder_gqa"].precision == "int8"
    qdq = m8.graphs["decoder_qdq"]
    assert qdq.precision == "int8-qdq" and qdq.variant == "portable"
    ops = {n.op_type for n in onnx.load(str(children["int8"] / qdq.file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert m8.graphs["vision"].precision == "int8-qdq"
    assert m8.default_decoder == pm.default_decoder
    assert m8.source["parent"] == str(parent.resolve())
    assert m8.embeddings["dtype"] == "int8" and m8.embeddings["scale"] in m8.files
    assert any("calibrated on" in n and "decoder feeds" in n for n in m8.notes)
    m4 = load_manifest(children["int4"])
    assert m4.graphs["decoder"].precision == "int4"
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(children["int4"] / "decoder.onnx")).graph.node}
    m16 = load_manifest(children["fp16"])
    assert m16.embeddings["dtype"] == "float16" and "scale" not in m16.embeddings
    assert {g.precision for n, g in m16.graphs.items() if n != "head"} == {"fp16"}
    # the runtime widens int8 rows with their scales: close to the parent's table
    ids = [128000, 42, 128009]
    a, b = open_bundle(parent).embed(ids), open_bundle(children["int8"]).embed(ids)
    assert np.abs(a - b).max() <= np.abs(a).max() / 127 + 1e-7


def test_fp16_keeps_rope_in_fp32(children: dict[str, Path]) -> None:
    """No fp16 rounding anywhere upstream of cos/sin (proassist-reference.md, Numerics)."""
    model = onnx.load(str(children["fp16"] / "decoder.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    stack = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    assert stack
    seen = set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type == "Cast":
            assert next(a.i for a in n.attribute if a.name == "to") != onnx.TensorProto.FLOAT16, n.name
        stack += [producer[i] for i in n.input if i in producer]
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert halves  # the weights did go to fp16


def test_calibration_feeds_are_multimodal(parent: Path) -> None:
    b = open_bundle(parent, decoder="decoder", verify=False)
    frames = frame_streams(None, 1, 4, offset=100)[0]
    rec = record_feeds(b, [frames], reply_tokens=2, max_frame=8, max_token=4)
    samples = rec.samples()
    inputs = {i for i in load_manifest(parent).graphs["decoder"].inputs}
    assert all(set(s.feeds) == inputs for s in samples)
    frame_steps = [s for s in samples if s.kind == "frame"]
    assert len(frame_steps) == 4 and any(s.kind == "token" for s in samples)
    for s in frame_steps:
        tokens = b.encode_frames(frames[s.step : s.step + 1]).reshape(-1, b.manifest.model.hidden_size)
        assert tokens.shape[0] == TPF
        np.testing.assert_allclose(s.feeds["inputs_embeds"][0, -TPF:], tokens, atol=1e-6)
    first = frame_steps[0].feeds
    assert first["inputs_embeds"].shape[1] > TPF  # system prompt text before the first frame
    assert first["past_key_values.0.key"].shape[2] == 0
    assert any(s.feeds["past_key_values.0.key"].shape[2] > 0 for s in frame_steps)  # growing KV
    question = [s for s in frame_steps if s.feeds["inputs_embeds"].shape[1] > TPF and s.step > 0]
    assert question  # the user's turn enters with a frame


def test_split_folder_as_calibration_source(tmp_path: Path) -> None:
    for uid in ("b", "a"):
        (tmp_path / "episodes" / uid).mkdir(parents=True)
        np.save(tmp_path / "episodes" / uid / "frames.npy", np.zeros((9, 16, 16, 3), np.uint8))
    streams = frame_streams(tmp_path, 3, 5)
    assert [s.shape for s in streams] == [(5, 16, 16, 3)] * 3
    with pytest.raises(DataError):
        frame_streams(tmp_path / "episodes" / "a", 1, 5)


def _copy(parent: Path, dst: Path) -> Path:
    shutil.copytree(parent, dst)
    return dst


def _refused(bundle: Path, tmp: Path, error: type[Exception]) -> None:
    before = hashes(bundle)
    out = tmp / "child"
    with pytest.raises(error):
        quantize_bundle(bundle, out, "int8", **FAST)
    assert hashes(bundle) == before
    assert not out.exists() and not list(tmp.glob(".child.*"))


def test_corrupt_parent_refused(parent: Path, tmp_path: Path) -> None:
    bad = _copy(parent, tmp_path / "bad")
    data = bytearray((bad / "vision.onnx").read_bytes())
    data[1000:1004] = bytes(255 - x for x in data[1000:1004])
    (bad / "vision.onnx").write_bytes(bytes(data))
    _refused(bad, tmp_path, BundleError)


def test_other_schema_refused(parent: Path, tmp_path: Path) -> None:
    old = _copy(parent, tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    m["schema_version"] = 99
    (old / "manifest.json").write_text(json.dumps(m))
    _refused(old, tmp_path, BundleError)


def test_existing_output_refused(parent: Path, tmp_path: Path) -> None:
    (tmp_path / "child").mkdir()
    before = hashes(parent)
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_bundle(parent, tmp_path / "child", "int4", **FAST)
    assert hashes(parent) == before and not list((tmp_path / "child").iterdir())


def test_quantized_parent_refused(children: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_bundle(children["int4"], tmp_path / "again", "int8", **FAST)
    assert not (tmp_path / "again").exists()


def test_missed_target_names_costly_blocks(parent: Path, children: dict[str, Path], tmp_path: Path) -> None:
    """keep_fp32 keeps the named nodes; a missed target runs the per-layer scan."""
    out = tmp_path / "kept"
    r = quantize_bundle(parent, out, "int4", skip={"vision"}, keep_fp32=["lm_head"],
                        targets=Targets(logit_cosine=1.01), **FAST)
    assert not r["targets_met"] and r["misses"]
    assert r["graphs"]["vision"]["precision"] == "fp32" and r["vision"] == "not quantized"
    ops = [n for n in onnx.load(str(out / "decoder.onnx")).graph.node if n.op_type == "MatMul"]
    assert any("lm_head" in str(n.metadata_props) for n in ops)  # the head stayed a float MatMul
    plain = report_of(children["int4"])["graphs"]["decoder"]
    assert r["graphs"]["decoder"]["size_bytes"] > plain["size_bytes"]
    parts = r["components"]  # vision was skipped: the table and the decoder, each alone
    assert sorted(parts["ranked"]) == ["decoder", "embeddings"]
    assert all(parts[k]["misses"] for k in parts["ranked"])  # no cosine reaches 1.01
    assert parts["decoder"]["logit_cosine"] < parts["embeddings"]["logit_cosine"] <= 1.0 + 1e-9
    scan = r["sensitivity"]["decoder"]
    assert scan["graph"] == parts["graph"]  # the decoder that missed worst
    assert {g["group"] for g in scan["groups"]} == {"layers.0.", "layers.1."}  # lm_head kept fp32
    costs = [g["cost"] for g in scan["groups"]]
    assert costs == sorted(costs, reverse=True)
    assert r["suggested_keep_fp32"] == scan["costliest"]
    keep = "--keep-fp32 " + " ".join(scan["costliest"])
    assert r["suggested_options"] == ["--embeddings float16", keep]


def test_vision_scan_names_scoped_blocks(parent: Path) -> None:
    """The vision graph's blocks ranked like the decoder's, as patterns that reach vision only."""
    scan = layer_sensitivity(parent, "int8-qdq", decoder="vision", streams=1, frames=6, reply_tokens=2,
                             per_channel=False, threads=1, progress=False)
    assert scan["graph"] == "vision"
    groups = [g["group"] for g in scan["groups"]]
    assert groups and all(g.startswith("vision:") for g in groups)
    assert "vision:projector" in groups
    assert set(scan["costliest"]) <= set(groups)


def test_same_history_comparison(parent: Path, children: dict[str, Path]) -> None:
    """The child decides on the parent's history with its own parts: the parent against itself
    agrees exactly, and each part of the int8 child swapped in alone shows only that part's error."""
    b = open_bundle(parent, decoder="decoder", threads=1)
    child = open_bundle(children["int8"], decoder="decoder", threads=1)
    streams = plain_streams(frame_streams(None, 1, 6, offset=3), 2.0)
    same = compare_decoders(b, b, streams, 2, 2.0)
    assert same["decision_agreement"] == 1.0 and same["p_not_talk_mae"] == 0.0
    assert same["decisions"] == same["frames"] == 6 and same["logit_cosine"] == pytest.approx(1.0)
    for part in ("vision", "embeddings", "decoder"):
        mixed = with_component(b, child, part)
        f = compare_decoders(b, mixed, streams, 2, 2.0)
        assert 0.0 < f["p_not_talk_mae"] < 0.05, part  # quantized: close, not equal
        assert mixed.decoder_name == "decoder"
    table = with_component(b, child, "embeddings")
    ids = [128000, 42]
    np.testing.assert_array_equal(table.embed(ids), child.embed(ids))  # scales from the child
    np.testing.assert_array_equal(with_component(b, child, "vision").embed(ids), b.embed(ids))


def test_comparison_on_labelled_episodes(parent: Path, tmp_path: Path) -> None:
    """With --eval the comparison replays the split's episodes with their own system prompt."""
    from proassist_edge.taskworld import generate_split

    split = generate_split("test", tmp_path / "test", episodes=2)
    streams = episode_streams(split, None, frames=12)
    assert len(streams) == 2 and all(len(s.frames) == 12 for s in streams)
    assert all(s.system is not None and "Steps:" in s.system for s in streams)  # task knowledge
    assert all(m.t * 2.0 < 12 for s in streams for m in s.messages)
    with pytest.raises(DataError):
        episode_streams(tmp_path, None)


def test_paper_metrics_for_parent_and_child(
    parent: Path, children: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proassist_edge.eval import textsim
    from proassist_edge.eval.evaluate import evaluate
    from proassist_edge.taskworld import generate_split

    monkeypatch.setattr(textsim, "DEFAULT_EMBEDDER", "minilm")  # fast; the default is mpnet
    split = generate_split("test", tmp_path / "test", episodes=1)
    got = paper_metrics(parent, children["int4"], split, evaluate)  # as the CLI passes it
    assert isinstance(got, dict)
    for side in ("parent", "child"):
        assert got[side]["episodes"] == 1 and 0.0 <= got[side]["F1"] <= 1.0
        assert got[side]["embedder"]["name"] == "minilm"


def test_cli_options_reach_the_child(children: dict[str, Path]) -> None:
    r = report_of(children["int4"])
    assert r["precision"] == "int4"
    notes = " ".join(load_manifest(children["int4"]).notes)
    assert "block 64, accuracy level 4" in notes


def test_int4_keeps_named_nodes_in_8bit_blocks(
    parent: Path, children: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "int4-8"
    r = quantize_bundle(parent, out, "int4", skip={"vision"}, keep_8bit=["lm_head"],
                        sensitivity_on_miss=False, **FAST)
    bits = {}
    gqa = r["graphs"]["decoder_gqa"]  # onnxruntime-genai's node names carry the module path
    for n in onnx.load(str(out / gqa["file"]), load_external_data=False).graph.node:
        if n.op_type == "MatMulNBits":
            bits[n.name] = next(a.i for a in n.attribute if a.name == "bits")
    assert [b for name, b in bits.items() if "lm_head" in name] == [8]
    assert {b for name, b in bits.items() if "lm_head" not in name} == {4}
    plain = report_of(children["int4"])["graphs"]["decoder_gqa"]["size_bytes"]
    assert plain < gqa["size_bytes"] < 2 * plain
    assert r["decoders"]["decoder_gqa"]["p_not_talk_mae"] < 0.05  # it runs, close to the parent
    with pytest.raises(QuantizeError, match="int4 only"):
        quantize_bundle(parent, tmp_path / "no", "int8", keep_8bit=["lm_head"], **FAST)
