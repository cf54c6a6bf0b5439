"""The bundle's decoders after they are written: each one run once (an optional one that fails
is left out, its reason kept in the notes), and the default chosen by timing a frame step."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from proassist_edge.errors import ExportError
from proassist_edge.export.parts import say
from proassist_edge.manifest import Manifest, write_manifest
from proassist_edge.progress import Stages
from proassist_edge.runtime.backend import Decoder


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


def decoder_names(manifest: Manifest) -> list[str]:
    return [k for k in manifest.graphs if k.startswith("decoder")]


def portable_decoders(manifest: Manifest) -> list[str]:
    return [k for k in decoder_names(manifest) if manifest.graphs[k].variant == "portable"]


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
    shared = {f for g in manifest.graphs.values() for f in g.data_files}  # decoder_cuda's weights
    for f in (graph.file, *graph.data_files):
        if f in shared:
            continue
        (root / f).unlink(missing_ok=True)
        manifest.files.pop(f, None)
    manifest.notes.append(why)
    say(why)


def check_decoders_run(root: Path, manifest: Manifest) -> list[tuple[str, str]]:
    """Load every decoder and run it once. onnxruntime accepts some graphs at load and rejects
    them at their first run (GroupQueryAttention with head_dim 8): an optional decoder that
    fails is left out; a portable one that fails fails the export."""
    from proassist_edge.runtime.bundle import open_bundle

    dropped: list[tuple[str, str]] = []
    write_manifest(root, manifest)
    portable = portable_decoders(manifest)
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

