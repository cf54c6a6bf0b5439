"""The model families that training drives (the presets, the tiny and lite trainees) and their
packing into the compact shipped files (`taskworld.models`). Why each preset is built as it is:
the docstring of `taskworld/train.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proassist_edge.export.model import (
    ProAssistConfig,
    ProAssistModel,
    VisionTower,
    attach_multimodal_modules,
)
from proassist_edge.runtime.conversation import ConversationInputs
from proassist_edge.runtime.prompt import PromptBuilder
from proassist_edge.taskworld.trainseq import used_token_ids


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int = 750
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    neg_rate: float = 0.5
    eos_drop: float = 0.5
    keep_after: int = 2  # silent frames after a reply that always keep their label (trainseq)
    window: int = 0  # frames per training sequence; 0 = the whole episode
    batch: int = 1  # sequences per optimizer step
    train_episodes: int = 400
    val_episodes: int = 3
    val_every: int = 250
    w2t: str = "lm"  # lm | head-linear | head-mlp
    hidden: int = 128  # tiny LLM width
    layers: int = 4
    vision_width: int = 64
    vision_layers: int = 2
    vision_patch: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    embed_init: float = 0.02  # tiny: std of the used embedding rows at the start (0: all zero)
    prompt_loss: int = 0  # 1: LM loss on the system prompt's tokens too (trainseq)
    text_only: float = 0.0  # probability of a frameless dialogue-only sequence (trainseq)
    text_batch: int = 1  # dialogue-only sequences per such step (they are short and cheap)
    history: int = 0  # 1: a window's earlier dialogue goes before it as text (trainseq)
    focus: float = 0.0  # probability that a window is drawn around a correction (trainseq)
    slip: float = 0.0  # probability that a correction is replaced by the model's slip (trainseq)
    correct_weight: float = 1.0  # LM-loss weight of corrections and the replies after them (trainseq)
    mistakes: int = 0  # extra train episodes, each with a wrong item placed (train.py)
    see: float = 0.0  # weight of the frames-only "name the item placed" lesson (seeing.py)
    see_layer: int = 0  # the decoder layer whose output that lesson reads (0: the last)
    ask: float = 0.0  # weight of the "was the item placed wrong?" lesson (seeing.py)
    ask_layer: int = 22  # the decoder layer whose output that lesson reads
    tie: int = 0  # tiny, 1: the LM head is the embedding table (train.py's docstring)


PRESETS = {
    # tiny: the dialogue-only steps (text_only, text_batch) and the tied head are what make it
    # read the task knowledge within 10 minutes (README, task world)
    "tiny": Preset("tiny", steps=4000, val_every=100000, val_episodes=0, prompt_loss=1, tie=1,
                   text_only=0.7, text_batch=4),
    "lite": Preset("lite", steps=300, lr=1e-3, warmup=20, window=24, train_episodes=24,
                   val_episodes=2, val_every=300),
}


LITE_LORA_TARGETS = r"model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def run_fields(preset: Preset, llm_dir: str, vision_dir: str, width: int, mode: str) -> dict[str, Any]:
    from proassist_edge.export.fixture import proassist_fields
    from proassist_edge.taskworld import SYSTEM_PROMPT

    d = proassist_fields(llm_dir, vision_dir, width, 5, preset.w2t, mode)
    d.pop("training_args")
    d.update(system_prompt=SYSTEM_PROMPT, exceed_context_handling="drop_middle")
    return d


class Trainee:
    """What the loop needs from a model family: ids as the model reads them, frame tokens,
    the LM head at chosen positions, an inference-ready model, and packing for shipping."""

    model: ProAssistModel
    tokenizer: Any
    chat: Any
    img_id: int  # ids in sequences are the tokenizer's
    not_talk_id: int
    model_img_id: int
    tokens_per_frame = 5

    def model_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.llm.lm_head(h)

    def freeze_modes(self) -> None:
        pass

    def num_frames(self, index: int) -> int:
        raise NotImplementedError

    def frame_tokens(self, index: int, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eval_model(self) -> tuple[ProAssistModel, Any, Any]:
        return self.model, self.tokenizer, self.chat

    def pack(self, path: Path, summary: dict[str, Any]) -> None:
        raise NotImplementedError

    def load(self, weights: Path) -> None:
        """Start from a packed run's weights (fine-tuning)."""
        raise NotImplementedError(f"{type(self).__name__} cannot start from packed weights")


def _tokenizer(path: Path) -> tuple[Any, Any, int, int]:
    from tokenizers import Tokenizer

    from proassist_edge.export.checkpoint import chat_format_for

    tok = Tokenizer.from_file(str(path))
    chat = chat_format_for(tok)
    tok.add_special_tokens(["<image>"])
    img, not_talk = tok.token_to_id("<image>"), tok.token_to_id(chat.not_talk)
    if img is None or not_talk is None:
        raise ValueError(f"{path}: the tokenizer lacks <image> or {chat.not_talk!r}")
    return tok, chat, img, not_talk


class TinyTrainee(Trainee):
    """From scratch, on a compact vocabulary: the used rows + one common row (train.py's docstring)."""

    def __init__(self, preset: Preset, convs: list[ConversationInputs], render: Any) -> None:
        from transformers import LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

        from proassist_edge.export.fixture import llama3_tokenizer_json, tiny_llama_config

        self.tokenizer, self.chat, self.img_id, self.not_talk_id = _tokenizer(llama3_tokenizer_json())
        self.render = render
        self._frames: dict[int, np.ndarray] = {}
        self.full_cfg = tiny_llama_config(hidden=preset.hidden, layers=preset.layers)
        vocab = self.full_cfg.vocab_size
        self.used = used_token_ids(PromptBuilder(self.tokenizer, self.chat), convs, self.not_talk_id)
        n_used = len(self.used)
        self.lookup = torch.full((max(vocab, self.img_id) + 1,), n_used, dtype=torch.long)
        self.lookup[self.used] = torch.arange(n_used)
        self.lookup[self.img_id] = self.model_img_id = n_used + 1  # past the table, as <image> is
        self.offset = torch.zeros(n_used + 1)
        self.offset[-1] = math.log(vocab - n_used)  # the common row stands for vocab - used rows
        compact_cfg = tiny_llama_config(hidden=preset.hidden, layers=preset.layers)
        compact_cfg.vocab_size = n_used + 1
        llm = LlamaForCausalLM(compact_cfg)
        with torch.no_grad():
            # the rows training sees start random (tokens tell apart from the first step, which a
            # zero start delays); the common row and an untied LM head start at zero
            llm.model.embed_tokens.weight.normal_(0.0, preset.embed_init)
            llm.model.embed_tokens.weight[-1].zero_()
            llm.lm_head.weight.zero_()
        if preset.tie:  # one parameter from here on (pack_tiny still writes both tables)
            llm.lm_head.weight = llm.model.embed_tokens.weight
        self.vcfg = SiglipVisionConfig(
            hidden_size=preset.vision_width, intermediate_size=preset.vision_width * 2,
            num_hidden_layers=preset.vision_layers, num_attention_heads=2, image_size=64,
            patch_size=preset.vision_patch,
        )
        self.vision = SiglipVisionModel(self.vcfg)
        self.fields = run_fields(preset, "base_llm", "base_vision", preset.vision_width, "full")
        self.cfg = ProAssistConfig.from_json(self.fields)
        attach_multimodal_modules(llm, self.cfg)
        self.model = ProAssistModel(self.cfg, VisionTower(self.cfg, self.vision, 64), llm,
                                    int(self.lookup[self.not_talk_id]))

    def frames(self, index: int) -> np.ndarray:
        if index not in self._frames:
            self._frames[index] = self.render(index)
        return self._frames[index]

    def num_frames(self, index: int) -> int:
        return int(self.frames(index).shape[0])

    def model_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup[ids]

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.llm.lm_head(h) + self.offset

    def frame_tokens(self, index: int, frames: torch.Tensor) -> torch.Tensor:
        if not len(frames):  # a dialogue-only sequence
            return torch.zeros(0, self.tokens_per_frame, self.model.llm.config.hidden_size)
        return self.model.encode_frames(torch.from_numpy(self.frames(index)[frames.numpy()]))

    def full_llm(self) -> Any:
        """The full-vocabulary LLM this compact one stands for (shares nothing mutable)."""
        from transformers import LlamaForCausalLM

        from proassist_edge.taskworld.models import full_table, split_rows

        compact = self.model.llm
        state = {k: v for k, v in compact.state_dict().items()
                 if not k.startswith(("mm_projector.", "binary_decision_head."))}
        vocab = self.full_cfg.vocab_size
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            state[key] = full_table(**split_rows(state[key], self.used), vocab=vocab)
        full = LlamaForCausalLM(self.full_cfg)
        full.load_state_dict(state, strict=True)
        full.mm_projector = compact.mm_projector
        if self.model.decision_head is not None:
            full.binary_decision_head = self.model.decision_head
        return full

    def eval_model(self) -> tuple[ProAssistModel, Any, Any]:
        model = ProAssistModel(self.cfg, self.model.vision, self.full_llm(), self.not_talk_id)
        return model, self.tokenizer, self.chat

    def pack(self, path: Path, summary: dict[str, Any]) -> None:
        from proassist_edge.taskworld.models import pack_tiny

        meta = {"llm_config": self.full_cfg.to_dict(), "vision_config": self.vcfg.to_dict(),
                "proassist": self.fields, "training": summary}
        pack_tiny(path, self.model.llm, self.vision, self.used, meta)


class LiteTrainee(Trainee):
    """SmolLM2-135M-Instruct + LoRA, frozen MobileNetV2 whose features are computed once."""

    def __init__(self, preset: Preset, convs: list[ConversationInputs], render: Any) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        from proassist_edge.export.mobilenet import load_mobilenet_v2, write_mobilenet_v2_dir
        from proassist_edge.export.smollm import smollm2_llm_dir
        from proassist_edge.paths import cache_dir

        llm_dir = smollm2_llm_dir()
        self.tokenizer, self.chat, self.img_id, self.not_talk_id = _tokenizer(llm_dir / "tokenizer.json")
        self.model_img_id = self.img_id
        self.render = render
        self._features: dict[int, torch.Tensor] = {}
        self.feature_dir = cache_dir() / "taskworld-features"
        vis_dir = write_mobilenet_v2_dir(cache_dir() / "mobilenet_v2")
        backbone, size = load_mobilenet_v2(vis_dir)
        llm = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
        self.fields = run_fields(preset, str(llm_dir), str(vis_dir), backbone.out_channels, "lora")
        self.fields["vision_type"] = "mobilenet_v2"
        self.cfg = ProAssistConfig.from_json(self.fields)
        attach_multimodal_modules(llm, self.cfg)
        self.model = ProAssistModel(self.cfg, VisionTower(self.cfg, backbone, size), llm,
                                    self.not_talk_id)
        saved = ["mm_projector"] + (["binary_decision_head"] if preset.w2t != "lm" else [])
        lcfg = LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=0.05,
                          target_modules=LITE_LORA_TARGETS, modules_to_save=saved)
        self.peft = get_peft_model(llm, lcfg)
        for p in self.model.vision.parameters():
            p.requires_grad_(False)

    def freeze_modes(self) -> None:
        self.model.vision.eval()  # BatchNorm keeps its ImageNet statistics

    def features(self, index: int) -> torch.Tensor:
        """MobileNetV2 tokens (N, I, 1280) of a training episode, cached on disk."""
        import hashlib

        if index not in self._features:
            frames = self.render(index)
            key = hashlib.sha256(frames.tobytes()).hexdigest()[:16]
            path = self.feature_dir / f"{key}.pt"
            if path.is_file():
                feats = torch.load(path, weights_only=True)
            else:
                self.model.vision.eval()
                with torch.no_grad():
                    feats = torch.cat([self.model.vision(torch.from_numpy(frames[i : i + 16]))
                                       for i in range(0, len(frames), 16)])
                self.feature_dir.mkdir(parents=True, exist_ok=True)
                torch.save(feats, path)
            self._features[index] = feats
        return self._features[index]

    def num_frames(self, index: int) -> int:
        return int(self.features(index).shape[0])

    def frame_tokens(self, index: int, frames: torch.Tensor) -> torch.Tensor:
        return self.model.projector(self.features(index)[frames])

    def pack(self, path: Path, summary: dict[str, Any]) -> None:
        import tempfile

        from proassist_edge.taskworld.models import pack_lite

        with tempfile.TemporaryDirectory() as tmp:
            self.peft.save_pretrained(tmp)
            pack_lite(path, Path(tmp), {"proassist": self.fields, "training": summary})

    def load(self, weights: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        result: Any = set_peft_model_state_dict(self.peft, state)
        if extra := list(result.unexpected_keys):
            raise ValueError(f"{weights}: tensors the lite model does not have: {extra[:3]}")
