"""Checkpoints trained on the task world, shipped small and materialised in the released layout.

The repository commits compact files in `taskworld/assets/`; weights that other packages ship (the
Llama-3 tokenizer, SmolLM2, MobileNetV2) are referenced, never committed.

* `taskworld-tiny`: a from-scratch tiny ProAssist. Its 128256-row embedding table and LM head
  were zero-initialised and only the rows of tokens seen in training ever moved; the other rows
  are all equal (zero for the table, one common row for the head). The file stores the moved
  rows, their token ids and the common row, plus every other tensor, in fp32.
* `taskworld-lite`: a LoRA adapter on SmolLM2-135M-Instruct with the projector as a saved
  module (as the released models carry it), MobileNetV2 as the frozen vision tower; tensors in
  fp16 (widened to fp32 when materialised).

`shipped_checkpoint(name)` writes, once per asset version, a full checkpoint folder into the
cache and returns it, so every tool loads it with `load_checkpoint` like a real release.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED = ("taskworld-tiny", "taskworld-lite")
FORMAT = "proassist-edge-compact-1"


def asset_paths(name: str) -> tuple[Path, Path]:
    return ASSETS / f"{name}.safetensors", ASSETS / f"{name}.json"


def shipped_checkpoint(name: str) -> Path | None:
    """The materialised checkpoint folder of a shipped model, or None if NAME is not one (or its
    asset is missing). Idempotent: the folder is written once per asset version."""
    if name not in SHIPPED:
        return None
    weights, meta_path = asset_paths(name)
    if not (weights.is_file() and meta_path.is_file()):
        return None
    return materialise(weights, meta_path)


def materialise(weights: Path, meta_path: Path) -> Path:
    """The checkpoint folder for a compact pair (WEIGHTS, META), written once into the cache."""
    from proassist_edge.paths import cache_dir

    digest = hashlib.sha256(weights.read_bytes() + meta_path.read_bytes()).hexdigest()[:12]
    root = cache_dir() / f"{weights.stem}-{digest}"
    ckpt = root / "checkpoint"
    if (ckpt / "config.json").is_file():
        return ckpt
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "tiny":
        materialise_tiny(weights, meta, tmp)
    else:
        materialise_lite(weights, meta, tmp)
    # Paths inside config.json name the final folder, not the temporary one.
    cfg_path = tmp / "checkpoint" / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace(str(tmp.resolve()), str(root.resolve())))
    if root.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(root)
    return ckpt


# --- the compact vocabulary rows ----------------------------------------------------------
def split_rows(weight: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A (U+1, H) compact table (row U = the common row) as rows, ids and common."""
    # copies: a tied LM head shares its table with the embedding, and safetensors refuses
    # two names for one memory
    return {"rows": weight[:-1].clone(), "ids": ids.to(torch.int64).clone(),
            "common": weight[-1].clone()}


def full_table(rows: torch.Tensor, ids: torch.Tensor, common: torch.Tensor, vocab: int) -> torch.Tensor:
    table = common.float().expand(vocab, -1).clone()
    table[ids] = rows.float()
    return table


# --- tiny ----------------------------------------------------------------------------------
def pack_tiny(
    out: Path, llm: Any, vision: Any, used_ids: torch.Tensor, meta: dict[str, Any]
) -> None:
    """Write OUT.safetensors and OUT.json from a compact-vocabulary tiny model (fp32)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for k, v in llm.state_dict().items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            for part, t in split_rows(v.detach(), used_ids).items():
                tensors[f"{k.split('.')[-2]}.{part}"] = t
        else:
            tensors[f"llm.{k}"] = v.detach().contiguous()
    for k, v in vision.state_dict().items():
        tensors[f"vision.{k}"] = v.detach().contiguous()
    save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
              str(out.with_suffix(".safetensors")), metadata={"format": FORMAT})
    out.with_suffix(".json").write_text(json.dumps({"format": FORMAT, "kind": "tiny", **meta}, indent=1))


def tiny_state(weights: Path, vocab: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(full-vocabulary LLM state dict incl. mm_projector/head, vision state dict)."""
    from safetensors.torch import load_file

    t = load_file(str(weights))
    llm = {k[4:]: v for k, v in t.items() if k.startswith("llm.")}
    for key, short in (("model.embed_tokens.weight", "embed_tokens"), ("lm_head.weight", "lm_head")):
        llm[key] = full_table(t[f"{short}.rows"], t[f"{short}.ids"], t[f"{short}.common"], vocab)
    vision = {k[7:]: v for k, v in t.items() if k.startswith("vision.")}
    return llm, vision


def materialise_tiny(weights: Path, meta: dict[str, Any], root: Path) -> None:
    """base_llm/ (config + tokenizer), base_vision/ (SigLIP), checkpoint/ (llm_train_mode full:
    config.json + model.safetensors + mm_projector.bin)."""
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from proassist_edge.export.fixture import llama3_tokenizer_json

    llm_dir, vis_dir, ckpt = root / "base_llm", root / "base_vision", root / "checkpoint"
    lcfg = LlamaConfig.from_dict(meta["llm_config"])
    state, vstate = tiny_state(weights, lcfg.vocab_size)
    heads = {k: v for k, v in state.items() if k.startswith(("mm_projector.", "binary_decision_head."))}
    llm = LlamaForCausalLM(lcfg)
    llm.load_state_dict({k: v for k, v in state.items() if k not in heads})
    llm_dir.mkdir(parents=True)
    lcfg.save_pretrained(str(llm_dir))
    shutil.copy(llama3_tokenizer_json(), llm_dir / "tokenizer.json")
    vision = SiglipVisionModel(SiglipVisionConfig.from_dict(meta["vision_config"]))
    vision.load_state_dict(vstate)
    vision.save_pretrained(str(vis_dir))
    llm.save_pretrained(str(ckpt))
    torch.save(heads, ckpt / "mm_projector.bin")
    fields = dict(meta["proassist"], llm_pretrained=str(llm_dir.resolve()),
                  vision_pretrained=str(vis_dir.resolve()))
    write_config(ckpt, llm.config.to_dict(), fields)


def write_config(ckpt: Path, llm_config: dict[str, Any], fields: dict[str, Any]) -> None:
    mode = fields.get("llm_train_mode", "full")
    config = {**llm_config, **fields, "training_args": {"llm_train_mode": mode}}
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))


# --- lite ----------------------------------------------------------------------------------
def pack_lite(out: Path, adapter_dir: Path, meta: dict[str, Any]) -> None:
    """OUT.safetensors (the adapter's tensors in fp16) and OUT.json from a saved peft adapter."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in state.items()},
              str(out.with_suffix(".safetensors")), metadata={"format": FORMAT})
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = None
    body = {"format": FORMAT, "kind": "lite", "adapter_config": adapter_config, **meta}
    out.with_suffix(".json").write_text(json.dumps(body, indent=1))


def materialise_lite(weights: Path, meta: dict[str, Any], root: Path) -> None:
    """checkpoint/ with adapter_config.json + adapter_model.safetensors (fp32) on top of the
    cached SmolLM2 folder; base_vision/ = MobileNetV2 from the weights package."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    from proassist_edge.export.mobilenet import write_mobilenet_v2_dir
    from proassist_edge.export.smollm import smollm2_llm_dir

    llm_dir = smollm2_llm_dir()
    vis_dir = write_mobilenet_v2_dir(root / "base_vision")
    ckpt = root / "checkpoint"
    ckpt.mkdir(parents=True)
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    save_file(state, str(ckpt / "adapter_model.safetensors"))
    acfg = dict(meta["adapter_config"], base_model_name_or_path=str(llm_dir))
    (ckpt / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    fields = dict(meta["proassist"], llm_pretrained=str(llm_dir.resolve()),
                  vision_pretrained=str(vis_dir.resolve()))
    write_config(ckpt, LlamaConfig.from_pretrained(str(llm_dir)).to_dict(), fields)


def ship_run(run_dir: Path, name: str) -> None:
    """Copy a training run's compact pair RUN_DIR/NAME.{safetensors,json} into the assets."""
    ASSETS.mkdir(exist_ok=True)
    for suffix in (".safetensors", ".json"):
        (ASSETS / (name + suffix)).write_bytes((run_dir / (name + suffix)).read_bytes())
