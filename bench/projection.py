"""A projection on paper: the released 8B ProAssist (Llama-3.1-8B + SigLIP-so400m, 10 tokens per
frame) on Jetson Orin boards, from bytes and FLOPs per step and the boards' published figures.

At a few tokens per step the LLM is bandwidth-bound: a frame step (10 tokens) and a decode step
(1 token) both read every weight once, plus the KV cache of the context. The vision tower (729
patches) is compute-bound. Published runtimes reach 60-70% of the bandwidth bound (jetson.md);
every assumption is written into the result next to the figures it produced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GB = 1e9  # bandwidths and model sizes are quoted in decimal GB


@dataclass(frozen=True)
class Board:
    name: str
    bandwidth_gb_s: float  # published LPDDR5 bandwidth (jetson.md)
    memory_gb: float  # shared by CPU and GPU
    fp16_dense_tflops: float  # assumed GPU tensor throughput: published sparse INT8 TOPS / 4
    source: str


BOARDS = (
    Board("Jetson AGX Orin 64GB", 204.8, 64, 42.5,
          "204.8 GB/s (jetson.md); GPU 170 sparse INT8 TOPS (NVIDIA datasheet) / 4"),
    Board("Jetson Orin NX 16GB", 102.4, 16, 15.0,
          "102.4 GB/s (jetson.md); ~60 sparse INT8 GPU TOPS of the 100 TOPS module / 4 (assumed)"),
    Board("Jetson Orin Nano 8GB", 68.0, 8, 10.0,
          "68 GB/s (jetson.md); 40 sparse INT8 TOPS (NVIDIA datasheet) / 4"),
    Board("Jetson Orin Nano 8GB Super", 102.0, 8, 16.75,
          "102 GB/s in Super mode (jetson.md); 67 sparse INT8 TOPS / 4"),
)


# 8B-class int4 decode rates published for these boards (jetson.md), to hold the projection to
PUBLISHED = {
    "Jetson AGX Orin 64GB": "TRT Edge-LLM Qwen3-8B int4 AWQ 32.5 tok/s; llama.cpp Q4 8B ~25 tok/s",
    "Jetson Orin NX 16GB": "TRT Edge-LLM Qwen3-8B int4 19.0 tok/s",
    "Jetson Orin Nano 8GB": "MLC Llama-3.1-8B int4 14 tok/s",
    "Jetson Orin Nano 8GB Super": "MLC Llama-3.1-8B int4 19 tok/s",
}


@dataclass(frozen=True)
class ModelSpec:
    """Llama-3.1-8B + SigLIP-so400m-patch14-384 as in the released ProAssist checkpoints."""

    llm_params: float = 8.03e9
    llm_weight_bytes: float = 4.5 * GB  # int4 weights incl. scales and the fp16 embeddings/head
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    kv_bytes_per_elem: int = 2  # fp16 KV cache
    tokens_per_frame: int = 10  # I: 1 + 3x3 pooled tokens
    vision_params: float = 0.428e9
    vision_patches: int = 729  # (384 / 14)^2
    vision_layers: int = 27
    vision_width: int = 1152
    vision_weight_bytes: float = 0.428e9 * 2  # fp16
    max_context: int = 4096

    @property
    def kv_bytes_per_token(self) -> int:
        # K and V for every layer and KV head: 32 * 8 * 128 * 2 * 2 B = 128 KiB
        return self.layers * self.kv_heads * self.head_dim * 2 * self.kv_bytes_per_elem

    def llm_flops(self, tokens: int, context: int) -> float:
        attn = 2.0 * self.layers * self.heads * self.head_dim * context * 2
        return tokens * (2.0 * self.llm_params + attn)

    @property
    def vision_flops(self) -> float:
        p, w = self.vision_patches, self.vision_width
        attention = self.vision_layers * 2 * (2.0 * p * p * w)  # Q.K and P.V
        return 2.0 * self.vision_params * p + attention


@dataclass(frozen=True)
class Assumptions:
    context: int = 2048  # a typical context half way through the 4096 window
    efficiency: tuple[float, float] = (0.6, 0.7)  # published share of the bandwidth bound
    vision_utilization: float = 0.5  # of fp16 dense peak; see `notes`
    reply_tokens: int = 20  # a typical spoken ProAssist utterance
    runtime_overhead_gb: float = 1.0  # activations, graphs, Python, the OS's share


def _bound_ms(nbytes: float, flops: float, board: Board) -> tuple[float, str]:
    t_mem = nbytes / (board.bandwidth_gb_s * GB)
    t_flop = flops / (board.fp16_dense_tflops * 1e12)
    return 1e3 * max(t_mem, t_flop), "bandwidth" if t_mem >= t_flop else "compute"


def project_board(board: Board, m: ModelSpec, a: Assumptions) -> dict[str, Any]:
    lo_eff, hi_eff = a.efficiency
    kv = m.kv_bytes_per_token * a.context
    floor_ms = 1e3 * m.llm_weight_bytes / (board.bandwidth_gb_s * GB)
    dec_ms, dec_by = _bound_ms(m.llm_weight_bytes + kv, m.llm_flops(1, a.context), board)
    step_ms, step_by = _bound_ms(
        m.llm_weight_bytes + kv, m.llm_flops(m.tokens_per_frame, a.context), board
    )
    vision_ms = 1e3 * m.vision_flops / (board.fp16_dense_tflops * 1e12 * a.vision_utilization)
    vision_ms = max(vision_ms, 1e3 * m.vision_weight_bytes / (board.bandwidth_gb_s * GB))
    # expected = bound / efficiency: the worse end uses the lower efficiency
    dec = (dec_ms / hi_eff, dec_ms / lo_eff)
    step = (step_ms / hi_eff, step_ms / lo_eff)
    frame = (vision_ms + step[0], vision_ms + step[1])
    need_gb = (m.llm_weight_bytes + m.vision_weight_bytes + m.kv_bytes_per_token * m.max_context) / GB
    need_gb += a.runtime_overhead_gb
    return {
        "board": board.name,
        "bandwidth_gb_s": board.bandwidth_gb_s,
        "memory_gb": board.memory_gb,
        "fp16_dense_tflops_assumed": board.fp16_dense_tflops,
        "figures_from": board.source,
        "decode_floor_ms": floor_ms,  # weights only: the jetson.md bound
        "decode_bound_ms": dec_ms,
        "decode_bound_by": dec_by,
        "decode_ms_expected": list(dec),
        "tokens_per_s_expected": [1e3 / dec[1], 1e3 / dec[0]],
        "frame_step_bound_ms": step_ms,
        "frame_step_bound_by": step_by,
        "frame_step_ms_expected": list(step),
        "vision_ms_expected": vision_ms,
        "no_talk_frame_ms_expected": list(frame),
        "frames_per_s_capacity": [1e3 / frame[1], 1e3 / frame[0]],
        "meets_2fps": frame[1] <= 500.0,
        "ttft_ms_expected": [frame[0] + dec[0], frame[1] + dec[1]],
        "reply_ms_expected": [a.reply_tokens * dec[0], a.reply_tokens * dec[1]],
        "memory_needed_gb": need_gb,
        "fits_memory": need_gb <= 0.8 * board.memory_gb,  # leave the OS and camera their share
    }


def project(
    boards: tuple[Board, ...] = BOARDS, model: ModelSpec | None = None,
    assumptions: Assumptions | None = None,
) -> dict[str, Any]:
    """Per-board figures and every assumption behind them (for the bench JSON)."""
    m, a = model or ModelSpec(), assumptions or Assumptions()
    return {
        "model": {**asdict(m), "kv_bytes_per_token": m.kv_bytes_per_token,
                  "vision_flops_per_frame": m.vision_flops,
                  "llm_flops_per_frame_step": m.llm_flops(m.tokens_per_frame, a.context)},
        "assumptions": asdict(a),
        "notes": [
            "LLM steps are bandwidth-bound at 1-10 tokens: time >= (weight bytes + KV bytes of "
            "the context) / bandwidth, each weight read once per step",
            "expected = bound / efficiency, efficiency 60-70% as published runtimes reach "
            "(jetson.md: TRT Edge-LLM, MLC, llama.cpp)",
            "vision is compute-bound (729 patches): FLOPs / (fp16 dense peak x utilization); "
            "utilization 0.5 matches the published Qwen3-VL-8B vision time on AGX Orin "
            "(~1.2 TFLOP in 57 ms = ~21 TFLOPS of 42.5)",
            "fp16 dense peaks are assumed as published sparse INT8 TOPS / 4; the NX figure is "
            "the least certain",
            "published 8B int4 rates reach 71% (AGX), 83% (NX), 93% (Nano) and 84% (Nano "
            "Super) of the 4.5 GB weights-only bound: the 60-70% band is conservative there",
            "fits_memory: weights + fp16 vision tower + a full 4096-token KV cache + "
            "runtime overhead within 80% of the board's shared memory",
        ],
        "published_for_comparison": PUBLISHED,
        "boards": [project_board(b, m, a) for b in boards],
    }


def _rng(x: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(x[0])}-{fmt.format(x[1])}"


def markdown(projection: dict[str, Any]) -> str:
    """A README table of the projection."""
    a = projection["assumptions"]
    lines = [
        "| board | bandwidth | decode floor | decode (expected) | frame step (10 tok) | "
        "vision | frame total | 2 fps | memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in projection["boards"]:
        lines.append(
            f"| {b['board']} | {b['bandwidth_gb_s']:.1f} GB/s | {b['decode_floor_ms']:.0f} ms "
            f"| {_rng(b['decode_ms_expected'])} ms ({_rng(b['tokens_per_s_expected'])} tok/s) "
            f"| {_rng(b['frame_step_ms_expected'])} ms | {b['vision_ms_expected']:.0f} ms "
            f"| {_rng(b['no_talk_frame_ms_expected'])} ms | {'yes' if b['meets_2fps'] else 'no'} "
            f"| {b['memory_needed_gb']:.1f} of {b['memory_gb']:.0f} GB"
            f"{'' if b['fits_memory'] else ' (tight)'} |"
        )
    lo, hi = a["efficiency"]
    lines += [
        "",
        f"Projection on paper for Llama-3.1-8B int4 (~4.5 GB of weights) + SigLIP-so400m, "
        f"10 tokens per frame, at {a['context']} tokens of context (KV cache fp16, 128 KiB per "
        f"token). Decode and frame steps are bandwidth-bound: (weights + KV) / bandwidth, "
        f"divided by the {lo:.0%}-{hi:.0%} efficiency published runtimes reach. Vision: FLOPs at "
        f"{a['vision_utilization']:.0%} of an assumed fp16 peak. Replies of {a['reply_tokens']} "
        f"tokens add {a['reply_tokens']} decode steps after the decision. Not measured: build the "
        "engines on the board and run `proassist-edge bench` there.",
        "",
        "Published 8B int4 decode on these boards (jetson.md): "
        + "; ".join(f"{k}: {v}" for k, v in projection.get("published_for_comparison", {}).items())
        + ".",
    ]
    return "\n".join(lines)
