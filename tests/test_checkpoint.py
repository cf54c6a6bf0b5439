"""Checkpoint loading in the released layout: LoRA rounds, saved modules, typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from proassist_edge.errors import CheckpointError, ShapeMismatchError
from proassist_edge.export.checkpoint import load_checkpoint
from proassist_edge.export.fixture import LORA_TARGETS


def hand_merge(ckpt: Path) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    """Merge adapter_0, adapter_1, ..., top by hand: W += B @ A * alpha / r, lm_head base first."""
    cfg = json.loads((ckpt / "config.json").read_text())
    llm = LlamaForCausalLM.from_pretrained(cfg["llm_pretrained"], dtype=torch.float32)
    params = dict(llm.named_parameters())
    rounds = sorted(
        (p for p in ckpt.glob("adapter_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1])
    )
    rounds.append(ckpt)
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for d in rounds:
            acfg = json.loads((d / "adapter_config.json").read_text())
            scale = acfg["lora_alpha"] / acfg["r"]
            state = load_file(str(d / "adapter_model.safetensors"))
            for k, v in state.items():
                name = k.removeprefix("base_model.model.")
                if name == "lm_head.base_layer.weight":
                    params["lm_head.weight"].copy_(v)
            for k, a in state.items():
                if ".lora_A." not in k:
                    continue
                b = state[k.replace(".lora_A.", ".lora_B.")]
                target = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                params[target].add_(b @ a * scale)
            for k, v in state.items():
                if k.startswith("base_model.model.mm_projector") or "binary_decision_head" in k:
                    saved[k.removeprefix("base_model.model.")] = v
    return llm, saved


def test_lora_rounds_merge_like_by_hand(tiny_ckpt) -> None:
    ckpt = tiny_ckpt(tokens_per_frame=5, w2t="head-mlp", lora_rounds=2)
    assert (ckpt / "adapter_0").is_dir() and (ckpt / "adapter_1").is_dir()
    assert json.loads((ckpt / "adapter_config.json").read_text())["target_modules"] == LORA_TARGETS
    ck = load_checkpoint(ckpt)
    ref, saved = hand_merge(ckpt)
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ck.model.llm(inputs_embeds=x).logits
        want = ref(inputs_embeds=x).logits
        assert (got - want).abs().max().item() < 1e-5
        for name, value in saved.items():
            mod, _, pname = name.partition(".")
            assert torch.equal(getattr(ck.model.llm, mod).state_dict()[pname], value), name
        # the merged projector is the one the top adapter carries, not a fresh one
        assert ck.model.decision_head is not None


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_non_lora_layouts_load_projector_bin(tiny_ckpt, mode: str) -> None:
    ckpt = tiny_ckpt(w2t="head-linear", train_mode=mode)
    state = torch.load(ckpt / "mm_projector.bin", weights_only=True)
    ck = load_checkpoint(ckpt)
    assert torch.equal(ck.model.projector[0].weight, state["mm_projector.0.weight"])
    assert torch.equal(ck.model.decision_head.weight, state["binary_decision_head.weight"])


@pytest.mark.parametrize("tpf", [1, 5, 10])
def test_frame_tokens_per_config(tiny_ckpt, tpf: int) -> None:
    ck = load_checkpoint(tiny_ckpt(tokens_per_frame=tpf))
    frames = torch.randint(0, 256, (3, 40, 56, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert ck.model.encode_frames(frames).shape == (3, tpf, 64)
    assert ck.config.tokens_per_frame == tpf


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_vision_width_mismatch_names_both_numbers(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = copy_ckpt(tiny_ckpt(), tmp_path / "c")
    edit_config(ckpt, vision_hidden_size=48)
    with pytest.raises(ShapeMismatchError, match=r"expected 48, got 32") as e:
        load_checkpoint(ckpt)
    assert "vision" in str(e.value)


def test_projector_vs_llm_hidden_mismatch(tiny_ckpt, tmp_path: Path) -> None:
    from proassist_edge.export.fixture import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", hidden=32, lora_rounds=0)
    ckpt = tiny_ckpt(train_mode="frozen")
    with pytest.raises(CheckpointError, match=r"(32|64)"):
        load_checkpoint(ckpt, llm_from=other.parent / "base_llm")


def test_tokens_per_frame_mismatch(tiny_ckpt) -> None:
    with pytest.raises(ShapeMismatchError, match=r"--tokens-per-frame 5"):
        load_checkpoint(tiny_ckpt(tokens_per_frame=5), tokens_per_frame=10)


def test_patch_grid_larger_than_tower(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = copy_ckpt(tiny_ckpt(), tmp_path / "c")
    edit_config(ckpt, img_patch_token_size=9)
    with pytest.raises(ShapeMismatchError, match=r"expected 4, got 9"):
        load_checkpoint(ckpt)


def test_missing_and_corrupt_files(tiny_ckpt, tmp_path: Path) -> None:
    base = tiny_ckpt(lora_rounds=1)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    c1 = copy_ckpt(base, tmp_path / "c1")
    (c1 / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(c1)
    c2 = copy_ckpt(base, tmp_path / "c2")
    (c2 / "adapter_0" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_0 lacks"):
        load_checkpoint(c2)
    c3 = copy_ckpt(base, tmp_path / "c3")
    (c3 / "adapter_model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(c3)
    c4 = copy_ckpt(base, tmp_path / "c4")
    edit_config(c4, llm_pretrained="meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(CheckpointError, match="--llm-from"):
        load_checkpoint(c4)


class Evil:
    def __reduce__(self):  # noqa: D105 - a pickle that would run code if unpickled plainly
        return (print, ("pwned",))


def test_projector_bin_is_never_unpickled_unsafely(tiny_ckpt, tmp_path: Path) -> None:
    ckpt = copy_ckpt(tiny_ckpt(train_mode="frozen"), tmp_path / "c")
    torch.save({"mm_projector.0.weight": Evil()}, ckpt / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(ckpt)
