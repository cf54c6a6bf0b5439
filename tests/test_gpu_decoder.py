"""The GPU decoder in an fp16 bundle: export writes `decoder_cuda` (the builder's fp16
GroupQueryAttention, fp16 KV memory, float32 edges) on the weights of `decoder_gqa`, verifies it
on the CPU EP (onnxruntime's CPU provider has an fp16 GroupQueryAttention kernel) and names it
in the manifest's `ep_decoders` for cuda, the portable decoder for tensorrt. On a CPU-only
onnxruntime, `--ep cuda` is refused with the typed error naming the provider. Running it on the
CUDA EP: scripts/gpu_check.sh, not yet run on a GPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from proassist_edge.export.bundle import ExportOptions, export_bundle, leave_out
from proassist_edge.export.parts import ep_decoders
from proassist_edge.export.precision import TOLERANCES
from proassist_edge.manifest import load_manifest
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.providers import ExecutionProviderError, offered


@pytest.fixture(scope="module")
def fp16(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "b"
    tol = replace(TOLERANCES["fp16"], top1=0.0)  # a random fixture's near-tied logits
    export_bundle(tiny_ckpt(5, "lm", 1), out, options=ExportOptions(
        precision="fp16", verify_frames=24, max_reply_tokens=3, strict=True, tolerance=tol))
    return out


def test_an_fp16_export_names_its_cuda_decoder(fp16: Path) -> None:
    m = load_manifest(fp16)
    assert m.ep_decoders == {"cuda": "decoder_cuda", "tensorrt": "decoder"}
    assert m.default_decoder in ("decoder", "decoder_gqa")  # chosen on the CPU, never the GPU's
    cuda, gqa = m.graphs["decoder_cuda"], m.graphs["decoder_gqa"]
    assert cuda.variant == "optimized" and cuda.precision == "fp16"
    assert cuda.data_files == gqa.data_files == ["model.onnx.data"]  # one copy of the weights
    graph = onnx.load(str(fp16 / cuda.file), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["inputs_embeds"] == types["logits"] == onnx.TensorProto.FLOAT
    assert types["past_key_values.0.key"] == types["present.0.value"] == onnx.TensorProto.FLOAT16
    f16 = onnx.TensorProto.FLOAT16
    assert {t.name: t.data_type for t in graph.initializer if t.name.endswith("_cache")} == {
        "cos_cache": f16, "sin_cache": f16}
    gqa_ops = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa_ops) == m.model.num_layers
    assert not any(n.name.endswith(("/q/Cast", "/out/Cast")) for n in graph.node)


def test_the_cuda_decoder_is_verified_on_the_cpu_ep(fp16: Path) -> None:
    report = json.loads((fp16 / "verify.json").read_text())
    assert report["execution_provider"] == "cpu" and report["targets_met"]
    assert set(report["decoders"]) == {"decoder", "decoder_gqa", "decoder_cuda"}
    assert report["decoders"]["decoder_cuda"]["shadow"]["decision_agreement"] >= 0.99
    x = np.random.default_rng(0).standard_normal((1, 7, 64)).astype(np.float32) * 0.05
    outs = {}
    for name in ("decoder_gqa", "decoder_cuda"):
        dec = open_bundle(fp16, decoder=name, ep="cpu").new_decoder(32)
        dec.append(x)
        outs[name] = dec.append(x[:, :1]).logits
    np.testing.assert_allclose(outs["decoder_cuda"], outs["decoder_gqa"], atol=5e-3)


@pytest.mark.skipif("cuda" in offered(), reason="this onnxruntime has the CUDA EP")
def test_ep_cuda_on_a_cpu_only_onnxruntime_names_the_provider(fp16: Path) -> None:
    with pytest.raises(ExecutionProviderError, match="CUDAExecutionProvider") as e:
        open_bundle(fp16, ep="cuda")
    assert e.value.ep == "cuda" and "--ep cuda" in str(e.value)


def test_ep_decoders_of_other_bundles(fp16: Path) -> None:
    g = load_manifest(fp16).graphs
    fp32_like = {k: v for k, v in g.items() if k != "decoder_cuda"}
    assert ep_decoders(fp32_like) == {"tensorrt": "decoder"}  # an fp16 portable graph
    fp32 = {k: replace(v, precision="fp32") for k, v in fp32_like.items()}
    assert ep_decoders(fp32) == {}  # no GPU graph: every provider runs the default
    assert ep_decoders({k: v for k, v in g.items() if k == "decoder_gqa"}) == {}


def test_leaving_one_decoder_out_keeps_the_weights_another_uses(fp16: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "b"
    shutil.copytree(fp16, root)
    m = load_manifest(root)
    leave_out(root, m, "decoder_cuda", "decoder_cuda left out: a test")
    assert not (root / "decoder_cuda.onnx").exists() and (root / "model.onnx.data").exists()
