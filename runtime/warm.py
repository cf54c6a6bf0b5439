"""Instant start: the KV of a stream's fixed prefix, computed once and restored at start.

A stream begins with the opening system message (the system prompt and the task knowledge), which
a cold start runs through the decoder with the first frame, every time. `warm_start` restores its
keys and values instead, computed once per bundle, prompt and decoder and kept on disk:

* an entry is a folder named by its key's digest, holding `kv.npy` (every key and value buffer
  stacked in layer order, (2 * layers, kv_heads, n, head_dim), in the graph's KV type) and
  `warm.json` (the key, the prefix ids and the sha256 of `kv.npy`): plain numpy and JSON, no
  pickle;
* the key covers the bundle (the sha256 of its manifest.json, which holds every graph's, table's
  and tokenizer's sha256, the precision and the chat format), the decoder graph (name and
  sha256), onnxruntime (version and provider) and the prefix ids: a changed prompt, bundle,
  precision or decoder has another digest, and an entry that fails its checks is computed again;
* entries are read from `BUNDLE/warm/` (shipped with a bundle), then from the user cache
  (`cache_dir()/warm`), and written to the user cache.

Only a stream's start is restored (`StreamCore.reset`); a context reduction never is: drop_all
restarts from the next frame alone, drop_middle keeps its own prefix, and a summary restarts from
a message that holds the summary. The restored memory is the prefix appended on its own where a
cold start appends it with the first frame: the same positions, equal up to float rounding
(tests/test_warm.py holds decisions and tokens identical for every strategy). The restore is not
a stage: observers that mirror the memory (quant/calibration.py's shadow decoder) run cold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from proassist_edge.errors import BundleError
from proassist_edge.manifest import MANIFEST, sha256_file
from proassist_edge.paths import cache_dir
from proassist_edge.runtime.backend import Decoder, KvTransfer
from proassist_edge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

FORMAT = 1
WARM_DIR, KV_FILE, ENTRY_FILE = "warm", "kv.npy", "warm.json"


@dataclass(frozen=True)
class WarmKey:
    """What a prefix's KV depends on; its digest names the entry."""

    bundle: str  # sha256 of the bundle's manifest.json
    decoder: str  # the decoder graph: "name sha256"
    runtime: str  # "onnxruntime VERSION PROVIDER"
    prefix: str  # sha256 of the prefix ids

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class WarmStart:
    """What `warm_start` did. `status`: "restored" (read from `path`), "computed" (and saved at
    `path`, None when no cache folder could be written), or "cold" (nothing in the memory, the
    stream starts cold: `reason` says why). `seconds`: the restore or the computation."""

    status: Literal["restored", "computed", "cold"]
    tokens: int
    seconds: float
    path: Path | None = None
    reason: str = ""

    @property
    def ready(self) -> bool:
        """True when the prefix is in the decoder's memory."""
        return self.status != "cold"


def warm_roots(bundle: Bundle) -> list[Path]:
    """Where entries are looked for, in order: shipped with the bundle, then the user cache (the
    last is where computed entries are written)."""
    return [bundle.root / WARM_DIR, cache_dir() / WARM_DIR]


def warm_key(bundle: Bundle, dec: KvTransfer, ids: Sequence[int]) -> WarmKey:
    graph = bundle.manifest.graphs[bundle.decoder_name]
    return WarmKey(
        bundle=sha256_file(bundle.root / MANIFEST),
        decoder=f"{bundle.decoder_name} {graph.sha256}",
        runtime=f"onnxruntime {ort.__version__} {dec.sess.get_providers()[0]}",
        prefix=hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest(),
    )


def warm_start(
    bundle: Bundle, dec: Decoder, ids: Sequence[int], roots: Sequence[Path] | None = None
) -> WarmStart:
    """Put the KV of the prefix `ids` into `dec`'s empty memory: restored from the first root
    holding a sound entry for it, else computed (appended on its own) and saved to the last root.
    `roots` default to `warm_roots(bundle)`. A decoder without `KvTransfer` (TensorRT), or a
    prefix whose keys are not finite, leaves the memory empty: the caller starts cold."""
    t0 = time.perf_counter()
    if dec.kv_len:
        raise ValueError(f"warm_start needs an empty memory, this one holds {dec.kv_len}: reset it")
    if not ids:
        return WarmStart("cold", 0, 0.0, reason="no prefix to restore")
    if not isinstance(dec, KvTransfer):
        reason = f"{type(dec).__name__} cannot take a memory; starting cold"
        log.warning("warm start: %s", reason)
        return WarmStart("cold", len(ids), 0.0, reason=reason)
    roots = list(roots or warm_roots(bundle))
    key = warm_key(bundle, dec, ids)
    for root in roots:
        entry = root / key.digest()
        kv = read_entry(entry, key, ids)
        if kv is None:
            continue
        try:
            dec.import_kv(kv)
        except BundleError as e:
            log.warning("warm start: %s does not fit this decoder (%s)", entry, e)
            continue
        done = WarmStart("restored", len(ids), time.perf_counter() - t0, entry)
        log.info("warm start: %d prefix tokens restored from %s in %.1f ms", len(ids), entry,
                 1e3 * done.seconds)
        return done
    dec.append(bundle.embed(list(ids)))
    kv = dec.export_kv()
    seconds = time.perf_counter() - t0
    if not all(np.isfinite(a).all() for a in kv):
        dec.reset()
        reason = "the prefix gave non-finite keys or values; starting cold"
        log.warning("warm start: %s", reason)
        return WarmStart("cold", len(ids), seconds, reason=reason)
    path = None
    try:
        path = write_entry(roots[-1], key, ids, kv, seconds)
    except OSError as e:
        log.warning("warm start: cannot write the cache under %s (%s): set PROASSIST_EDGE_CACHE "
                    "to a writable folder to keep it", roots[-1], e)
    log.info("warm start: %d prefix tokens computed in %.1f ms, saved to %s", len(ids),
             1e3 * seconds, path)
    return WarmStart("computed", len(ids), seconds, path)


class _Unusable(Exception):
    """Internal: an entry exists but fails a check (read_entry logs it and computes again)."""


def read_entry(entry: Path, key: WarmKey, ids: Sequence[int]) -> list[np.ndarray] | None:
    """The KV buffers (1, kv_heads, n, head_dim) of a sound entry, or None (absent, or failing
    a check: logged, and computed again by the caller)."""
    meta_path = entry / ENTRY_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise _Unusable(f"format {meta.get('format')!r}, this version reads {FORMAT}")
        if meta.get("key") != asdict(key) or meta.get("ids") != list(ids):
            raise _Unusable("it was made for another bundle, decoder or prompt")
        kv_path = entry / KV_FILE
        if sha256_file(kv_path) != meta.get("sha256"):
            raise _Unusable(f"{KV_FILE} fails its sha256")
        stacked = np.load(kv_path, allow_pickle=False)
    except (OSError, ValueError, _Unusable) as e:
        log.warning("warm start: cache entry %s is unusable (%s): computing it again", entry, e)
        return None
    return [a[None] for a in stacked]


def write_entry(
    root: Path, key: WarmKey, ids: Sequence[int], kv: Sequence[np.ndarray], seconds: float
) -> Path:
    """Save an entry under `root`, written to a temporary folder and renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / key.digest()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        stacked = np.concatenate(list(kv), axis=0)  # (2 * layers, kv_heads, n, head_dim)
        np.save(tmp / KV_FILE, stacked, allow_pickle=False)
        meta = {
            "format": FORMAT, "key": asdict(key), "ids": list(ids), "tokens": len(ids),
            "sha256": sha256_file(tmp / KV_FILE), "shape": list(stacked.shape),
            "dtype": str(stacked.dtype), "compute_ms": round(1e3 * seconds, 3),
        }
        (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=1))
        if final.exists():  # an unusable entry of the same key
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
