"""`proassist-edge build-engine`: TensorRT engines for a bundle's portable graphs, built on the device.

Profiles come from the manifest (1 and I tokens per step, KV lengths 0..kv_capacity; longer
appends are fed in chunks, runtime/trt_decoder.py). The engine is built beside the bundle, a
stream is replayed through it and through onnxruntime (device/engine_check.py), and only an
engine that agrees on every decision and reply token is moved in and listed in `manifest.json`
(`engines`, with its device and TensorRT version, so a runtime on another device or TensorRT
version can refuse it: `check_engine_compat`). Not yet run on a GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from proassist_edge.manifest import load_manifest


def add_build_engine_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-engine", help="build TensorRT engines on the device")
    p.add_argument("bundle", type=Path)
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true",
                           help="fp16 kernels, norms and softmax kept in fp32 (default)")
    precision.add_argument("--fp32", action="store_true", help="fp32 throughout")
    precision.add_argument(
        "--int8", action="store_true", help="int8 (needs a QDQ graph: quantize --precision int8)"
    )
    p.add_argument("--workspace", type=int, default=2048, help="builder workspace in MB")
    p.add_argument("--check-frames", type=int, default=24,
                   help="frames of the replay that must agree with onnxruntime (default 24)")
    p.set_defaults(func=run_build_engine)


def run_build_engine(args: argparse.Namespace) -> int:
    from proassist_edge.device.engine_check import compare_engine, record_engine
    from proassist_edge.device.tensorrt import build_engine, optimization_profiles
    from proassist_edge.runtime.bundle import open_bundle
    from proassist_edge.runtime.trt_decoder import engine_file_factory

    manifest = load_manifest(args.bundle)
    m = manifest.model
    # TensorRT takes the portable graph (standard ops); an int8 bundle's QDQ decoder when asked
    decoder = "decoder_qdq" if args.int8 and "decoder_qdq" in manifest.graphs else "decoder"
    # KV lengths up to the capacity a stream can need (a summary runs past max_seq_len)
    profiles = optimization_profiles(m.tokens_per_frame, m.kv_capacity or m.max_seq_len,
                                     m.num_layers, m.num_kv_heads, m.head_dim, m.hidden_size)
    built = args.bundle / f".{decoder}.engine.new"
    meta = build_engine(args.bundle / manifest.graphs[decoder].file, built, profiles,
                        fp16=not (args.int8 or args.fp32), int8=args.int8,
                        workspace_mb=args.workspace, timing_cache=args.bundle / "timing.cache")
    print(f"built {decoder} for {meta.get('device')} (TensorRT {meta.get('tensorrt')}); "
          f"replaying {args.check_frames} frames against onnxruntime")
    reference = open_bundle(args.bundle, decoder, use_engine=False)
    check = compare_engine(reference, engine_file_factory(built, meta["profiles"], manifest),
                           args.check_frames)
    out = record_engine(args.bundle, decoder, built, meta, check)  # refuses on a disagreement
    print(f"recorded {out}: {check.frames} frames, {check.talks} replies, {check.tokens} tokens "
          f"identical (max P(not talk) difference {check.max_p_diff:.2e})")
    return 0
