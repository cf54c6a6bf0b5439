"""`proassist-edge build-engine`: TensorRT engines for a bundle's portable graphs, built on the device.

Profiles come from the manifest (1 and I tokens per step, KV lengths 0..kv_capacity); the engine's
device and TensorRT version are written beside it and into `manifest.json` (`engines`), so a
runtime on another device or TensorRT version can refuse it (`check_engine_compat`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from proassist_edge.manifest import load_manifest, write_manifest


def add_build_engine_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-engine", help="build TensorRT engines on the device")
    p.add_argument("bundle", type=Path)
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 kernels (default)")
    precision.add_argument(
        "--int8", action="store_true", help="int8 (needs a QDQ graph: quantize --precision int8)"
    )
    p.add_argument("--workspace", type=int, default=2048, help="builder workspace in MB")
    p.set_defaults(func=run_build_engine)


def run_build_engine(args: argparse.Namespace) -> int:
    from proassist_edge.device.tensorrt import build_engine, optimization_profiles

    manifest = load_manifest(args.bundle)
    m = manifest.model
    # TensorRT takes the portable graph (standard ops); an int8 bundle's QDQ decoder when asked
    decoder = "decoder_qdq" if args.int8 and "decoder_qdq" in manifest.graphs else "decoder"
    # KV lengths up to the capacity a stream can need (a summary runs past max_seq_len)
    profiles = optimization_profiles(m.tokens_per_frame, m.kv_capacity or m.max_seq_len,
                                     m.num_layers, m.num_kv_heads, m.head_dim, m.hidden_size)
    out = args.bundle / f"{decoder}.engine"
    meta = build_engine(args.bundle / manifest.graphs[decoder].file, out, profiles, fp16=not args.int8,
                        int8=args.int8, workspace_mb=args.workspace,
                        timing_cache=args.bundle / "timing.cache")
    print(f"built {out} for {meta.get('device')} (TensorRT {meta.get('tensorrt')})")
    manifest.engines = {decoder: {"file": out.name, **meta}}  # the runtime checks it against the device
    write_manifest(args.bundle, manifest)
    return 0
