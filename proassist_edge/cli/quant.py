"""`proassist-edge quantize`: parse, call quantize_bundle, print the side-by-side table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="int8 / int4 / fp16 bundle with a measured accuracy cost",
        description="Write a quantized child of an fp32 bundle, compared with it on the same streams "
        "(quant_report.json in the child).",
    )
    p.add_argument("bundle", type=Path, help="the fp32 parent bundle (proassist-edge export)")
    p.add_argument("-o", "--out", required=True, type=Path, help="new folder for the child bundle")
    p.add_argument("--precision", required=True, choices=["int8", "int4", "fp16"])
    p.add_argument("--calibration", default="synthetic", metavar="SOURCE",
                   help="'synthetic' (default) or a task-world split folder with episodes/*/frames.npy")
    p.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128],
                   help="int4 block size (default 32)")
    # 4 by default: on this CPU the SmolLM2 int4 decoder decoded at 21.7 ms/token with level 0 and
    # 11.2 with level 4, at the same logit cosine to fp32 (0.981), measured with `proassist-edge bench`
    p.add_argument("--accuracy-level", type=int, choices=range(5), metavar="N", default=4,
                   help="MatMulNBits compute precision: 0 onnxruntime's default, 1 fp32, 2 fp16, 3 bf16, "
                        "4 int8 (default: the fastest on CPU)")
    p.add_argument("--skip", action="append", default=[], choices=["vision", "decoder"],
                   help="keep this graph kind fp32 (repeatable)")
    p.add_argument("--keep-fp32", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="node-name or module-path patterns kept fp32, e.g. lm_head 'layers.3.' "
                   "(prefix 'vision:' or 'decoder:' to scope one)")
    p.add_argument("--keep-8bit", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="int4: give these nodes 8-bit weight blocks instead of 4, e.g. lm_head")
    p.add_argument("--eval", type=Path, metavar="DATA", help="task-world split: paper metrics for both")
    p.add_argument("--budget", choices=["quick", "standard", "thorough"], default="standard",
                   help="how much the comparison replays: quick (1 stream of 40 frames, no "
                   "sensitivity scan), standard (2 of 60; the other decoder variants on 20 frames), "
                   "thorough (3 of 120, every variant on every stream)")
    p.add_argument("--streams", type=int, help="streams to calibrate on and compare (the budget's)")
    p.add_argument("--frames", type=int, help="frames per stream (the budget's)")
    p.add_argument("--reply-tokens", type=int, default=16, help="reply cap while comparing (16)")
    p.add_argument("--embeddings", choices=["float32", "float16", "int8"],
                   help="embedding table dtype (default: int8 for int8/int4, float16 for fp16)")
    p.add_argument("--per-tensor", action="store_true",
                   help="per-tensor int8 weight scales (faster to quantize; per-channel is the default)")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="skip the per-layer scan when a target is missed")
    p.add_argument("--strict", action="store_true", help="exit 3 when an accuracy target is missed")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from proassist_edge.cli.eval import evaluate_with_content
    from proassist_edge.quant.quantize import quantize_bundle
    from proassist_edge.quant.report import render

    report = quantize_bundle(
        args.bundle, args.out, args.precision, calibration=args.calibration,
        block_size=args.block_size, accuracy_level=args.accuracy_level, skip=set(args.skip),
        keep_fp32=args.keep_fp32, eval_data=args.eval, streams=args.streams, frames=args.frames,
        embeddings=args.embeddings, reply_tokens=args.reply_tokens, per_channel=not args.per_tensor,
        sensitivity_on_miss=False if args.no_sensitivity else None, budget=args.budget,
        threads=args.threads, keep_8bit=args.keep_8bit,
        evaluator=evaluate_with_content,
    )
    print(render(report))
    print_eval(report.get("eval"))
    if isinstance(report.get("vision"), dict):
        v = report["vision"]
        print(f"vision ({v['precision']}): frame-token cosine {v['frame_token_cosine']:.4f}, "
              f"relative error {v['relative_error']:.3f}")
    if not report["targets_met"]:
        for name, misses in report["misses"].items():
            print(f"target missed by {name}: {'; '.join(misses)}", file=sys.stderr)
        parts = report.get("components")
        if parts:
            costs = ", ".join(f"{k} alone {parts[k]['decision_agreement']:.3f}" for k in parts["ranked"])
            print(f"decision agreement with one part quantized ({parts['graph']}): {costs}",
                  file=sys.stderr)
        if report.get("suggested_options"):
            print(f"rerun with: {' '.join(report['suggested_options'])}", file=sys.stderr)
    print(f"bundle: {report['bundle']} (report: quant_report.json)")
    return 3 if args.strict and not report["targets_met"] else 0


def print_eval(figures: object) -> None:
    """The paper's F1 of parent and child on --eval DATA, with the content score on a task-world split."""
    if not isinstance(figures, dict):
        return
    from proassist_edge.taskworld.content import content_line

    for side in ("parent", "child"):
        e = figures[side]
        extra = f"; {content_line(e['content'])}" if "content" in e else ""
        print(f"{side} on {e['data']}: F1 {e['F1']:.3f} (embedder {e['embedder']['name']}){extra}")
