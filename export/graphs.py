"""Export-ready modules: the vision graph and the portable decoder graph.

The portable decoder writes Llama's forward out in plain tensor ops (no cache objects, no custom
attention op) so that ONNX Runtime, TensorRT and any other standard runtime take it. Its weights
are the merged Hugging Face modules themselves; parity with LlamaForCausalLM is tested.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from proassist_edge.export.model import VisionTower


class VisionGraph(nn.Module):
    """uint8 frames (N, h, w, 3) -> projected frame tokens (N, I, H)."""

    def __init__(self, vision: VisionTower, projector: nn.Sequential) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        tokens = self.vision(frames)  # the tower's dtype
        first: Any = self.projector[0]
        return self.projector(tokens.to(first.weight.dtype)).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PortableDecoderModule(nn.Module):
    """The torch module that `decoder.onnx` is exported from (the runtime drives that graph with
    `runtime.backend.PortableDecoder`).

    (inputs_embeds (1, S, H), past k/v per layer (1, KVH, P, D)) ->
    (logits (1, 1, V), p_not_talk (1, 1), hidden (1, 1, H), present k/v (1, KVH, P+S, D)).

    Only the last position's logits are computed: the loop reads nothing else. The layers run
    in the weights' dtype (fp32, or fp16 for GPUs); inputs_embeds and the outputs but the KV are
    float32, and the rotary angles and tables always are (proassist-reference.md, Numerics).
    """

    def __init__(self, llm: Any, head: nn.Module | None, not_talk_id: int) -> None:
        super().__init__()
        c = llm.config
        self.layers: Any = llm.model.layers
        self.norm = llm.model.norm
        self.lm_head = llm.lm_head
        self.head = head
        self.not_talk_id = not_talk_id
        self.n_heads: int = c.num_attention_heads
        self.n_kv: int = c.num_key_value_heads or c.num_attention_heads
        self.head_dim: int = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        rot = llm.model.rotary_emb
        # RoPE frequencies stay fp32 in every precision (proassist-reference.md, Numerics).
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", rot.inv_freq.detach().float().clone(), persistent=False)
        self.attn_scale = float(getattr(rot, "attention_scaling", 1.0))

    def forward(self, embeds: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        S = embeds.shape[1]
        P = past[0].shape[2]
        pos = torch.arange(S, device=embeds.device, dtype=torch.float32) + P  # (S,)
        freqs = pos[:, None] * self.inv_freq[None, :]  # (S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attn_scale)[None, None]  # (1, 1, S, D)
        sin = (emb.sin() * self.attn_scale)[None, None]
        # causal mask over [past | new]: query i sees keys j <= P + i
        q_idx = torch.arange(S, device=embeds.device)[:, None] + P
        k_idx = torch.arange(P + S, device=embeds.device)[None, :]
        mask = torch.where(k_idx <= q_idx, 0.0, float("-inf"))[None, None]  # (1, 1, S, P+S)
        dtype = self.norm.weight.dtype
        x = embeds.to(dtype)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q = attn.q_proj(h).view(1, S, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, S, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, S, self.n_kv, self.head_dim).transpose(1, 2)
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)  # RoPE in float32
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
            k = torch.cat([past[2 * i], k], dim=2)  # (1, KVH, P+S, D)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            rep = self.n_heads // self.n_kv
            kk = k.repeat_interleave(rep, dim=1)
            vv = v.repeat_interleave(rep, dim=1)
            att = (q @ kk.transpose(-2, -1)).float() * (self.head_dim**-0.5) + mask  # (1, nh, S, P+S)
            y = F.softmax(att, dim=-1).to(dtype) @ vv  # (1, nh, S, D)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(1, S, -1))
            h = rms_norm(x, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        hidden = rms_norm(x[:, -1:], self.norm.weight, self.eps)  # (1, 1, H)
        logits = self.lm_head(hidden).float()  # (1, 1, V)
        if self.head is not None:
            p = torch.sigmoid(self.head(hidden).squeeze(-1).float())
        else:
            p = logits.softmax(-1)[..., self.not_talk_id]
        return (logits, p, hidden.float(), *presents)
