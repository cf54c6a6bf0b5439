"""export --precision: int4 and fp16 bundles straight from the checkpoint verify against PyTorch
within their tolerances and open in the runtime like quantize's children; checkpoints load in
their own dtype; the memory and disk pre-checks fail clearly and leave nothing behind."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from proassist_edge.cli import main
from proassist_edge.errors import ExportError
from proassist_edge.export import resources
from proassist_edge.export.bundle import ExportOptions, export_bundle
from proassist_edge.export.precision import TOLERANCES, plan_precision
from proassist_edge.export.resources import ResourceError, folder_weights
from proassist_edge.manifest import load_manifest
from proassist_edge.quant.report import TARGETS
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.prompt import StreamSettings

FAST = dict(verify_frames=24, max_reply_tokens=3)


def strict(precision: str) -> dict:
    """The precision's tolerance, failing on a miss, but for the reply tokens: a random
    fixture's logits are near ties, which any rounding reorders (teacher-forced top-1 ~0.56 at
    int4 here, 0.98 on SmolLM2's real weights)."""
    return dict(strict=True, tolerance=replace(TOLERANCES[precision], top1=0.0))


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA checkpoint whose base LLM and tower are stored in bfloat16, as released."""
    from transformers import LlamaForCausalLM, SiglipVisionModel

    from proassist_edge.export.fixture import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("bf16")
    ckpt = write_tiny_checkpoint(root, tokens_per_frame=5, lora_rounds=1)
    for folder, cls in ((root / "base_llm", LlamaForCausalLM), (root / "base_vision", SiglipVisionModel)):
        model = cls.from_pretrained(str(folder), dtype=torch.float32).to(torch.bfloat16)
        model.save_pretrained(str(folder))
    return ckpt


def run_stream(bundle: Path, frames: int = 6) -> list:
    from proassist_edge.export.verify import synthetic_stream

    b = open_bundle(bundle)
    core = StreamCore(b, StreamSettings(max_reply_tokens=3, threshold=b.manifest.model.default_threshold))
    return list(core.replay(synthetic_stream(frames)))


def test_tolerances_hold_quantizes_targets() -> None:
    for p in ("fp16", "int4"):
        assert TOLERANCES[p].shadow_decisions == TARGETS[p].decision_agreement
        assert TOLERANCES[p].p_not_talk_mae == TARGETS[p].p_not_talk_mae
        assert TOLERANCES[p].logit_cosine == TARGETS[p].logit_cosine
    plan = plan_precision("int4")
    assert plan.optimized == "int4" and plan.portable is None and plan.vision == "fp32"
    assert plan.table == "int8" and plan.reference_dtype == "auto"
    plan = plan_precision("fp16")
    assert (plan.optimized, plan.portable, plan.vision, plan.table) == ("fp16", "fp16", "fp16", "float16")
    assert plan_precision("fp32", portable_fp16=True).portable == "fp16"
    assert plan_precision("int8").via_fp32_bundle
    with pytest.raises(ExportError, match="precision 'int3'"):
        plan_precision("int3")


def test_checkpoint_loads_in_its_own_dtype(bf16_ckpt: Path) -> None:
    from proassist_edge.export.checkpoint import load_checkpoint

    ck = load_checkpoint(bf16_ckpt, dtype="auto")
    assert next(ck.model.llm.parameters()).dtype == torch.bfloat16
    assert next(ck.model.vision.parameters()).dtype == torch.bfloat16
    assert ck.model.projector[0].weight.dtype == torch.bfloat16  # the adapter's module too
    frames = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    with torch.no_grad():
        tokens = ck.model.encode_frames(frames)
        out = ck.model(tokens.reshape(1, -1, tokens.shape[-1]))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert next(load_checkpoint(bf16_ckpt).model.parameters()).dtype == torch.float32  # default


def test_int4_export_verifies_and_looks_like_a_quantized_child(bf16_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "int4"
    summary = export_bundle(bf16_ckpt, out, options=ExportOptions(precision="int4", **FAST, **strict("int4")))
    m = load_manifest(out)
    assert set(m.graphs) == {"vision", "decoder_gqa"} and m.default_decoder == "decoder_gqa"
    g = m.graphs["decoder_gqa"]
    assert (g.precision, g.variant, g.data_files) == ("int4", "optimized", ["model.onnx.data"])
    assert m.graphs["vision"].precision == "fp32"
    assert m.embeddings["dtype"] == "int8" and m.embeddings["scale"] == "embeddings_scale.npy"
    assert m.source["precision"] == "int4" and "checkpoint" in m.source
    # quantize's int4: symmetric 4-bit blocks of 32, accuracy level 4, every weight MatMul
    graph = onnx.load(str(out / g.file), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and not [n for n in graph.node if n.op_type == "MatMul"]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4)
    report = json.loads((out / "verify.json").read_text())
    assert report["reference_dtype"] == "bfloat16" and report["precision"] == "int4"
    tol, shadow = TOLERANCES["int4"], report["shadow"]
    assert shadow["decision_agreement"] >= tol.shadow_decisions
    assert shadow["logit_cosine"] >= tol.logit_cosine and shadow["p_not_talk_mae"] <= tol.p_not_talk_mae
    assert report["decoders"]["decoder_gqa"]["shadow"]["reply_tokens"] > 0
    assert m.verify["targets_met"] is True
    assert summary["precision"] == "int4" and summary["resources"]["memory_needed"] > 0
    assert len(run_stream(out)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]  # no scratch folder left


def test_fp16_export_verifies_and_runs(tiny_ckpt, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    export_bundle(tiny_ckpt(5, "head-linear", 1), out,
                  options=ExportOptions(precision="fp16", **FAST, **strict("fp16")))
    m = load_manifest(out)
    assert {k: g.precision for k, g in m.graphs.items()} == {
        "vision": "fp16", "head": "fp32", "decoder": "fp16", "decoder_gqa": "fp16",
        "decoder_cuda": "fp16"}  # the CUDA EP's graph: tests/test_gpu_decoder.py
    assert m.embeddings["dtype"] == "float16"
    report = json.loads((out / "verify.json").read_text())
    assert report["mode"] == "quick" and report["shadow"]["decision_agreement"] >= 0.99
    assert set(report["decoders"]) == {"decoder", "decoder_gqa", "decoder_cuda"}
    portable = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in portable.graph.input}
    assert types["inputs_embeds"] == onnx.TensorProto.FLOAT  # fp32 at the edges
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16  # fp16 memory for TensorRT
    for name in ("decoder", "decoder_gqa"):
        dec = open_bundle(out, decoder=name).new_decoder(32)
        step = dec.append(np.zeros((1, 3, m.model.hidden_size), np.float32))
        assert step.logits.dtype == np.float32 and np.isfinite(step.logits).all()


def test_portable_fp16_and_vision_precision_options(tiny_ckpt, tmp_path: Path) -> None:
    argv = ["export", str(tiny_ckpt(1, "lm", 1)), "-o", str(tmp_path / "b"), "--portable-fp16",
            "--vision-precision", "fp16", "--verify", "none", "--json", str(tmp_path / "s.json")]
    assert main(argv) == 0
    m = load_manifest(tmp_path / "b")
    precisions = {k: g.precision for k, g in m.graphs.items()}
    assert precisions == {"vision": "fp16", "decoder": "fp16", "decoder_gqa": "fp32"}
    assert json.loads((tmp_path / "s.json").read_text())["precision"] == "fp32"


def test_int8_goes_through_quantize_and_leaves_no_fp32_bundle(tiny_ckpt, tmp_path: Path) -> None:
    from functools import partial

    from proassist_edge.quant.quantize import quantize_bundle

    quantizer = partial(quantize_bundle, budget="quick", per_channel=False, threads=1, progress=False)
    out = tmp_path / "int8"
    opts = ExportOptions(precision="int8", variants=("optimized",), verify="none")
    summary = export_bundle(tiny_ckpt(1, "lm", 1), out, options=opts, quantizer=quantizer)
    m = load_manifest(out)
    assert m.graphs["decoder_gqa"].precision == "int8" and m.source["precision"] == "int8"
    assert (out / "quant_report.json").is_file() and summary["precision"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
    with pytest.raises(ExportError, match="quantize"):
        export_bundle(tiny_ckpt(1, "lm", 1), tmp_path / "x", options=opts)  # no quantizer given


def test_weights_are_counted_from_the_headers(tiny_ckpt) -> None:
    from transformers import LlamaForCausalLM

    ckpt = tiny_ckpt(1, "lm", 1)
    llm_dir = ckpt.parent / "base_llm"
    w = folder_weights(llm_dir)
    model = LlamaForCausalLM.from_pretrained(str(llm_dir))
    assert w.params == sum(p.numel() for p in model.parameters())
    assert w.bytes == w.params * 4 and w.dtype == "float32" and w.largest == 128256 * 64


@pytest.mark.parametrize("short", ["memory", "disk"])
def test_pre_check_says_what_it_needs_and_writes_nothing(
    tiny_ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, short: str
) -> None:
    if short == "memory":
        monkeypatch.setattr(resources, "available_memory", lambda: 100_000_000)
    else:
        monkeypatch.setattr(resources, "free_disk", lambda path: 1_000_000)
    out = tmp_path / "bundles" / "b"
    with pytest.raises(ResourceError, match=f"needs about .* of {short}.* (available|free)"):
        export_bundle(tiny_ckpt(1, "lm", 1), out, options=ExportOptions(precision="int4"))
    assert not (tmp_path / "bundles").exists()  # checked before anything is written
    rc = main(["export", str(tiny_ckpt(1, "lm", 1)), "-o", str(out), "--precision", "int4"])
    err = capsys.readouterr().err
    assert rc == 1 and "--no-resource-check" in err and not out.exists()
