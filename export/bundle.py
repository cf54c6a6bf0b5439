"""Checkpoint -> verified bundle. Writes into a temporary folder and renames it into place only
after verification passed, so a failure never leaves a half-written bundle behind."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from proassist_edge.errors import ExportError, ToleranceError
from proassist_edge.export.checkpoint import LoadedCheckpoint, load_checkpoint
from proassist_edge.export.onnx_export import (
    GraphSpec,
    build_optimized_decoder,
    export_head,
    export_portable_decoder,
    export_vision,
)
from proassist_edge.export.verify import Tolerance, verify_bundle
from proassist_edge.manifest import GraphEntry, Manifest, ModelFacts, sha256_file, write_manifest
from proassist_edge.progress import Stages
from proassist_edge.runtime.backend import Decoder
from proassist_edge.runtime.prompt import StreamSettings

DEFAULT_SYSTEM = (
    "You are a helpful assistant that watches the user through their smart glasses and "
    "guides them through the task step by step. Speak only when needed."
)


@dataclass(frozen=True)
class ExportOptions:
    """`verify`: "quick" (the default: a stream that ends a few frames after its first context
    reset, reached early by a small context, replies capped short), "full" (a long stream at the
    bundle's own context and reply caps) or "none". `verify_frames` and `max_reply_tokens` are
    the mode's caps unless given."""

    max_seq_len: int | None = None
    opset: int = 18
    verify: str | bool = "quick"  # True means "quick", False "none"
    verify_frames: int | None = None
    variants: tuple[str, ...] = ("portable", "optimized")
    max_reply_tokens: int | None = None
    threshold: float | None = None  # the manifest's default (else the checkpoint's, else 0.5)
    tolerance: Tolerance | None = None

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
    ck: LoadedCheckpoint, max_seq_len: int, system: str, threshold: float | None = None
) -> ModelFacts:
    c: Any = ck.model.llm.config  # transformers' configs are loosely typed
    tok = ck.tokenizer
    bos = tok.token_to_id(ck.chat.bos) if ck.chat.bos else None
    capacity = StreamSettings(max_seq_len=max_seq_len).kv_capacity  # the manifest's caps
    return ModelFacts(
        tokens_per_frame=ck.config.tokens_per_frame,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_kv_heads=c.num_key_value_heads,
        head_dim=_head_dim(ck),
        vocab_size=c.vocab_size,
        max_seq_len=max_seq_len,
        image_size=ck.model.vision.image_size,
        w2t_mode=ck.config.w2t_mode,
        default_threshold=ck.config.default_threshold if threshold is None else threshold,
        not_talk_id=ck.model.not_talk_id,
        eos_id=int(tok.token_to_id(ck.chat.eos) or 0),
        bos_id=bos,
        img_token_id=ck.img_token_id,
        sep_token_id=ck.model.not_talk_id if ck.config.img_sep_token else None,
        kv_capacity=capacity,
        context_strategy=ck.config.exceed_context_handling,
        system_prompt=system,
        chat=ck.chat.to_dict(),
    )


def _entry(
    root: Path, file: str, spec: GraphSpec, variant: str = "", data: list[str] | None = None
) -> GraphEntry:
    return GraphEntry(
        file, "fp32", spec.inputs, spec.outputs, sha256_file(root / file), variant, data or []
    )


def time_decoder(bundle: Path, name: str, tokens_per_frame: int, reps: int = 20) -> float:
    """Median seconds of one frame step at a short context: what the default choice rests on."""
    from proassist_edge.runtime.bundle import open_bundle

    b = open_bundle(bundle, decoder=name, verify=False)
    dec = b.new_decoder(512)
    x = np.random.default_rng(0).standard_normal(
        (1, tokens_per_frame, b.manifest.model.hidden_size)
    )
    x = (x * 0.05).astype(np.float32)
    dec.append(np.repeat(x, 20, axis=1))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dec.append(x)
        times.append(time.perf_counter() - t0)
        if dec.kv_len > 400:
            dec.reset()
    return float(np.median(times))


def export_bundle(
    ckpt: str | Path,
    out: str | Path,
    llm_from: str | Path | None = None,
    vision_from: str | Path | None = None,
    options: ExportOptions | None = None,
    tokens_per_frame: int | None = None,
) -> dict[str, Any]:
    """Export CKPT into the bundle folder OUT (which must not exist). Returns the summary."""
    opts = options or ExportOptions()
    mode = opts.verify_mode  # a bad mode fails before any work
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists: choose a new folder or remove it first")
    steps = Stages(6 + len(opts.variants), "export")
    steps.stage("loading checkpoint")
    ck = load_checkpoint(ckpt, llm_from, vision_from, tokens_per_frame)
    steps.update()
    max_len = opts.max_seq_len or ck.config.max_seq_len
    system = str(ck.config.extra.get("system_prompt", DEFAULT_SYSTEM))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        graphs, left_out = _export_graphs(ck, tmp, opts, steps)
        steps.stage("embeddings, tokenizer")
        table = ck.model.llm.get_input_embeddings().weight.detach().float().numpy()  # type: ignore[operator]
        np.save(tmp / "embeddings.npy", table)
        shutil.copy(ck.tokenizer_path, tmp / "tokenizer.json")
        steps.update()
        steps.stage("manifest, decoders' first run")
        facts = model_facts(ck, max_len, system, opts.threshold)
        manifest = Manifest(
            model=facts,
            graphs=graphs,
            files={
                f: sha256_file(tmp / f)
                for f in ("embeddings.npy", "tokenizer.json", *data_files(graphs))
            },
            embeddings={"file": "embeddings.npy", "dtype": "float32", "shape": list(table.shape)},
            source={
                "checkpoint": str(Path(ckpt).resolve()),
                "llm": str(ck.llm_dir),
                "vision": str(ck.vision_dir),
            },
            notes=[n for _, n in left_out],
        )
        left_out += check_decoders_run(tmp, manifest)
        if mode != "none":
            steps.stage(f"verifying against PyTorch ({mode})")
            report, dropped = verify_decoders(ck, tmp, manifest, opts, system)
            left_out += dropped
            (tmp / "verify.json").write_text(json.dumps(report, indent=2))
            manifest.verify = {k: v for k, v in report.items() if k != "decoders"}
        manifest.default_decoder, note = choose_default(
            tmp, manifest, decoder_names(manifest), steps, [name for name, _ in left_out]
        )
        manifest.notes.append(note)
        steps.stage("writing")
        write_manifest(tmp, manifest)
        steps.update()
        steps.close()
        tmp.chmod(0o755)  # mkdtemp made it 0700: the bundle is read by whoever runs it
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        steps.close()
        raise
    return {**summarize(out, manifest), **steps.summary()}


def _export_graphs(
    ck: LoadedCheckpoint, root: Path, opts: ExportOptions, steps: Stages
) -> tuple[dict[str, GraphEntry], list[tuple[str, str]]]:
    """The graphs, and (name, note) for each optional decoder that could not be built."""
    graphs: dict[str, GraphEntry] = {}
    left_out: list[tuple[str, str]] = []
    steps.stage("vision graph")
    graphs["vision"] = _entry(
        root, "vision.onnx", export_vision(ck.model, root / "vision.onnx", opts.opset)
    )
    steps.update()
    if ck.model.decision_head is not None:
        steps.stage("head graph")
        graphs["head"] = _entry(
            root, "head.onnx", export_head(ck.model, root / "head.onnx", opts.opset)
        )
    steps.update()
    if "portable" in opts.variants:
        steps.stage("portable decoder")
        spec = export_portable_decoder(ck.model, root / "decoder.onnx", opts.opset)
        graphs["decoder"] = _entry(root, "decoder.onnx", spec, "portable")
        steps.update()
    if "optimized" in opts.variants:
        steps.stage("optimized decoder (onnxruntime-genai builder)")
        try:
            file, data, spec = build_optimized_decoder(ck.model, ck.tokenizer_path, root)
        except ExportError as e:
            if "decoder" not in graphs:  # nothing else carries the export
                raise
            why = left_out_note("decoder_gqa", "onnxruntime-genai's builder could not build it", e,
                                _head_dim(ck), "decoder")
            _say(why)
            left_out.append(("decoder_gqa", why))
        else:
            graphs["decoder_gqa"] = _entry(root, file, spec, "optimized", data)
        steps.update()
    return graphs, left_out


def _head_dim(ck: LoadedCheckpoint) -> int:
    c: Any = ck.model.llm.config
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def decoder_names(manifest: Manifest) -> list[str]:
    return [k for k in manifest.graphs if k.startswith("decoder")]


def _portable(manifest: Manifest) -> list[str]:
    return [k for k in decoder_names(manifest) if manifest.graphs[k].variant == "portable"]


def _say(note: str) -> None:
    tqdm.write(f"note: {note}", file=sys.stderr)


def left_out_note(name: str, stage: str, error: BaseException, head_dim: int, runs: str) -> str:
    """One sentence for the manifest: which decoder, what failed, what it means."""
    text = " ".join(str(error).split())
    text = text.split(" (figures: ")[0]  # a ToleranceError's figures are in verify.json
    if len(text) > 400:  # a builder's stderr: its first line and its last words
        text = f"{text[:150]} ... {text[-250:]}"
    meaning = "the optimized graph cannot serve this model here"
    if head_dim % 16 and ("GroupQueryAttention" in text or "head_size" in text):
        meaning = (
            f"onnxruntime's GroupQueryAttention rejects this model's head_dim {head_dim} "
            "(it needs a multiple of 16)"
        )
    return (
        f"{name} left out: {stage} ({type(error).__name__}: {text}); {meaning}, so the portable "
        f"decoder '{runs}' (standard ops, the same model) carries the bundle"
    )


def leave_out(root: Path, manifest: Manifest, name: str, why: str) -> None:
    """Drop an optional decoder from the bundle: its files go, the reason stays in the notes."""
    graph = manifest.graphs.pop(name)
    for f in (graph.file, *graph.data_files):
        (root / f).unlink(missing_ok=True)
        manifest.files.pop(f, None)
    manifest.notes.append(why)
    _say(why)


def check_decoders_run(root: Path, manifest: Manifest) -> list[tuple[str, str]]:
    """Load every decoder and run it once. onnxruntime accepts some graphs at load and rejects
    them at their first run (GroupQueryAttention with head_dim 8): an optional decoder that
    fails is left out; a portable one that fails fails the export."""
    from proassist_edge.runtime.bundle import open_bundle

    dropped: list[tuple[str, str]] = []
    write_manifest(root, manifest)
    portable = _portable(manifest)
    hd = manifest.model.head_dim
    for name in decoder_names(manifest):
        stage = f"onnxruntime {ort_version()} cannot load it"
        try:
            dec = open_bundle(root, decoder=name, verify=False).new_decoder(64)
            stage = f"onnxruntime {ort_version()} loads it but cannot run it"
            run_once(dec, manifest.model.tokens_per_frame, manifest.model.hidden_size)
        except Exception as e:  # onnxruntime's errors derive from Exception directly (Fail, ...)
            if name in portable or not portable:
                raise ExportError(
                    f"{name} ({manifest.graphs[name].variant}) does not run: {stage} "
                    f"({type(e).__name__}: {e}); nothing else can carry the bundle. Check the "
                    "onnxruntime install (proassist-edge doctor), or report the model's config"
                ) from e
            why = left_out_note(name, stage, e, hd, portable[0])
            leave_out(root, manifest, name, why)
            dropped.append((name, why))
    write_manifest(root, manifest)
    return dropped


def run_once(dec: Decoder, tokens_per_frame: int, hidden: int) -> None:
    """A prompt-sized append, then a one-token step: the two paths the runtime takes."""
    x = np.random.default_rng(0).standard_normal((1, tokens_per_frame + 3, hidden))
    x = (x * 0.05).astype(np.float32)
    dec.append(x)
    dec.append(x[:, :1])


def ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def verify_decoders(
    ck: LoadedCheckpoint,
    root: Path,
    manifest: Manifest,
    opts: ExportOptions,
    system: str,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """verify_bundle over the decoders in the bundle. When that fails and the portable decoders
    pass alone, the optional ones are left out with the reason (one more reference run, on the
    failing path only); a portable mismatch fails the export."""
    decoders = decoder_names(manifest)
    manifest.default_decoder = decoders[0]  # provisional: vision_diff opens the default
    write_manifest(root, manifest)
    settings, frames, after_reset = verify_settings(opts, manifest.model)

    def verify(names: list[str]) -> dict[str, Any]:
        report = verify_bundle(ck, root, names, settings, frames, system, tol=opts.tolerance,
                               after_reset=after_reset, progress=True)
        return {"mode": opts.verify_mode, **report}

    try:
        return verify(decoders), []
    except Exception as e:  # a mismatch (ToleranceError) or an optional graph failing mid-stream
        portable = _portable(manifest)
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


def choose_default(
    root: Path, manifest: Manifest, decoders: list[str], steps: Stages, left_out: list[str] | None = None
) -> tuple[str, str]:
    if len(decoders) == 1:
        why = "the only one exported"
        if left_out:
            why = f"the only one left ({', '.join(left_out)} left out: see its note)"
        return decoders[0], f"default decoder {decoders[0]}: {why}"
    write_manifest(root, manifest)
    steps.stage("timing decoders")
    timings = {d: time_decoder(root, d, manifest.model.tokens_per_frame) for d in decoders}
    best = min(timings, key=lambda k: timings[k])
    figures = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timings.items())
    return best, f"default decoder {best}: fastest median frame step at export ({figures})"


def summarize(out: Path, manifest: Manifest) -> dict[str, Any]:
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {
        "bundle": str(out),
        "files": files,
        "verify": manifest.verify,
        "default_decoder": manifest.default_decoder,
        "notes": manifest.notes,  # why the default, and any decoder left out
    }
