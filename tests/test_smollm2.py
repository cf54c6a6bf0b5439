"""A ProAssist-architecture checkpoint on real weights (SmolLM2-135M-Instruct) exports, verifies
and decodes text exactly like transformers' own generate()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from proassist_edge.export.bundle import ExportOptions, export_bundle
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import greedy_generate


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("gguf")
    from proassist_edge.export.smollm import write_smollm2_checkpoint

    root = tmp_path_factory.mktemp("smol")
    ckpt = write_smollm2_checkpoint(root / "ckpt", tokens_per_frame=5)
    bundle = root / "bundle"
    export_bundle(
        ckpt, bundle, options=ExportOptions(verify_frames=40, max_reply_tokens=8, threshold=0.5)
    )
    return ckpt, bundle


def test_exports_and_verifies(smol: tuple[Path, Path]) -> None:
    _, bundle = smol
    report = json.loads((bundle / "verify.json").read_text())
    for name, figures in report["decoders"].items():
        assert figures["decision_agreement"] == 1.0, name
        assert figures["token_match_rate"] == 1.0, name
        assert figures["max_abs_logit_diff"] < 1e-3, name
    m = open_bundle(bundle).manifest.model
    assert (m.hidden_size, m.num_layers, m.num_kv_heads, m.vocab_size) == (576, 30, 3, 49152)
    assert m.chat_format.eos == "<|im_end|>"  # ChatML, read off the tokenizer


@pytest.mark.parametrize("decoder", ["decoder", "decoder_gqa"])
def test_text_greedy_equals_transformers_generate(smol: tuple[Path, Path], decoder: str) -> None:
    from transformers import LlamaForCausalLM

    from proassist_edge.export.smollm import smollm2_llm_dir

    b = open_bundle(smol[1], decoder=decoder)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = b.tokenizer.encode(prompt, add_special_tokens=False).ids
    ours = greedy_generate(b, ids, max_new=24)
    hf = LlamaForCausalLM.from_pretrained(str(smollm2_llm_dir()), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=b.manifest.model.eos_id,
            pad_token_id=b.manifest.model.eos_id,
        )
    theirs = out[0, len(ids) :].tolist()
    assert ours == theirs, (b.tokenizer.decode(ours), b.tokenizer.decode(theirs))
    assert "Paris" in b.tokenizer.decode(ours)
