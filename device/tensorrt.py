"""TensorRT engines for the decoder: optimization profiles, build, and compatibility checks.

`tensorrt` is imported only by `build_engine` (and for its version); the shape
logic and the compatibility check are plain functions that run anywhere.
Engines are specific to the GPU, its compute capability and the TensorRT
version: build on the board and keep the metadata beside the engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proassist_edge.device.jetson import probe
from proassist_edge.errors import ExportError
from proassist_edge.runtime.engine import (
    ATTENTION_MASK,
    INPUTS_EMBEDS,
    EngineMismatchError,
    check_engine_compat,
    engine_identity,
    import_tensorrt,
    past_key_value_names,
)

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
# Room for a user message appended with a frame, on top of the frame tokens.
DEFAULT_MAX_STEP_TOKENS = 256


class EngineBuildError(ExportError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shape."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        shapes = {name: [list(s) for s in rows] for name, rows in self.shapes.items()}
        return {"name": self.name, "shapes": shapes}


def _profile(
    name: str,
    steps: tuple[int, int, int],
    pasts: tuple[int, int, int],
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    hidden: int,
    attention_mask: bool,
) -> Profile:
    # Each row is (min, opt, max); opt is the step the runtime takes most often.
    s_min, s_opt, s_max = steps
    p_min, p_opt, p_max = pasts
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {
        INPUTS_EMBEDS: ((1, s_min, hidden), (1, s_opt, hidden), (1, s_max, hidden)),
    }
    if attention_mask:
        # The mask covers past + new tokens, which the runtime keeps within the
        # cache length (p_max + 1), even where p_max + s_max would be larger.
        shapes[ATTENTION_MASK] = ((1, p_min + s_min), (1, p_opt + s_opt), (1, p_max + 1))
    for key in past_key_value_names(num_layers):
        shapes[key] = (
            (1, num_kv_heads, p_min, head_dim),
            (1, num_kv_heads, p_opt, head_dim),
            (1, num_kv_heads, p_max, head_dim),
        )
    return Profile(name, shapes)


def optimization_profiles(
    tokens_per_frame: int,
    max_seq_len: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    hidden: int,
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS,
    attention_mask: bool = False,
) -> list[Profile]:
    """Two profiles for the decoder: `decode` (1 new token) and `frame` (a frame's
    tokens, up to `max_step_tokens` to fit a user message), each with a past of
    0 .. max_seq_len - 1 tokens. Profile 0 is `decode`, profile 1 is `frame`. The portable
    decoder (the graph TensorRT takes) has no attention mask; `attention_mask` adds one for
    graphs that do."""
    if min(tokens_per_frame, num_layers, num_kv_heads, head_dim, hidden) < 1:
        raise ValueError("every size must be >= 1")
    if max_step_tokens < tokens_per_frame:
        raise ValueError(f"max_step_tokens {max_step_tokens} < tokens_per_frame {tokens_per_frame}")
    if max_seq_len <= max_step_tokens:
        raise ValueError(f"max_seq_len {max_seq_len} must exceed max_step_tokens {max_step_tokens}")
    dims = (num_layers, num_kv_heads, head_dim, hidden, attention_mask)
    past = (0, max_seq_len // 2, max_seq_len - 1)
    return [
        _profile("decode", (1, 1, 1), past, *dims),
        _profile("frame", (1, tokens_per_frame, max_step_tokens), past, *dims),
    ]


# Layers an fp16 build keeps in fp32: norms and softmax, and the pieces of an RMSNorm that the
# ONNX export decomposes (mean of squares, its square root and reciprocal): fp16's range
# overflows in x**2 and its precision loses the softmax's small probabilities.
FP32_KINDS = {"NORMALIZATION", "SOFTMAX", "REDUCE"}
FP32_OPS = {("UNARY", "SQRT"), ("UNARY", "RECIP"), ("ELEMENTWISE", "POW")}


def needs_fp32(kind: str, op: str = "") -> bool:
    """Whether a layer of TensorRT type `kind` (e.g. "SOFTMAX"; "UNARY" with op "SQRT") stays fp32."""
    return kind in FP32_KINDS or (kind, op) in FP32_OPS


def _layer_kind(layer: Any, trt: Any) -> tuple[str, str]:
    kind = str(layer.type).rsplit(".", 1)[-1]
    sub = {"UNARY": getattr(trt, "IUnaryLayer", None), "ELEMENTWISE": getattr(trt, "IElementWiseLayer", None)}
    cls = sub.get(kind)
    if cls is None:
        return kind, ""
    layer.__class__ = cls  # TensorRT's Python layers come as ILayer: downcast to read the op
    return kind, str(layer.op).rsplit(".", 1)[-1]


def keep_fp32(network: Any, trt: Any) -> list[str]:
    """Pin the layers `needs_fp32` names to fp32 (their precision and output types) in an fp16
    build; the builder must obey it (BuilderFlag.OBEY_PRECISION_CONSTRAINTS). Returns their names."""
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if needs_fp32(*_layer_kind(layer, trt)):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def engine_meta() -> dict[str, Any]:
    """What an engine built here depends on (`engine_identity`), and on Jetson the board's L4T /
    JetPack release, recorded beside the engine."""
    facts = probe()
    return {**engine_identity(str(facts.get("model") or "") if facts.get("jetson") else None),
            "l4t": facts.get("l4t"), "jetpack": facts.get("jetpack")}


def _network_inputs(network: Any) -> dict[str, tuple[int, ...]]:
    return {
        network.get_input(i).name: tuple(network.get_input(i).shape)
        for i in range(network.num_inputs)
    }


def _check_profiles(inputs: Mapping[str, tuple[int, ...]], profiles: Sequence[Profile]) -> None:
    dynamic = {name for name, shape in inputs.items() if any(d < 0 for d in shape)}
    for profile in profiles:
        unknown = set(profile.shapes) - set(inputs)
        missing = dynamic - set(profile.shapes)
        if unknown or missing:
            raise EngineBuildError(
                f"profile {profile.name!r} does not fit the graph: names not in the graph "
                f"{sorted(unknown)}, dynamic inputs without shapes {sorted(missing)}"
            )


def build_engine(
    onnx_path: str | Path,
    out_path: str | Path,
    profiles: Sequence[Profile],
    fp16: bool = True,
    int8: bool = False,
    workspace_mb: int = 2048,
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Build a serialized TensorRT engine from an ONNX graph; returns its metadata.

    The metadata (engine_meta plus profiles and precision) is also written to
    `out_path` + ".json" for `check_engine_compat`. `int8` expects an explicitly
    quantized (Q/DQ) graph. The graph must use standard ONNX ops: onnxruntime
    contrib ops (GroupQueryAttention, MatMulNBits) are not parsed by TensorRT.
    A `timing_cache` file is read if present and written back after the build.
    """
    trt = import_tensorrt()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) finds external weight files beside the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: " + " | ".join(errors))
    _check_profiles(_network_inputs(network), profiles)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    pinned: list[str] = []
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = keep_fp32(network, trt)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("fp16 build: %d norm, softmax and reduction layers kept in fp32", len(pinned))
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = b""
    if cache_path is not None and cache_path.is_file():
        cache_bytes = cache_path.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path}; see its log")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(memoryview(serialized)))
    if cache_path is not None:
        cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    meta = {
        **engine_meta(),
        "fp16": fp16,
        "int8": int8,
        "fp32_layers": len(pinned),
        "onnx": onnx_path.name,
        "profiles": [p.to_dict() for p in profiles],
    }
    meta_path = out_path.with_name(out_path.name + ".json")
    meta_path.write_text(json.dumps(meta, indent=2))
    log.info("wrote %s (%d bytes) and %s", out_path, out_path.stat().st_size, meta_path)
    return meta


__all__ = [
    "ATTENTION_MASK",
    "INPUTS_EMBEDS",
    "EngineBuildError",
    "EngineMismatchError",
    "Profile",
    "build_engine",
    "check_engine_compat",
    "engine_meta",
    "optimization_profiles",
    "past_key_value_names",
]
