"""proassist-edge: the command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proassist_edge.errors import ProAssistEdgeError
from proassist_edge.fmt import human_bytes, table


# --- fixture -------------------------------------------------------------------------------
def add_fixture_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fixture", help="write a checkpoint in the released ProAssist layout "
                       "(small ones for tests, or a released model's shape)")
    p.add_argument(
        "kind", nargs="?", default="tiny", choices=["tiny", "smollm2"],
        help="tiny random model (default), or real SmolLM2-135M",
    )
    p.add_argument("--shape", choices=["llama-3.2-1b", "llama-3.1-8b"],
                   help="random bf16 weights with this model's real configuration and a "
                   "SigLIP-so400m-shaped tower, written with safetensors (2.5 + 0.9 GB for 1B, "
                   "16 + 0.9 GB for 8B; memory about the same)")
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument("--tokens-per-frame", type=int, default=5, choices=[1, 5, 10])
    p.add_argument("--w2t", default="lm", choices=["lm", "head-linear", "head-mlp"])
    p.add_argument(
        "--lora-rounds", type=int,
        help="earlier LoRA rounds before the top adapter (default 1; 0 with --shape)",
    )
    p.add_argument("--train-mode", default="lora", choices=["lora", "frozen", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-dim", type=int,
                   help="tiny only: attention head width (default 16; 8 is one GroupQueryAttention rejects)")
    p.set_defaults(func=run_fixture)


def run_fixture(args: argparse.Namespace) -> int:
    if args.shape:
        from proassist_edge.export.fixture import write_shape_checkpoint

        rounds = 0 if args.lora_rounds is None else args.lora_rounds
        ckpt = write_shape_checkpoint(args.out, args.shape, args.tokens_per_frame, args.w2t, rounds,
                                      args.train_mode, args.seed)
    elif args.kind == "smollm2":
        from proassist_edge.export.smollm import write_smollm2_checkpoint

        ckpt = write_smollm2_checkpoint(args.out, args.tokens_per_frame, args.w2t, args.seed)
    else:
        from proassist_edge.export.fixture import write_tiny_checkpoint

        rounds = 1 if args.lora_rounds is None else args.lora_rounds
        ckpt = write_tiny_checkpoint(
            args.out, args.tokens_per_frame, args.w2t, rounds, args.train_mode, args.seed,
            head_dim=args.head_dim,
        )
    print(f"checkpoint written: {ckpt}")
    return 0


# --- export --------------------------------------------------------------------------------
def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> verified ONNX bundle")
    p.add_argument("checkpoint", help="checkpoint folder (released layout) or a shipped model name")
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument(
        "--llm-from", type=Path, help="local folder of the base LLM (config's llm_pretrained)"
    )
    p.add_argument("--vision-from", type=Path, help="local folder of the vision tower")
    p.add_argument(
        "--max-seq-len", type=int, help="KV capacity of the bundle (default: the config's)"
    )
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--tokens-per-frame", type=int, help="expected tokens per frame (checked)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], default="fp32",
                   help="fp32 (default); fp16 for GPUs (fp16 graphs and table); int4 for CPUs "
                   "(the builder's decoder quantized to 4-bit blocks from the checkpoint's own "
                   "weights, no fp32 bundle); int8 (an fp32 bundle, then quantize, in one go). "
                   "Costs per precision: docs/export.md")
    p.add_argument("--vision-precision", choices=["fp32", "fp16"],
                   help="the vision graph's precision (default: fp16 for --precision fp16, else fp32)")
    p.add_argument("--portable-fp16", action="store_true",
                   help="write the portable decoder (TensorRT's input) in fp16 for a GPU target")
    p.add_argument("--variants", help="decoder variants to export, comma-separated: portable, "
                   "optimized (default: both; int4: optimized)")
    p.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128],
                   help="int4 block size (default 32, as quantize)")
    p.add_argument("--strict", action="store_true",
                   help="fp16/int4: fail (no bundle) when an accuracy target against PyTorch is "
                   "missed; by default the miss is recorded in verify.json and the manifest, as "
                   "quantize does (fp32 must always match)")
    p.add_argument("--no-resource-check", action="store_true",
                   help="skip the free memory and disk check against the estimate")
    p.add_argument("--verify", choices=["quick", "full", "none"], default="quick",
                   help="against PyTorch: quick (default; a short stream through one context "
                   "reset, replies capped at 8 tokens), full (300 frames at the bundle's own "
                   "context, 100-token replies) or none (not recommended)")
    p.add_argument("--verify-frames", type=int, help="frame cap of the verification stream")
    p.add_argument("--no-verify", action="store_true", help="the same as --verify none")
    p.add_argument("--json", type=Path, help="also write the summary (files, verification, "
                   "seconds and peak RSS per stage) to this file")
    p.add_argument("--threshold", type=float,
                   help="the manifest's default talk threshold (default: the checkpoint's, else 0.5)")
    p.add_argument("--prompt-file", type=Path,
                   help="ship the warm start for these openings (--warm): a .json object "
                   '{"system": ..., "knowledge": ...} or a list of them, or a text file of task '
                   "knowledge under the bundle's system prompt")
    p.set_defaults(func=run_export)


def resolve_checkpoint(name: str) -> Path:
    """A shipped model name (e.g. taskworld-tiny) or a folder."""
    if Path(name).exists():
        return Path(name)
    try:
        from proassist_edge.taskworld.models import shipped_checkpoint
    except ImportError:
        return Path(name)
    return shipped_checkpoint(name) or Path(name)


def run_export(args: argparse.Namespace) -> int:
    from proassist_edge.export.bundle import ExportOptions, export_bundle
    from proassist_edge.runtime.warm import read_prompt_file

    prompts = tuple(read_prompt_file(args.prompt_file)) if args.prompt_file else ()
    opts = ExportOptions(
        max_seq_len=args.max_seq_len,
        opset=args.opset,
        verify="none" if args.no_verify else args.verify,
        verify_frames=args.verify_frames,
        variants=tuple(args.variants.split(",")) if args.variants else None,
        threshold=args.threshold,
        precision=args.precision,
        vision_precision=args.vision_precision,
        portable_fp16=args.portable_fp16,
        block_size=args.block_size,
        check_resources=not args.no_resource_check,
        strict=args.strict,
        prompts=prompts,
    )
    quantizer = None
    if args.precision == "int8":  # export imports no quant: the CLI hands it over
        from proassist_edge.quant.quantize import quantize_bundle

        quantizer = quantize_bundle
    summary = export_bundle(
        resolve_checkpoint(args.checkpoint),
        args.out,
        args.llm_from,
        args.vision_from,
        opts,
        args.tokens_per_frame,
        quantizer,
    )
    print(table([(f, human_bytes(n)) for f, n in summary["files"].items()], ["file", "size"]))
    if summary["verify"]:
        v = summary["verify"]
        keys = [
            "max_abs_logit_diff",
            "logit_cosine",
            "max_abs_p_not_talk_diff",
            "p_not_talk_mae",
            "decision_agreement",
            "token_match_rate",
            "frames",
            "resets_reference",
            "reference_dtype",
        ]
        against = v.get("against") or f"PyTorch, {v.get('mode', '')}"
        print(table([(k, v[k]) for k in keys if k in v],
                    [f"verification at {summary['precision']} ({against}; worst decoder)", "value"]))
    stages = [(k, f"{r['seconds']:.1f}", human_bytes(int(r["peak_rss_bytes"])))
              for k, r in summary.get("stages", {}).items()]
    print(table(stages, ["stage", "seconds", "peak RSS so far"]))
    print(f"default decoder: {summary['default_decoder']}; bundle: {summary['bundle']}")
    if summary["verify"] and not summary["verify"].get("targets_met", True):
        misses = summary["verify"].get("misses") or summary["verify"]
        print(f"accuracy targets missed at {summary['precision']}: {misses}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


# --- the rest: each part registers its own subcommand ----------------------------------------
def _optional(
    register: Callable[[], Callable[[argparse._SubParsersAction], object]],
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
) -> None:
    # a part's parser may import what its extra brings (scipy for the metrics) before it adds
    # its subcommand: both the module and its parser builder are guarded
    try:
        register()(sub)
    except ImportError as e:
        p = sub.add_parser(name, help=f"{help} (unavailable: {e.name} not installed)")
        p.set_defaults(func=lambda a, e=e: _unavailable(name, e))


def _unavailable(name: str, e: ImportError) -> int:
    print(
        f"'{name}' is unavailable here: {e}. Install the matching extra (pip install 'proassist-edge[...]').",
        file=sys.stderr,
    )
    return 2


def run_train(args: argparse.Namespace) -> int:
    from proassist_edge.taskworld.train import main as train_main

    return train_main(list(args.args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proassist-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_fixture_parser(sub)
    add_export_parser(sub)

    def score() -> Callable:
        from proassist_edge.eval.score import add_score_parser

        return add_score_parser

    _optional(score, sub, "score", "score per-frame outputs with the paper's metrics")

    def quantize() -> Callable:
        from proassist_edge.cli.quant import add_quantize_parser

        return add_quantize_parser

    _optional(quantize, sub, "quantize", "int8 / int4 / fp16 bundle with a measured accuracy cost")

    def taskworld() -> Callable:
        from proassist_edge.taskworld.cli import add_taskworld_parser

        return add_taskworld_parser

    _optional(taskworld, sub, "taskworld", "generate task-world episodes")

    def evaluate() -> Callable:
        from proassist_edge.cli.eval import add_eval_parser

        return add_eval_parser

    _optional(evaluate, sub, "eval", "evaluate a bundle on a task-world split")

    def demo() -> Callable:
        from proassist_edge.bench.demo import add_demo_parser

        return add_demo_parser

    _optional(demo, sub, "demo", "the main job: a task-world episode end to end")

    def build_engine() -> Callable:
        from proassist_edge.device.engine_cli import add_build_engine_parser

        return add_build_engine_parser

    _optional(build_engine, sub, "build-engine", "build TensorRT engines on the device")

    # train needs torch: its options are parsed by its own module, imported only when it runs
    p = sub.add_parser("train", help="train a task-world checkpoint (tiny | lite); --help for options",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run_train)

    def bench() -> Callable:
        from proassist_edge.bench.cli_bench import add_bench_parser

        return add_bench_parser

    _optional(bench, sub, "bench", "latency benchmarks")
    from proassist_edge.cli.run import add_replay_parser, add_run_parser
    from proassist_edge.device.doctor import add_doctor_parser

    add_run_parser(sub)
    add_replay_parser(sub)
    add_doctor_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser (needs torch); argparse's REMAINDER drops leading options
        return run_train(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ProAssistEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
