"""The bundle manifest: the only contract between export and runtime.

A bundle is a folder with `manifest.json`, the graphs, the token embedding table and
`tokenizer.json`. Every file listed here carries its sha256; `load_manifest(verify=True)`
checks them all before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proassist_edge.chat import ChatFormat
from proassist_edge.errors import BundleError

SCHEMA_VERSION = 1
# The authors' default talk threshold: silent iff P(not talk) > 0.5 (their summary call uses it too)
DEFAULT_THRESHOLD = 0.5
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelFacts:
    """What the runtime must know about the model, and nothing about how it was trained."""

    tokens_per_frame: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    image_size: int
    w2t_mode: str  # "lm" (not-talk token probability) or "head" (binary decision head)
    not_talk_id: int
    eos_id: int
    bos_id: int | None
    img_token_id: int
    sep_token_id: int | None = None  # the frame separator (the not-talk token) of SEP models
    default_threshold: float = DEFAULT_THRESHOLD
    # the authors' "diff" talk rule when set: talk when P(not talk) fell by more than this since
    # the previous decision, else silent iff P > 0.5 (it replaces default_threshold)
    diff_margin: float | None = None
    feed_eos: bool = False  # feed a reply's final eos back (False: the authors' loop)
    fps: float = 2.0
    context_strategy: str = "summarize_and_drop"
    context_reserve: int = 128
    drop_middle_tail: int = 512
    max_reply_tokens: int = 100
    max_summary_tokens: int = 512
    kv_capacity: int = 0  # KV positions a stream can need (0: computed from the fields above)
    system_prompt: str = ""
    chat: dict[str, Any] = field(default_factory=dict)

    @property
    def chat_format(self) -> ChatFormat:
        return ChatFormat.from_dict(self.chat)


@dataclass(frozen=True)
class GraphEntry:
    file: str
    precision: str
    inputs: list[str]
    outputs: list[str]
    sha256: str
    variant: str = ""  # e.g. "portable" or "optimized" for decoders
    data_files: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    model: ModelFacts
    graphs: dict[str, GraphEntry]
    files: dict[str, str]  # other files (embeddings, tokenizer) -> sha256
    embeddings: dict[str, Any]  # {"file", "dtype", "shape", "scale"?}
    schema_version: int = SCHEMA_VERSION
    source: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    default_decoder: str = "decoder"
    # graph name -> TensorRT engine facts ({"file", "device", "compute_capability", "tensorrt",
    # "profiles", ...}), written on the device by build-engine; engines are not in `files`
    # (they are built after export, and checked against the device instead)
    engines: dict[str, Any] = field(default_factory=dict)
    # execution provider ("cpu", "cuda", "tensorrt") -> the decoder graph to run on it (optional:
    # a provider not named, and every provider of an older bundle, runs `default_decoder`)
    ep_decoders: dict[str, str] = field(default_factory=dict)

    def decoder_for(self, ep: str) -> str:
        """The decoder graph for execution provider `ep` (cpu, cuda or tensorrt)."""
        return self.ep_decoders.get(ep, self.default_decoder)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema version {version!r}, this proassist-edge reads {SCHEMA_VERSION}: "
                "re-export the bundle with this version (proassist-edge export CKPT -o BUNDLE)"
            )
        try:
            return cls(
                model=ModelFacts(**d["model"]),
                graphs={k: GraphEntry(**v) for k, v in d["graphs"].items()},
                files=dict(d["files"]),
                embeddings=dict(d["embeddings"]),
                schema_version=version,
                source=d.get("source", {}),
                verify=d.get("verify", {}),
                notes=list(d.get("notes", [])),
                default_decoder=d.get("default_decoder", "decoder"),
                engines=dict(d.get("engines", {})),
                ep_decoders={str(k): str(v) for k, v in d.get("ep_decoders", {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest is malformed ({e}): re-export the bundle") from e

    def all_files(self) -> dict[str, str]:
        out = dict(self.files)
        for g in self.graphs.values():
            out[g.file] = g.sha256
        return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read BUNDLE/manifest.json; with verify, check every listed file's sha256."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{root} is not a bundle (no {MANIFEST}): export one with proassist-edge export"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(
            f"{path} is not valid JSON ({e}): the bundle is corrupt, re-export it"
        ) from e
    manifest = Manifest.from_dict(data)
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    for name, digest in manifest.all_files().items():
        p = root / name
        if not p.is_file():
            raise BundleError(f"bundle file {p} is missing: the bundle is incomplete, re-export it")
        actual = sha256_file(p)
        if actual != digest:
            raise BundleError(
                f"bundle file {p} fails its sha256 (expected {digest[:12]}…, got {actual[:12]}…): "
                "it is truncated or modified; re-export or re-copy the bundle"
            )


def write_manifest(root: Path, manifest: Manifest) -> None:
    (root / MANIFEST).write_text(manifest.to_json())
