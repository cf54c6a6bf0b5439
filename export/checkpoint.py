"""Load a ProAssist checkpoint in the released layout into a ProAssistModel.

Layout (proassist-reference.md): `config.json` with Llama + ProAssist fields; with LoRA,
`adapter_0/ adapter_1/ ...` merged in order, then the top-level adapter; the projector and
decision head travel inside the adapters as saved modules. Without LoRA, `mm_projector.bin`
(a pickle, loaded with weights_only=True). The tokenizer comes from the base LLM folder and the
vision tower from its own folder; both can be overridden because hub ids cannot be fetched here.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionModel

from proassist_edge.chat import CHATML, LLAMA3, ChatFormat
from proassist_edge.errors import CheckpointError, ShapeMismatchError
from proassist_edge.export.model import (
    MULTIMODAL,
    ProAssistConfig,
    ProAssistModel,
    VisionTower,
    attach_multimodal_modules,
)
from proassist_edge.export.resources import release

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class LoadedCheckpoint:
    model: ProAssistModel
    config: ProAssistConfig
    tokenizer: Tokenizer
    tokenizer_path: Path
    chat: ChatFormat
    llm_dir: Path
    vision_dir: Path
    img_token_id: int


def read_config(ckpt: Path) -> ProAssistConfig:
    path = ckpt / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no config.json: point at a ProAssist checkpoint folder")
    try:
        return ProAssistConfig.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid ProAssist config ({e})") from e


def resolve_dir(ckpt: Path, value: str, override: str | Path | None, flag: str) -> Path:
    for cand in ([Path(override)] if override else []) + [Path(value), ckpt / value]:
        if cand.is_dir():
            return cand.resolve()
    raise CheckpointError(
        f"cannot find '{override or value}' as a local folder; hub ids cannot be downloaded here: "
        f"pass {flag} DIR pointing at a local copy"
    )


def adapter_rounds(ckpt: Path) -> list[Path]:
    """adapter_0, adapter_1, ... in numeric order, then the top-level adapter."""
    numbered = [p for p in ckpt.glob("adapter_*") if re.fullmatch(r"adapter_\d+", p.name)]
    rounds = sorted(numbered, key=lambda p: int(p.name.split("_")[1]))
    return [*rounds, ckpt] if (ckpt / ADAPTER_FILES[0]).is_file() else rounds


def check_saved_projector(d: Path, vision_width: int, hidden: int) -> None:
    """Compare the projector an adapter carries with the config before peft sees it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(d / ADAPTER_FILES[1]), "pt") as f:
            keys = [k for k in f.keys() if k.endswith("mm_projector.0.weight")]
            shape = f.get_slice(keys[0]).get_shape() if keys else None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"LoRA round {d} cannot be loaded ({e}): the adapter file is corrupt"
        ) from e
    if shape is None:
        return
    out_w, in_w = shape
    if in_w != vision_width:
        raise ShapeMismatchError(
            f"projector input width in {d.name} vs config vision_hidden_size",
            vision_width,
            in_w,
            "fix vision_hidden_size in config.json or point --vision-from at the right tower",
        )
    if out_w != hidden:
        raise ShapeMismatchError(
            f"projector output width in {d.name} vs LLM hidden size",
            hidden,
            out_w,
            "point --llm-from at the LLM this checkpoint was trained on",
        )


def merge_adapters(
    llm: LlamaForCausalLM, rounds: list[Path], vision_width: int
) -> LlamaForCausalLM:
    from peft import PeftModel

    for d in rounds:
        missing = [f for f in ADAPTER_FILES if not (d / f).is_file()]
        if missing:
            raise CheckpointError(f"LoRA round {d} lacks {missing}: the checkpoint is incomplete")
        check_saved_projector(d, vision_width, llm.config.hidden_size)
        try:
            peft_model = PeftModel.from_pretrained(llm, str(d))
            llm = peft_model.merge_and_unload()
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(
                f"LoRA round {d} cannot be loaded ({type(e).__name__}: {e})"
            ) from e
    return llm


def load_projector_bin(llm: torch.nn.Module, path: Path) -> None:
    """mm_projector.bin's modules into LLM's (a LlamaForCausalLM or any module holding them)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never plain unpickling
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        raise CheckpointError(f"{path} cannot be read safely ({type(e).__name__}: {e})") from e
    for prefix in ("mm_projector", "binary_decision_head"):
        module = getattr(llm, prefix, None)
        sub = {k.split(prefix + ".", 1)[1]: v for k, v in state.items() if prefix + "." in k}
        if module is None or not sub:
            continue
        try:
            module.load_state_dict(sub)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: {prefix} does not fit the config ({e})") from e


def chat_format_for(tok: Tokenizer) -> ChatFormat:
    """The chat format is read off the tokenizer's special tokens, never the model name."""
    if tok.token_to_id("<|eot_id|>") is not None:
        return LLAMA3
    if tok.token_to_id("<|im_end|>") is not None:
        return CHATML
    raise CheckpointError("the tokenizer has neither Llama-3 nor ChatML special tokens")


def hf_clean_up_spaces(llm_dir: Path) -> bool:
    """`clean_up_tokenization_spaces` of the LLM folder's tokenizer_config.json (False when it
    has none): Hugging Face's decode, which the authors' runner uses, applies it to replies."""
    path = llm_dir / "tokenizer_config.json"
    if not path.is_file():
        return False
    try:
        value = json.loads(path.read_text()).get("clean_up_tokenization_spaces", False)
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a JSON object ({e}): restore it from the base LLM") from e
    return bool(value)


def load_vision(
    cfg: ProAssistConfig, vision_dir: Path, dtype: torch.dtype | str = torch.float32
) -> VisionTower:
    """The vision tower in DTYPE ("auto": its stored dtype)."""
    if cfg.vision_type == "mobilenet_v2":
        from proassist_edge.export.mobilenet import load_mobilenet_v2

        backbone, size = load_mobilenet_v2(vision_dir)
        tower = VisionTower(cfg, backbone, size)
        return tower if dtype == "auto" else tower.to(dtype)
    siglip = SiglipVisionModel.from_pretrained(str(vision_dir), dtype=dtype)
    return VisionTower(cfg, siglip, int(siglip.config.image_size))  # type: ignore[arg-type]


@dataclass
class CheckpointInfo:
    """A checkpoint before any weight is loaded: its config, where each part's weights are, the
    tokenizer and the ids the model needs."""

    path: Path
    config: ProAssistConfig
    llm_dir: Path  # the base LLM (tokenizer, and the weights unless train mode is full)
    vision_dir: Path
    weights_dir: Path  # where the LLM's weights are: the checkpoint itself for full
    tokenizer: Tokenizer
    tokenizer_path: Path
    chat: ChatFormat
    img_token_id: int
    not_talk_id: int
    rounds: list[Path]  # LoRA rounds in merge order


def open_checkpoint(
    ckpt: str | Path,
    llm_from: str | Path | None = None,
    vision_from: str | Path | None = None,
    tokens_per_frame: int | None = None,
) -> CheckpointInfo:
    """Read a released-layout checkpoint's config, folders and tokenizer; load no weight."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt} does not exist")
    cfg = read_config(ckpt)
    if tokens_per_frame is not None and tokens_per_frame != cfg.tokens_per_frame:
        raise ShapeMismatchError(
            "tokens per frame (requested vs config)",
            tokens_per_frame,
            cfg.tokens_per_frame,
            f"this checkpoint pools {cfg.img_patch_token_size}x{cfg.img_patch_token_size} patches"
            f"{' plus the pooled token' if cfg.use_img_cls_token else ''}: "
            f"export it with --tokens-per-frame {cfg.tokens_per_frame}",
        )
    llm_dir = resolve_dir(ckpt, cfg.llm_pretrained, llm_from, "--llm-from")
    vision_dir = resolve_dir(ckpt, cfg.vision_pretrained, vision_from, "--vision-from")
    rounds: list[Path] = []
    if cfg.llm_train_mode == "lora":
        rounds = adapter_rounds(ckpt)
        if not rounds:
            raise CheckpointError(f"{ckpt} says llm_train_mode=lora but holds no adapter files")
    elif not (ckpt / "mm_projector.bin").is_file():
        raise CheckpointError(f"{ckpt} has no mm_projector.bin: the projector weights are missing")
    tok_path = llm_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{llm_dir} has no tokenizer.json: point --llm-from at the base LLM")
    tok = Tokenizer.from_file(str(tok_path))
    chat = replace(chat_format_for(tok), clean_up_spaces=hf_clean_up_spaces(llm_dir))
    tok.add_special_tokens([cfg.img_token])
    img_id = tok.token_to_id(cfg.img_token)
    not_talk = cfg.img_sep_token or chat.not_talk
    not_talk_id = tok.token_to_id(not_talk)
    if not_talk_id is None:
        raise CheckpointError(f"the not-talk token {not_talk!r} is not in the tokenizer")
    assert img_id is not None  # added just above
    weights_dir = ckpt if cfg.llm_train_mode == "full" else llm_dir
    return CheckpointInfo(ckpt, cfg, llm_dir, vision_dir, weights_dir, tok, tok_path, chat,
                          img_id, not_talk_id, rounds)


def load_llm(info: CheckpointInfo, dtype: torch.dtype | str = torch.float32) -> LlamaForCausalLM:
    """The LLM with its projector (and decision head), every LoRA round merged, in DTYPE
    ("auto": the stored dtype; the merge then runs in it, as the released bf16 checkpoints)."""
    cfg = info.config
    try:
        llm = LlamaForCausalLM.from_pretrained(str(info.weights_dir), dtype=dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the LLM from {info.weights_dir} ({e})") from e
    attach_multimodal_modules(llm, cfg)
    if info.rounds:
        llm = merge_adapters(llm, info.rounds, cfg.vision_hidden_size)
    if (info.path / "mm_projector.bin").is_file():
        load_projector_bin(llm, info.path / "mm_projector.bin")
    return llm.to(next(llm.model.parameters()).dtype)  # adapters' saved modules in the same dtype


def build_model(info: CheckpointInfo, llm: LlamaForCausalLM, vision: VisionTower) -> LoadedCheckpoint:
    model = ProAssistModel(info.config, vision, llm, info.not_talk_id).eval()
    return LoadedCheckpoint(model, info.config, info.tokenizer, info.tokenizer_path, info.chat,
                            info.llm_dir, info.vision_dir, info.img_token_id)


def load_checkpoint(
    ckpt: str | Path,
    llm_from: str | Path | None = None,
    vision_from: str | Path | None = None,
    tokens_per_frame: int | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> LoadedCheckpoint:
    """Load any released-layout checkpoint (lora, full or frozen) on the CPU in DTYPE (float32
    by default; "auto": the dtype it is stored in)."""
    info = open_checkpoint(ckpt, llm_from, vision_from, tokens_per_frame)
    llm = load_llm(info, dtype)
    vision_dtype = next(llm.model.parameters()).dtype if dtype == "auto" else dtype
    return build_model(info, llm, load_vision(info.config, info.vision_dir, vision_dtype))


# --- one part at a time: what export loads, stage by stage -------------------------------------
@dataclass
class PlainLLM:
    """The merged LLM as a plain Hugging Face folder in its stored dtype (what the builder and
    the later stages read), and the ProAssist modules that hang on it (small)."""

    folder: Path
    multimodal: dict[str, torch.Tensor]
    hidden: int


def _multimodal_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if k.split(".")[0] in MULTIMODAL}


def _link_weights(src: Path, dst: Path, tokenizer: Path) -> None:
    """DST: SRC's weight files (links), a Llama-only config, the tokenizer."""
    dst.mkdir(parents=True)
    for f in [*src.glob("*.safetensors"), *src.glob("*.safetensors.index.json")]:
        (dst / f.name).symlink_to(f.resolve())
    LlamaConfig.from_pretrained(str(src)).save_pretrained(str(dst))
    shutil.copy(tokenizer, dst / "tokenizer.json")


def write_plain_llm(info: CheckpointInfo, work: Path) -> PlainLLM:
    """The LLM every later stage reads. frozen: the base folder itself; full: the checkpoint's
    weights, linked; lora: the base with every round merged in its stored dtype (bf16 for the
    released checkpoints), saved once, the model freed before this returns."""
    cfg = info.config
    if not info.rounds:
        holder = torch.nn.Module()
        hidden = int(LlamaConfig.from_pretrained(str(info.weights_dir)).hidden_size)
        attach_multimodal_modules(holder, cfg, hidden)
        load_projector_bin(holder, info.path / "mm_projector.bin")
        folder = info.llm_dir
        if cfg.llm_train_mode == "full":
            folder = work / "llm"
            _link_weights(info.weights_dir, folder, info.tokenizer_path)
        return PlainLLM(folder, _multimodal_state(holder), hidden)
    llm = load_llm(info, "auto")
    state = _multimodal_state(llm)
    for name in MULTIMODAL:
        if hasattr(llm, name):
            delattr(llm, name)
    folder = work / "llm"
    llm.save_pretrained(str(folder))
    shutil.copy(info.tokenizer_path, folder / "tokenizer.json")
    hidden = int(llm.config.hidden_size)
    del llm
    release()  # the merged weights are on disk: the stages after read what they need
    return PlainLLM(folder, state, hidden)


def load_plain_llm(info: CheckpointInfo, plain: PlainLLM, dtype: torch.dtype | str) -> LlamaForCausalLM:
    """The merged LLM from PLAIN with its ProAssist modules, in DTYPE."""
    try:
        llm = LlamaForCausalLM.from_pretrained(str(plain.folder), dtype=dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the LLM from {plain.folder} ({e})") from e
    attach_multimodal_modules(llm, info.config)
    llm.load_state_dict(plain.multimodal, strict=False)
    return llm.to(next(llm.model.parameters()).dtype).eval()


def multimodal_modules(info: CheckpointInfo, plain: PlainLLM, dtype: torch.dtype) -> torch.nn.Module:
    """The projector (and decision head) alone, in DTYPE."""
    holder = torch.nn.Module()
    attach_multimodal_modules(holder, info.config, plain.hidden)
    holder.load_state_dict(plain.multimodal)
    return holder.to(dtype).eval()


EMBED_KEY, HEAD_KEY = "model.embed_tokens.weight", "lm_head.weight"


def tensor_rows(folder: Path, key: str) -> tuple[Callable[[int, int], np.ndarray], tuple[int, int]]:
    """rows(a, b) of the 2-D tensor KEY in FOLDER's safetensors files, as float32, read a block
    at a time (nothing else of the file is loaded); and its shape."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            if key in st.keys():
                shape = st.get_slice(key).get_shape()
                break
    else:
        raise CheckpointError(f"{folder} holds no {key}: is it a Llama folder?")

    def rows(a: int, b: int) -> np.ndarray:
        with safe_open(str(f), "pt") as st:
            return st.get_slice(key)[a:b].float().numpy()

    return rows, (int(shape[0]), int(shape[1]))


def head_rows(folder: Path) -> tuple[Callable[[int, int], np.ndarray], tuple[int, int]]:
    """The LM head's rows (vocab, hidden): its own weight, or the embedding table it is tied to."""
    try:
        return tensor_rows(folder, HEAD_KEY)
    except CheckpointError:
        return tensor_rows(folder, EMBED_KEY)
