"""The bundle's token embedding table, written in any of its dtypes from rows given in chunks.

One writer for both producers: `export` (rows read from the checkpoint's weights) and
`quantize` (rows of the fp32 parent's table). The runtime reads the table memory-mapped and
converts only the rows it looks up (runtime/bundle.py `Bundle.embed`): float16 rows are widened
on read, int8 rows are multiplied by their per-row scale from the file named in
manifest.embeddings["scale"].
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from proassist_edge.errors import ProAssistEdgeError
from proassist_edge.manifest import sha256_file

TABLE, SCALE = "embeddings.npy", "embeddings_scale.npy"
TABLE_DTYPES = ("float32", "float16", "int8")
CHUNK_ROWS = 8192  # bounded memory for an 8B model's 2 GB table
FLOAT16_MAX = 65504.0

# rows(start, stop) -> float32 (stop - start, hidden)
Rows = Callable[[int, int], np.ndarray]


class TableError(ProAssistEdgeError):
    """The table cannot be written in the asked dtype."""


def write_table(rows: Rows, shape: tuple[int, int], out_dir: Path, dtype: str) -> tuple[
    dict[str, Any], dict[str, str], dict[str, Any]
]:
    """Write OUT_DIR/embeddings.npy in DTYPE (and the per-row scales for int8).

    Returns (manifest.embeddings, files -> sha256, figures with a note)."""
    if dtype not in TABLE_DTYPES:
        raise TableError(f"embedding dtype {dtype!r}: choose float32, float16 or int8")
    n, hidden = int(shape[0]), int(shape[1])
    np_dtype = {"float32": np.float32, "float16": np.float16, "int8": np.int8}[dtype]
    dst = out_dir / TABLE
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=np_dtype, shape=(n, hidden))
    scales = np.empty(n, np.float32) if dtype == "int8" else None
    worst = 0.0
    for a in range(0, n, CHUNK_ROWS):
        chunk = np.asarray(rows(a, min(a + CHUNK_ROWS, n)), dtype=np.float32)
        if dtype == "float32":
            out[a : a + len(chunk)] = chunk
            continue
        if dtype == "float16":
            if (peak := float(np.abs(chunk).max())) > FLOAT16_MAX:
                del out
                dst.unlink()
                raise TableError(f"embedding values reach {peak:.3g}, past float16's range: "
                                 "keep float32 or use int8")
            back = chunk.astype(np.float16)
            out[a : a + len(chunk)] = back
            worst = max(worst, float(np.abs(back.astype(np.float32) - chunk).max()))
            continue
        assert scales is not None
        s = np.abs(chunk).max(axis=1) / 127.0
        s[s == 0] = 1.0  # an all-zero row stays zero with any scale
        q = np.clip(np.rint(chunk / s[:, None]), -127, 127).astype(np.int8)
        out[a : a + len(chunk)] = q
        scales[a : a + len(chunk)] = s
        worst = max(worst, float(np.abs(q.astype(np.float32) * s[:, None] - chunk).max()))
    out.flush()
    del out
    meta: dict[str, Any] = {"file": TABLE, "dtype": dtype, "shape": [n, hidden]}
    files = {TABLE: sha256_file(dst)}
    note = {"float32": "embeddings: float32",
            "float16": "embeddings: float16, widened to float32 per looked-up row",
            "int8": f"embeddings: int8, symmetric per-row scales in {SCALE}"}[dtype]
    if scales is not None:
        np.save(out_dir / SCALE, scales)
        meta["scale"] = SCALE
        files[SCALE] = sha256_file(out_dir / SCALE)
    size = sum((out_dir / f).stat().st_size for f in files)
    return meta, files, {"size_bytes": size, "max_abs_error": worst, "note": note}
