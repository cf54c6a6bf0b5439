"""The token embedding table in the child's precision: the parent's float32 rows through the
bundle's one table writer (proassist_edge/embedding_table.py, shared with export)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.embedding_table import SCALE, TABLE, TableError, write_table
from proassist_edge.manifest import sha256_file
from proassist_edge.quant.graphs import QuantizeError

# default table dtype per precision: int8 rows with per-row scales lose far less than the
# decoder's own weight quantization, and the table is the largest file for a 128k vocabulary
EMBEDDING_DTYPES = {"int8": "int8", "int4": "int8", "fp16": "float16"}
__all__ = ["EMBEDDING_DTYPES", "SCALE", "TABLE", "convert_embeddings"]


def convert_embeddings(
    src: Path, out_dir: Path, dtype: str
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Write OUT_DIR/embeddings.npy (and the scale file for int8).

    Returns (manifest.embeddings, files -> sha256, figures with a note)."""
    table = np.load(src, mmap_mode="r")
    if table.dtype != np.float32:
        raise QuantizeError(f"{src} holds {table.dtype}, not float32: quantize the fp32 parent")
    if dtype == "float32":
        shutil.copy(src, out_dir / TABLE)
        meta = {"file": TABLE, "dtype": dtype, "shape": [int(d) for d in table.shape]}
        files = {TABLE: sha256_file(out_dir / TABLE)}
        size = (out_dir / TABLE).stat().st_size
        return meta, files, {"size_bytes": size, "max_abs_error": 0.0, "note": "embeddings: float32 copy"}
    try:
        return write_table(lambda a, b: table[a:b], table.shape, out_dir, dtype)
    except TableError as e:
        raise QuantizeError(str(e)) from e
