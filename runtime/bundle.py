"""Open a bundle: manifest (checked), tokenizer, memory-mapped embedding table, graph sessions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from proassist_edge.errors import BundleError, FrameError, MissingDependencyError
from proassist_edge.manifest import Manifest, load_manifest
from proassist_edge.runtime.backend import Decoder, GqaDecoder, PortableDecoder, make_session
from proassist_edge.runtime.providers import default_ep, session_ep

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    tokenizer: Tokenizer
    embeddings: np.ndarray  # (V, H), memory-mapped: never loaded twice nor copied per step
    vision: ort.InferenceSession
    head: ort.InferenceSession | None
    decoder_name: str
    threads: int = 0
    engine: Callable[[int], Decoder] | None = None  # TensorRT: capacity -> decoder
    notes: list[str] = field(default_factory=list)  # why an engine was not used, etc.
    ep: str = "cpu"  # the execution provider the sessions run on (runtime/providers.py)

    def new_decoder(self, capacity: int | None = None) -> Decoder:
        m = self.manifest.model
        g = self.manifest.graphs[self.decoder_name]
        cap = capacity or m.max_seq_len
        if self.engine is not None:
            return self.engine(cap)
        optimized = g.variant == "optimized"  # contrib ops: the TensorRT EP leaves it to CUDA
        sess = make_session(str(self.root / g.file), self.threads, self.ep, contrib_ops=optimized)
        if optimized:  # KV buffers on the session's device (CUDA memory under CUDA/TensorRT)
            return GqaDecoder(
                sess, m.num_layers, m.num_kv_heads, m.head_dim, cap, self.head is not None
            )
        return PortableDecoder(sess, m.num_layers, m.num_kv_heads, m.head_dim, cap)

    @cached_property
    def _scales(self) -> np.ndarray | None:
        # mapped once: opening the file on every embed cost 0.25 ms per decoded token
        scale = self.manifest.embeddings.get("scale")
        return None if scale is None else np.load(self.root / scale, mmap_mode="r")

    def embed(self, ids: list[int]) -> np.ndarray:
        """Token ids -> (1, n, H) float32 rows of the table (ids past the table are clamped)."""
        idx = np.minimum(np.asarray(ids, dtype=np.int64), self.embeddings.shape[0] - 1)
        rows = self.embeddings[idx]
        if self._scales is not None:  # int8 table with per-row scales
            rows = rows.astype(np.float32) * self._scales[idx][:, None]
        return rows.astype(np.float32, copy=False)[None]

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (k, h, w, 3) RGB -> frame tokens (k, I, H)."""
        check_frames(frames)
        return self.vision.run(None, {"frames": np.ascontiguousarray(frames)})[0]


def check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise FrameError(
            f"frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}: "
            "convert with np.asarray(frame, dtype=np.uint8)"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[1:3]) < 8:
        raise FrameError(
            f"frames must be (k, height, width, 3) RGB with sides >= 8, got {frames.shape}: "
            "pass HxWx3 images (channels last)"
        )


def tensorrt_engine(root: Path, manifest: Manifest) -> tuple[Callable[[int], Decoder] | None, str]:
    """The bundle's TensorRT engine where one is listed and runs here, else (None, why not):
    an engine built for another device or TensorRT version, or no tensorrt installed, falls
    back to onnxruntime with the reason logged."""
    if not manifest.engines:
        return None, ""
    from proassist_edge.runtime.engine import EngineMismatchError
    from proassist_edge.runtime.trt_decoder import engine_decoder_factory

    try:
        return engine_decoder_factory(root, manifest), ""
    except (EngineMismatchError, MissingDependencyError, BundleError) as e:
        why = f"TensorRT engine not used, running on onnxruntime: {e}"
        log.warning(why)
        return None, why


def open_bundle(
    path: str | Path,
    decoder: str | None = None,
    verify: bool = True,
    threads: int = 0,
    use_engine: bool = True,
    ep: str | None = None,
) -> Bundle:
    """Open a bundle for the runtime. `ep`: the execution provider (auto, cpu, cuda, tensorrt;
    default $PROASSIST_EDGE_EP, else auto): every session runs on it or raises
    ExecutionProviderError; the decoder is the manifest's for that provider (`ep_decoders`)
    unless `decoder` names one. With `use_engine` (and ep auto or tensorrt), a TensorRT engine
    listed in the manifest (build-engine) runs the decoder when it was built for this device."""
    root = Path(path)
    manifest = load_manifest(root, verify=verify)
    ep = ep or default_ep()
    # the vision graph picks the provider (auto moves down the order when a library is missing)
    vision = make_session(str(root / manifest.graphs["vision"].file), threads, ep, spin=False)
    resolved = session_ep(vision)
    name = decoder or manifest.decoder_for(resolved)
    if name not in manifest.graphs:
        choices = [k for k in manifest.graphs if k.startswith("decoder")]
        raise BundleError(f"bundle has no graph {name!r}; choose one of {choices}")
    emb = manifest.embeddings
    try:
        table = np.load(root / emb["file"], mmap_mode="r")
    except (OSError, ValueError) as e:
        raise BundleError(f"embedding table {emb['file']} is unreadable ({e}): re-export") from e
    if table.shape[1] != manifest.model.hidden_size:
        raise BundleError(
            f"embedding table width {table.shape[1]} != hidden size {manifest.model.hidden_size}"
        )
    try:
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise BundleError(f"tokenizer.json is unreadable ({e}): re-export the bundle") from e
    # the small graphs must not leave spinning workers behind for the decoder step that follows
    head = None
    if "head" in manifest.graphs:
        head = make_session(str(root / manifest.graphs["head"].file), threads, resolved, spin=False)
    engine, why = None, ""
    if use_engine and decoder is None and ep in ("auto", "tensorrt"):
        engine, why = tensorrt_engine(root, manifest)
    return Bundle(root, manifest, tok, table, vision, head, name, threads, engine,
                  [why] if why else [], resolved)


def decoder_line(bundle: Bundle, requested: str | None = None) -> str:
    """Which decoder runs and why: the manifest's notes on the choice (the default, and any
    decoder left out at export), --decoder, or a TensorRT engine built for this device."""
    m = bundle.manifest
    if bundle.engine is not None:
        name = next(iter(m.engines), bundle.decoder_name)
        return f"decoder: TensorRT engine {name} (built on this device by build-engine)"
    g = m.graphs[bundle.decoder_name]
    line = (f"decoder: {bundle.decoder_name} ({g.variant or 'decoder'}, {g.precision}) "
            f"on the {bundle.ep} execution provider")
    if requested:
        why = ["chosen with --decoder"]
    elif bundle.ep in m.ep_decoders:
        why = [f"the manifest's decoder for {bundle.ep}"]
    else:  # the two kinds of note export writes (export/bundle.py): the choice, then what is not there
        why = [n for n in m.notes if n.startswith("default decoder")]
        why += [n for n in m.notes if " left out: " in n]
    return "; ".join([line, *(why or ["the bundle's default"]), *bundle.notes])
