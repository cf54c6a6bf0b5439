"""The token embedding table in the child's precision.

The runtime reads the table memory-mapped and converts only the rows it looks up
(runtime/bundle.py `Bundle.embed`): float16 rows are widened on read, int8 rows are multiplied by
their per-row scale from the file named in manifest.embeddings["scale"].
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.manifest import sha256_file
from proassist_edge.quant.graphs import QuantizeError

# default table dtype per precision: int8 rows with per-row scales lose far less than the
# decoder's own weight quantization, and the table is the largest file for a 128k vocabulary
EMBEDDING_DTYPES = {"int8": "int8", "int4": "int8", "fp16": "float16"}
TABLE, SCALE = "embeddings.npy", "embeddings_scale.npy"
CHUNK_ROWS = 8192  # bounded memory for an 8B model's 2 GB table


def convert_embeddings(
    src: Path, out_dir: Path, dtype: str
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Write OUT_DIR/embeddings.npy (and the scale file for int8).

    Returns (manifest.embeddings, files -> sha256, figures with a note)."""
    table = np.load(src, mmap_mode="r")
    if table.dtype != np.float32:
        raise QuantizeError(f"{src} holds {table.dtype}, not float32: quantize the fp32 parent")
    shape = [int(d) for d in table.shape]
    dst = out_dir / TABLE
    worst, scale_file = 0.0, None
    if dtype == "float32":
        shutil.copy(src, dst)
        note = "embeddings: float32 copy"
    elif dtype == "float16":
        if (peak := float(np.abs(table).max())) > 65504:
            raise QuantizeError(
                f"embedding values reach {peak:.3g}, past float16's range: keep float32 or use int8"
            )
        out = np.lib.format.open_memmap(dst, mode="w+", dtype=np.float16, shape=table.shape)
        for a in range(0, shape[0], CHUNK_ROWS):
            rows = np.asarray(table[a : a + CHUNK_ROWS])
            out[a : a + CHUNK_ROWS] = rows.astype(np.float16)
            worst = max(worst, float(np.abs(out[a : a + CHUNK_ROWS].astype(np.float32) - rows).max()))
        out.flush()
        del out
        note = "embeddings: float16, widened to float32 per looked-up row"
    elif dtype == "int8":
        out = np.lib.format.open_memmap(dst, mode="w+", dtype=np.int8, shape=table.shape)
        scales = np.empty(shape[0], np.float32)
        for a in range(0, shape[0], CHUNK_ROWS):
            rows = np.asarray(table[a : a + CHUNK_ROWS], dtype=np.float32)
            s = np.abs(rows).max(axis=1) / 127.0
            s[s == 0] = 1.0  # an all-zero row stays zero with any scale
            q = np.clip(np.rint(rows / s[:, None]), -127, 127).astype(np.int8)
            out[a : a + CHUNK_ROWS] = q
            scales[a : a + CHUNK_ROWS] = s
            worst = max(worst, float(np.abs(q.astype(np.float32) * s[:, None] - rows).max()))
        out.flush()
        del out
        scale_file = SCALE
        np.save(out_dir / SCALE, scales)
        note = f"embeddings: int8, symmetric per-row scales in {SCALE}"
    else:
        raise QuantizeError(f"embedding dtype {dtype!r}: choose float32, float16 or int8")
    meta: dict[str, Any] = {"file": TABLE, "dtype": dtype, "shape": shape}
    files = {TABLE: sha256_file(dst)}
    if scale_file:
        meta["scale"] = scale_file
        files[scale_file] = sha256_file(out_dir / scale_file)
    size = sum((out_dir / f).stat().st_size for f in files)
    return meta, files, {"size_bytes": size, "max_abs_error": worst, "note": note}
