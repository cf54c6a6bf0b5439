"""The ProAssist model in PyTorch: vision tower -> frame tokens -> projector -> Llama, plus when-to-talk.

One file, in the spirit of nanoGPT: a frozen config, small modules, shape comments.
B = batch, N = frames, I = tokens per frame, C = vision width, H = LLM hidden, S = sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, SiglipVisionModel
from transformers.cache_utils import Cache

from proassist_edge.errors import ShapeMismatchError
from proassist_edge.manifest import DEFAULT_THRESHOLD

SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ProAssistConfig:
    """The ProAssist fields of a checkpoint's config.json (Llama fields live in the LLM's config)."""

    llm_pretrained: str
    vision_pretrained: str
    vision_hidden_size: int = 1152
    use_img_cls_token: bool = True
    img_patch_token_size: int = 0  # p: patch tokens pooled to p x p
    img_patch_token_layer: int = -2  # recorded, unused: the authors always take the last layer
    img_token: str = "<image>"
    img_sep_token: str = ""
    max_seq_len: int = 4096
    use_binary_decision_head: bool = False
    binary_decision_head_type: str = "linear"
    # the authors' ProActConfig default; their evaluation passes summarize_and_drop per run
    exceed_context_handling: str = "drop_all"
    llm_train_mode: str = "lora"
    vision_type: str = "siglip"  # ProAssist Edge extension: "siglip" | "mobilenet_v2"
    default_threshold: float = DEFAULT_THRESHOLD  # extension: the talk threshold chosen on validation data
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def tokens_per_frame(self) -> int:
        return int(self.use_img_cls_token) + self.img_patch_token_size**2

    @property
    def w2t_mode(self) -> str:
        return "head" if self.use_binary_decision_head else "lm"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProAssistConfig:
        known = {f.name for f in fields(cls)} - {"extra", "llm_train_mode"}
        kw = {k: d[k] for k in known if k in d}
        if d.get("img_sep_token") in (None, "none"):
            kw["img_sep_token"] = ""
        mode = (d.get("training_args") or {}).get("llm_train_mode", d.get("llm_train_mode", "lora"))
        return cls(**kw, llm_train_mode=mode, extra=d)


class VisionTower(nn.Module):
    """uint8 frames (N, h, w, 3) -> frame features (N, I, C): pooled token + p x p pooled patches."""

    def __init__(self, cfg: ProAssistConfig, backbone: nn.Module, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size = image_size
        self.use_cls = cfg.use_img_cls_token
        self.p = cfg.img_patch_token_size
        mean, std = IMAGENET_MEAN_STD if cfg.vision_type == "mobilenet_v2" else SIGLIP_MEAN_STD
        self.mean_std = (mean, std)  # constants, not buffers: a cast of the tower keeps them fp32

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """float32 whatever the tower's dtype: pixels, normalisation and resize."""
        x = frames.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, h, w)
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in self.mean_std)
        x = (x - mean) / std
        # The authors resize after normalising, bilinear on the tensor, no antialiasing.
        size = (self.image_size, self.image_size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(frames).to(self.dtype)  # the tower runs in its own dtype
        pooled, grid = self.features(x)  # (N, C), (N, C, g, g)
        tokens = [pooled[:, None]] if self.use_cls else []
        if self.p:
            patches = F.adaptive_avg_pool2d(grid, self.p)  # (N, C, p, p)
            tokens.append(patches.flatten(2).transpose(1, 2))  # (N, p*p, C)
        return torch.cat(tokens, dim=1)  # (N, I, C)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.backbone, SiglipVisionModel):
            out = self.backbone(pixel_values=x)
            # Patch tokens come from the last hidden state (after the final layer norm); for
            # SigLIP the authors keep every patch (start index 0).
            h = out.last_hidden_state  # (N, P, C)
            g = math.isqrt(h.shape[1])
            return out.pooler_output, h.transpose(1, 2).reshape(h.shape[0], h.shape[2], g, g)
        grid = self.backbone(x)  # (N, C, g, g) for CNN backbones
        return grid.mean(dim=(2, 3)), grid

    def grid_size(self) -> int:
        if isinstance(self.backbone, SiglipVisionModel):
            c: Any = self.backbone.config
            return int(c.image_size // c.patch_size)
        return int(getattr(self.backbone, "grid_size", 7))


def make_projector(c_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def make_decision_head(kind: str, hidden: int) -> nn.Module:
    if "linear" in kind:
        return nn.Linear(hidden, 1)
    return nn.Sequential(nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 1))


MULTIMODAL = ("mm_projector", "binary_decision_head")  # the modules ProAssist hangs on the LLM


def attach_multimodal_modules(llm: nn.Module, cfg: ProAssistConfig, hidden: int | None = None) -> None:
    """Hang the projector (and decision head) on the LLM, where the released adapters expect them
    (or on any module, given the LLM's hidden size)."""
    width = int(hidden or llm.config.hidden_size)  # type: ignore[union-attr, arg-type]
    llm.mm_projector = make_projector(cfg.vision_hidden_size, width)
    if cfg.use_binary_decision_head:
        llm.binary_decision_head = make_decision_head(cfg.binary_decision_head_type, width)


@dataclass
class StepOutput:
    logits: torch.Tensor  # (1, S', V): the last position only unless all positions were asked for
    p_not_talk: torch.Tensor  # (1, S')
    hidden: torch.Tensor  # (1, S', H)
    past: Cache


class ProAssistModel(nn.Module):
    def __init__(
        self, cfg: ProAssistConfig, vision: VisionTower, llm: LlamaForCausalLM, not_talk_id: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.llm = llm
        self.not_talk_id = not_talk_id
        self.vocab_size = llm.config.vocab_size
        self.check_shapes()

    @property
    def projector(self) -> nn.Sequential:
        return cast(nn.Sequential, self.llm.mm_projector)

    @property
    def decision_head(self) -> nn.Module | None:
        return cast(nn.Module | None, getattr(self.llm, "binary_decision_head", None))

    def check_shapes(self) -> None:
        hidden = self.llm.config.hidden_size
        first, last = cast(nn.Linear, self.projector[0]), cast(nn.Linear, self.projector[-1])
        if first.in_features != self.cfg.vision_hidden_size:
            raise ShapeMismatchError(
                "projector input width vs config vision_hidden_size",
                self.cfg.vision_hidden_size,
                first.in_features,
                "the projector was trained for another vision tower: fix vision_hidden_size "
                "or point --vision-from at the tower it was trained with",
            )
        tower_width = _tower_width(self.vision.backbone)
        if tower_width != self.cfg.vision_hidden_size:
            raise ShapeMismatchError(
                "vision tower hidden size vs config vision_hidden_size",
                self.cfg.vision_hidden_size,
                tower_width,
                "point --vision-from at the vision tower this checkpoint was trained with",
            )
        if last.out_features != hidden:
            raise ShapeMismatchError(
                "projector output width vs LLM hidden size",
                hidden,
                last.out_features,
                "point --llm-from at the LLM this checkpoint was trained on",
            )
        if self.cfg.img_patch_token_size > self.vision.grid_size():
            raise ShapeMismatchError(
                "pooled patch grid vs the vision tower's patch grid",
                self.vision.grid_size(),
                self.cfg.img_patch_token_size,
                "img_patch_token_size must not exceed the tower's grid: fix config.json",
            )

    # --- inputs -------------------------------------------------------------------------
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, h, w, 3) -> projected frame tokens (N, I, H), in the projector's dtype."""
        tokens = self.vision(frames)
        return self.projector(tokens.to(self.projector[0].weight.dtype))  # type: ignore[union-attr]

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        # The <image> placeholder id lies past the table: clamp, then overwrite (joint_embed).
        return self.llm.get_input_embeddings()(ids.clamp(max=self.vocab_size - 1))

    def joint_embed(
        self, ids: torch.Tensor, frame_tokens: torch.Tensor, img_id: int
    ) -> torch.Tensor:
        """ids (B, S) with I placeholders per frame, frame_tokens (F, I, H) -> embeds (B, S, H)."""
        embeds = self.embed_ids(ids)
        mask = ids == img_id
        embeds = embeds.clone()
        embeds[mask] = frame_tokens.reshape(-1, frame_tokens.shape[-1]).to(embeds.dtype)
        return embeds

    # --- the step ----------------------------------------------------------------------
    def forward(
        self, embeds: torch.Tensor, past: Cache | None = None, all_positions: bool = False
    ) -> StepOutput:
        embeds = embeds.to(self.llm.model.embed_tokens.weight.dtype)  # the LLM's own dtype
        out = self.llm.model(inputs_embeds=embeds, cache=past, use_cache=True)
        h = out.last_hidden_state if all_positions else out.last_hidden_state[:, -1:]  # (1, S', H)
        logits = self.llm.lm_head(h).float()
        if self.decision_head is not None:
            p = torch.sigmoid(self.decision_head(h).squeeze(-1).float())
        else:
            p = logits.softmax(-1)[..., self.not_talk_id]
        return StepOutput(logits, p, h, out.past_key_values)


def _tower_width(backbone: nn.Module) -> int:
    if isinstance(backbone, SiglipVisionModel):
        return int(backbone.config.hidden_size)
    return int(getattr(backbone, "out_channels", 0))
