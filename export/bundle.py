"""Checkpoint -> verified bundle. Writes into a temporary folder and renames it into place only
after verification passed, so a failure never leaves a half-written bundle behind."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from proassist_edge.errors import ExportError, ToleranceError
from proassist_edge.export import resources
from proassist_edge.export.checkpoint import (
    CheckpointInfo,
    PlainLLM,
    open_checkpoint,
    write_plain_llm,
)
from proassist_edge.export.decoders import (
    check_decoders_run,
    choose_default,
    decoder_names,
    leave_out,
    left_out_note,
    portable_decoders,
)
from proassist_edge.export.onnx_export import BuilderOptions
from proassist_edge.export.parts import (
    cpu_decoders,
    ep_decoders,
    load_reference,
    say,
    write_embeddings,
    write_graphs,
)
from proassist_edge.export.precision import PrecisionPlan, plan_precision
from proassist_edge.export.verify import Tolerance, compare_bundle, reference
from proassist_edge.manifest import (
    GraphEntry,
    Manifest,
    ModelFacts,
    load_manifest,
    sha256_file,
    write_manifest,
)
from proassist_edge.progress import Stages
from proassist_edge.runtime.prompt import StreamSettings
from proassist_edge.runtime.providers import candidates, default_ep
from proassist_edge.runtime.warm import WarmPrompt, ship_warm

# (fp32 parent, child folder, precision) -> the child's quant report: quantize_bundle, which the
# caller passes in (export does not import quant: docs/architecture.md)
Quantizer = Callable[[Path, Path, str], dict[str, Any]]

DEFAULT_SYSTEM = (
    "You are a helpful assistant that watches the user through their smart glasses and "
    "guides them through the task step by step. Speak only when needed."
)


@dataclass(frozen=True)
class ExportOptions:
    """`verify`: "quick" (the default: a stream that ends a few frames after its first context
    reset, reached early by a small context, replies capped short), "full" (a long stream at the
    bundle's own context and reply caps) or "none". `verify_frames` and `max_reply_tokens` are
    the mode's caps unless given. `precision` and the graph options: export/precision.py."""

    max_seq_len: int | None = None
    opset: int = 18
    verify: str | bool = "quick"  # True means "quick", False "none"
    verify_frames: int | None = None
    variants: tuple[str, ...] | None = None  # None: the precision's (int4: optimized only)
    max_reply_tokens: int | None = None
    threshold: float | None = None  # the manifest's default (else the checkpoint's, else 0.5)
    tolerance: Tolerance | None = None  # None: the precision's (export/precision.py)
    precision: str = "fp32"  # fp32 | fp16 | int8 | int4 (export/precision.py)
    vision_precision: str | None = None  # fp32 | fp16; None: fp16 for fp16, else fp32
    portable_fp16: bool = False  # the portable decoder (TensorRT's input) in fp16
    block_size: int = 32  # int4 blocks
    accuracy_level: int = 4  # int4 MatMulNBits compute (4: int8, the quantize CLI's default)
    check_resources: bool = True  # free memory and disk checked against the estimate first
    strict: bool = False  # fp16/int4: a missed accuracy target fails the export (fp32 always does)
    # --prompt-file: openings whose warm-start KV ships in the bundle (runtime/warm.py)
    prompts: tuple[WarmPrompt, ...] = ()

    @property
    def verify_mode(self) -> str:
        mode = self.verify if isinstance(self.verify, str) else ("quick" if self.verify else "none")
        if mode not in VERIFY_MODES:
            raise ExportError(f"verify mode {self.verify!r}: choose one of {', '.join(VERIFY_MODES)}")
        return str(mode)


VERIFY_MODES = ("quick", "full", "none")
# The quick check: a context of 512 positions whose reduction (at 384, drop_middle keeping the
# last 256) comes after ~60 frames of a 5-token-per-frame model, replies and summaries capped,
# and the stream ends 8 frames after the first reset: the reset path runs, at a fraction of the
# cost of 300 frames with 100-token replies (`--verify full`).
QUICK = {"max_seq_len": 512, "drop_middle_tail": 256, "max_reply_tokens": 8,
         "max_summary_tokens": 16, "frames": 240, "after_reset": 8}
FULL_FRAMES, FULL_REPLY_TOKENS = 300, 100


def verify_settings(opts: ExportOptions, facts: ModelFacts) -> tuple[StreamSettings, int, int | None]:
    """The verification stream's settings, its frame cap, and frames after the first reset."""
    if opts.verify_mode == "full":
        settings = StreamSettings(
            context_strategy=facts.context_strategy, max_seq_len=facts.max_seq_len,
            max_reply_tokens=opts.max_reply_tokens or FULL_REPLY_TOKENS,
            threshold=facts.default_threshold,
        )
        return settings, opts.verify_frames or FULL_FRAMES, None
    settings = StreamSettings(
        context_strategy=facts.context_strategy,
        max_seq_len=min(QUICK["max_seq_len"], facts.max_seq_len),
        drop_middle_tail=QUICK["drop_middle_tail"],
        max_reply_tokens=opts.max_reply_tokens or QUICK["max_reply_tokens"],
        max_summary_tokens=QUICK["max_summary_tokens"],
        threshold=facts.default_threshold,
    )
    return settings, opts.verify_frames or QUICK["frames"], QUICK["after_reset"]


def model_facts(
    info: CheckpointInfo, llm_config: Any, image_size: int, max_seq_len: int, system: str,
    threshold: float | None = None,
) -> ModelFacts:
    c = llm_config  # transformers' configs are loosely typed
    tok, cfg = info.tokenizer, info.config
    bos = tok.token_to_id(info.chat.bos) if info.chat.bos else None
    capacity = StreamSettings(max_seq_len=max_seq_len).kv_capacity  # the manifest's caps
    return ModelFacts(
        tokens_per_frame=cfg.tokens_per_frame,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_kv_heads=c.num_key_value_heads,
        head_dim=head_dim(c),
        vocab_size=c.vocab_size,
        max_seq_len=max_seq_len,
        image_size=image_size,
        w2t_mode=cfg.w2t_mode,
        default_threshold=cfg.default_threshold if threshold is None else threshold,
        not_talk_id=info.not_talk_id,
        eos_id=int(tok.token_to_id(info.chat.eos) or 0),
        bos_id=bos,
        img_token_id=info.img_token_id,
        sep_token_id=info.not_talk_id if cfg.img_sep_token else None,
        kv_capacity=capacity,
        context_strategy=cfg.exceed_context_handling,
        system_prompt=system,
        chat=info.chat.to_dict(),
    )


def head_dim(c: Any) -> int:
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def export_bundle(
    ckpt: str | Path,
    out: str | Path,
    llm_from: str | Path | None = None,
    vision_from: str | Path | None = None,
    options: ExportOptions | None = None,
    tokens_per_frame: int | None = None,
    quantizer: Quantizer | None = None,
) -> dict[str, Any]:
    """Export CKPT into the bundle folder OUT (which must not exist). Returns the summary.

    int8 exports an fp32 bundle into a temporary folder and hands it to `quantizer` (the CLI
    passes quantize_bundle), which writes OUT; the fp32 bundle is removed."""
    opts = options or ExportOptions()
    mode = opts.verify_mode  # a bad mode or precision fails before any work
    plan = plan_precision(opts.precision, opts.variants, opts.vision_precision, opts.portable_fp16)
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists: choose a new folder or remove it first")
    if plan.via_fp32_bundle:
        return _through_quantize(ckpt, out, llm_from, vision_from, opts, tokens_per_frame, quantizer)
    info = open_checkpoint(ckpt, llm_from, vision_from, tokens_per_frame)
    checked = _check_resources(info, plan, opts, out) if opts.check_resources else {}
    steps = Stages(6 + bool(plan.optimized) + bool(plan.portable), "export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work.", dir=out.parent))
    try:
        steps.stage("merging LoRA adapters" if info.rounds else "LLM weights")
        plain = write_plain_llm(info, work)
        steps.update()
        builder = BuilderOptions(plan.optimized or "fp32", opts.block_size, opts.accuracy_level)

        def optional_failed(name: str, e: ExportError) -> str:
            why = left_out_note(name, "onnxruntime-genai's builder could not build it", e,
                                head_dim(_llm_config(plain)), "decoder")
            say(why)
            return why

        written = write_graphs(info, plain, tmp, work, plan, opts.opset, steps, builder,
                               optional_failed)
        graphs, left_out = written.graphs, written.left_out
        steps.stage("embeddings, tokenizer")
        emb, emb_files = write_embeddings(plain, tmp, plan.table)
        shutil.copy(info.tokenizer_path, tmp / "tokenizer.json")
        steps.update()
        steps.stage("manifest, decoders' first run")
        max_len = opts.max_seq_len or info.config.max_seq_len
        system = str(info.config.extra.get("system_prompt", DEFAULT_SYSTEM))
        facts = model_facts(info, _llm_config(plain), written.image_size, max_len, system,
                            opts.threshold)
        source = {"checkpoint": str(Path(ckpt).resolve()), "llm": str(info.llm_dir),
                  "vision": str(info.vision_dir)}
        if plan.precision != "fp32":
            source["precision"] = plan.precision
        manifest = Manifest(
            model=facts,
            graphs=graphs,
            files={"tokenizer.json": sha256_file(tmp / "tokenizer.json"), **emb_files,
                   **{f: sha256_file(tmp / f) for f in data_files(graphs)}},
            embeddings=emb,
            source=source,
            notes=[n for _, n in left_out] + precision_notes(plan),
        )
        left_out += check_decoders_run(tmp, manifest)
        resources.release()
        steps.update()
        if mode != "none":
            steps.stage(f"verifying against PyTorch ({mode})")
            report, dropped = verify_decoders(info, plain, tmp, manifest, opts, plan, system)
            left_out += dropped
            (tmp / "verify.json").write_text(json.dumps(report, indent=2))
            manifest.verify = {k: v for k, v in report.items() if k != "decoders"}
        steps.update()
        manifest.default_decoder, note = choose_default(
            tmp, manifest, cpu_decoders(manifest.graphs), steps, [name for name, _ in left_out]
        )
        manifest.notes.append(note)
        manifest.ep_decoders = ep_decoders(manifest.graphs)  # the GPU providers' decoders
        steps.stage("writing, warm start" if opts.prompts else "writing")
        write_manifest(tmp, manifest)
        ship_warm(tmp, manifest, opts.prompts)  # verified graphs, still in the temporary folder
        steps.update()
        steps.close()
        tmp.chmod(0o755)  # mkdtemp made it 0700: the bundle is read by whoever runs it
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        steps.close()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**summarize(out, manifest), "precision": plan.precision, "resources": checked,
            **steps.summary()}


def _llm_config(plain: PlainLLM) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(plain.folder))


def precision_notes(plan: PrecisionPlan) -> list[str]:
    if plan.precision == "fp32" and plan.vision == "fp32" and plan.portable in (None, "fp32"):
        return []
    graphs = ", ".join(f"{k} {v}" for k, v in plan.graph_precisions().items())
    return [f"exported at {plan.precision} from the checkpoint ({graphs}; embeddings {plan.table})"]


def _check_resources(
    info: CheckpointInfo, plan: PrecisionPlan, opts: ExportOptions, out: Path
) -> dict[str, int]:
    from transformers import AutoConfig

    c: Any = AutoConfig.from_pretrained(str(info.weights_dir))
    llm = resources.folder_weights(info.weights_dir)
    adapters = sum(resources.folder_weights(d).bytes for d in info.rounds)
    ref = 4.0 if plan.reference_dtype == "float32" else llm.bytes_per_param
    needs = resources.estimate(resources.Plan(
        llm, resources.folder_weights(info.vision_dir), int(c.vocab_size), int(c.hidden_size),
        plan.precision, plan.vision, plan.portable, plan.optimized is not None, bool(info.rounds),
        adapters, opts.verify_mode != "none", ref,
    ))
    return resources.check(needs, out, f"exporting {info.path.name} at {plan.precision}")


def _through_quantize(
    ckpt: str | Path, out: Path, llm_from: str | Path | None, vision_from: str | Path | None,
    opts: ExportOptions, tokens_per_frame: int | None, quantizer: Quantizer | None,
) -> dict[str, Any]:
    """int8: the fp32 bundle (verified) in a temporary folder, quantized into OUT."""
    if quantizer is None:
        raise ExportError("int8 is made by quantize from an fp32 bundle: pass quantizer="
                          "proassist_edge.quant.quantize.quantize_bundle (the CLI does), or export "
                          "fp32 and run proassist-edge quantize --precision int8")
    checked = {}
    if opts.check_resources:
        info = open_checkpoint(ckpt, llm_from, vision_from, tokens_per_frame)
        plan = plan_precision("int8", opts.variants)
        checked = _check_resources(info, plan, opts, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32.", dir=out.parent) as tmp:
        fp32 = replace(opts, precision="fp32", check_resources=False, prompts=())
        summary = export_bundle(ckpt, Path(tmp) / "fp32", llm_from, vision_from, fp32,
                                tokens_per_frame)
        t0 = time.perf_counter()
        report = quantizer(Path(tmp) / "fp32", out, "int8")
    if not report.get("targets_met", True):
        say(f"int8 missed its targets ({report.get('misses')}): see {out}/quant_report.json")
    stages = {**summary["stages"], "int8 quantization": {
        "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": report.get("peak_rss_bytes", 0)}}
    manifest = load_manifest(out, verify=False)
    # the fp32 parent was a temporary folder: say so where quantize named it
    manifest.source["parent"] = "a temporary fp32 bundle (export --precision int8), removed"
    write_manifest(out, manifest)
    # quantize's child carries no warm start (its KV is the int8 decoder's): computed for it here,
    # each entry written aside and renamed into OUT/warm, listed when the manifest is rewritten
    ship_warm(out, manifest, opts.prompts)
    return {**summarize(out, manifest), "precision": "int8", "resources": checked,
            "fp32_verify": summary["verify"], "stages": stages,
            "peak_rss_bytes": max(summary["peak_rss_bytes"], report.get("peak_rss_bytes", 0))}


def verify_decoders(
    info: CheckpointInfo,
    plain: PlainLLM,
    root: Path,
    manifest: Manifest,
    opts: ExportOptions,
    plan: PrecisionPlan,
    system: str,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The bundle against the PyTorch model: the model is loaded (float32, or the checkpoint's
    dtype for fp16/int4: plan.reference_dtype), runs the reference once, and is freed before
    any bundle graph is loaded. When the decoders fail together and the portable ones pass
    alone, the optional ones are left out with the reason; a portable mismatch fails the
    export."""
    decoders = decoder_names(manifest)
    manifest.default_decoder = decoders[0]  # provisional: vision_diff opens the default
    write_manifest(root, manifest)
    settings, frames, after_reset = verify_settings(opts, manifest.model)
    ck = load_reference(info, plain, plan.reference_dtype)
    ref = reference(ck, settings, frames, system, after_reset=after_reset, progress=True)
    del ck
    resources.release()  # the reference's weights go before the bundle's sessions load
    tol = opts.tolerance or plan.tolerance
    # fp32 must match PyTorch (a miss is a bug); a lossy precision's miss is the model's cost,
    # recorded and reported as quantize does, and fails the export only when strict
    strict = plan.precision == "fp32" or opts.strict

    def verify(names: list[str]) -> dict[str, Any]:
        report = compare_bundle(ref, root, names, tol, strict)
        if not report["targets_met"]:
            note = (f"{plan.precision} missed its accuracy targets against PyTorch: "
                    f"{'; '.join(report['misses'])} (verify.json; quantize's sensitivity scan "
                    "names the layers that cost it: export fp32, then quantize)")
            say(note)
            manifest.notes.append(note)
        # the provider the decoders ran on (export's verification needs no GPU: a CUDA graph
        # is checked on the CPU EP's kernels, and on a GPU by scripts/gpu_check.sh)
        ep = candidates(default_ep())[0]
        return {"mode": opts.verify_mode, "precision": plan.precision, "execution_provider": ep,
                **report}

    try:
        return verify(decoders), []
    except Exception as e:  # a mismatch (ToleranceError) or an optional graph failing mid-stream
        portable = portable_decoders(manifest)
        optional = [d for d in decoders if d not in portable]
        if not portable or not optional:
            raise
        first = e
    manifest.default_decoder = portable[0]
    write_manifest(root, manifest)
    report = verify(portable)  # raises when the portable decoder itself does not match
    dropped = []
    for name in optional:  # one optional variant today: the failure was its own
        stage = (
            "it does not match the PyTorch model"
            if isinstance(first, ToleranceError)
            else "it failed while being verified"
        )
        why = left_out_note(name, stage, first, manifest.model.head_dim, portable[0])
        leave_out(root, manifest, name, why)
        dropped.append((name, why))
    write_manifest(root, manifest)
    return report, dropped


def data_files(graphs: dict[str, GraphEntry]) -> list[str]:
    return [d for g in graphs.values() for d in g.data_files]


def summarize(out: Path, manifest: Manifest) -> dict[str, Any]:
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {
        "bundle": str(out),
        "files": files,
        "verify": manifest.verify,
        "default_decoder": manifest.default_decoder,
        "notes": manifest.notes,  # why the default, and any decoder left out
    }
