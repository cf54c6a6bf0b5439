"""Instant start: the KV of a stream's fixed prefix, computed once and restored at start.

A stream begins with the opening system message (the system prompt and the task knowledge), which
a cold start runs through the decoder with the first frame, every time. `warm_start` restores its
keys and values instead, computed once per bundle, prompt and decoder and kept on disk:

* an entry is a folder named by its key's digest, holding `kv.npy` (every key and value buffer
  stacked in layer order, (2 * layers, kv_heads, n, head_dim), in the graph's KV type) and
  `warm.json` (the key, the prefix ids and the sha256 of `kv.npy`): plain numpy and JSON, no
  pickle;
* the key covers the bundle (`bundle_digest`: its model facts, graphs, embeddings and files with
  their sha256, so the precision and the chat format too), the decoder graph (name and sha256),
  onnxruntime (version and provider) and the prefix ids: a changed prompt, bundle, precision or
  decoder has another digest, and an entry that fails its checks is computed again;
* entries are read from `BUNDLE/warm/` (shipped with a bundle: `export --prompt-file`,
  `ship_entries`), then from the user cache (`cache_dir()/warm`), and written to the user cache.
  A shipped entry's key leaves onnxruntime out (`WarmKey.portable`): export computes it on the
  CPU, the device runs whichever onnxruntime it has; the prefix's KV is the same function of the
  same weights, equal up to float rounding (as a warm start is to a cold one). Its files are in
  the manifest's `files` with their sha256, so opening the bundle checks them.

The prefix is restored at a stream's start (`StreamCore.reset`) and at a summary's restart:
summarize_and_drop restarts from one system message that begins as the opening does (the
opening's content, then the summary), and at the step after it `WarmPrefix.restore` copies the
KV of the ids the two share into the emptied memory instead of running the decoder over them.
No other reduction re-feeds a prefix: drop_all restarts from the next frame alone (its ids share
nothing with the opening), drop_middle keeps its own.
The restored memory is the prefix appended on its own where a cold start appends it with the
frame: the same positions, equal up to float rounding (tests/test_warm.py holds decisions and
tokens identical for every strategy). The restore is not a stage: observers that mirror the
memory (quant/calibration.py's shadow decoder) run cold.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from proassist_edge.errors import BundleError, ProAssistEdgeError
from proassist_edge.manifest import Manifest, load_manifest, sha256_file, write_manifest
from proassist_edge.paths import cache_dir
from proassist_edge.runtime.backend import Decoder, KvTransfer
from proassist_edge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

FORMAT = 1
WARM_DIR, KV_FILE, ENTRY_FILE = "warm", "kv.npy", "warm.json"


@dataclass(frozen=True)
class WarmKey:
    """What a prefix's KV depends on; its digest names the entry."""

    bundle: str  # bundle_digest of its manifest
    decoder: str  # the decoder graph: "name sha256"
    runtime: str  # "onnxruntime VERSION PROVIDER"; "" for a shipped entry (any onnxruntime)
    prefix: str  # sha256 of the prefix ids

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def portable(self) -> WarmKey:
        """The key of an entry shipped in a bundle: valid under any onnxruntime."""
        return replace(self, runtime="")


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
    # the prefix's KV, kept for the summary restarts (None when cold)
    prefix: WarmPrefix | None = field(default=None, repr=False, compare=False)

    @property
    def ready(self) -> bool:
        """True when the prefix is in the decoder's memory."""
        return self.status != "cold"


def warm_roots(bundle: Bundle) -> list[Path]:
    """Where entries are looked for, in order: shipped with the bundle, then the user cache (the
    last is where computed entries are written)."""
    return [bundle.root / WARM_DIR, cache_dir() / WARM_DIR]


def bundle_digest(m: Manifest) -> str:
    """sha256 of what a bundle computes: its model facts, graphs, embeddings and files (less the
    shipped warm entries, which are listed after their key was made). Its annotations (source,
    verify, notes, default decoder, engines) are left out: export, quantize and build-engine
    rewrite them without changing a graph."""
    d = asdict(m)
    files = {k: v for k, v in d["files"].items() if not k.startswith(f"{WARM_DIR}/")}
    content = {"schema": d["schema_version"], "model": d["model"], "graphs": d["graphs"],
               "embeddings": d["embeddings"], "files": files}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def warm_key(bundle: Bundle, dec: KvTransfer, ids: Sequence[int]) -> WarmKey:
    graph = bundle.manifest.graphs[bundle.decoder_name]
    return WarmKey(
        bundle=bundle_digest(bundle.manifest),
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
        for k in (key, key.portable()):
            entry = root / k.digest()
            kv = read_entry(entry, k, ids)
            if kv is None:
                continue
            try:
                dec.import_kv(kv)
            except BundleError as e:
                log.warning("warm start: %s does not fit this decoder (%s)", entry, e)
                continue
            return _restored(dec, ids, kv, t0, entry)
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
    return WarmStart("computed", len(ids), seconds, path, prefix=WarmPrefix(tuple(ids), kv, dec))


def _restored(
    dec: Decoder, ids: Sequence[int], kv: list[np.ndarray], t0: float, entry: Path
) -> WarmStart:
    done = WarmStart("restored", len(ids), time.perf_counter() - t0, entry,
                     prefix=WarmPrefix(tuple(ids), kv, dec))
    log.info("warm start: %d prefix tokens restored from %s in %.1f ms", len(ids), entry,
             1e3 * done.seconds)
    return done


@dataclass
class WarmPrefix:
    """The KV of a stream's opening (`ids`), kept in host memory for its summary restarts."""

    ids: tuple[int, ...]
    kv: list[np.ndarray]  # (1, kv_heads, len(ids), head_dim) per buffer, as export_kv gives
    dec: Decoder  # the decoder it was computed for or restored into: only its graph may take it
    restores: int = 0  # restarts that took part of it
    tokens: int = 0  # positions they restored, all together

    def shared(self, ids: Sequence[int]) -> int:
        """How many leading ids `ids` share with the opening."""
        n = 0
        for a, b in zip(self.ids, ids, strict=False):  # the shorter one bounds the prefix
            if a != b:
                break
            n += 1
        return n

    def restore(self, dec: Decoder, ids: Sequence[int]) -> list[int]:
        """Put the KV of the ids that `ids` shares with the opening into `dec`'s empty memory;
        returns what is left to feed. The KV of positions [0, n) depends only on ids[:n]
        (causal attention), so only a shared prefix is taken, never a stale one; another
        decoder (the lag controller's cheaper graph, runtime/lag.py) takes nothing."""
        if dec.kv_len:
            raise ValueError(f"a restart needs an empty memory, this one holds {dec.kv_len}")
        n = self.shared(ids)
        if not n or dec is not self.dec or not isinstance(dec, KvTransfer):
            return list(ids)
        dec.import_kv([a[:, :, :n] for a in self.kv])
        self.restores += 1
        self.tokens += n
        return list(ids[n:])


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
    root: Path, key: WarmKey, ids: Sequence[int], kv: Sequence[np.ndarray], seconds: float,
    computed_on: str = "",
) -> Path:
    """Save an entry under `root`, written to a temporary folder and renamed into place.
    `computed_on`: the runtime of a portable key's computation (recorded, not checked)."""
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
            **({"computed_on": computed_on} if computed_on else {}),
        }
        (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=1))
        if final.exists():  # an unusable entry of the same key
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- shipped with a bundle (export --prompt-file) ---------------------------------------------


class PromptFileError(ProAssistEdgeError):
    """A prompt file (export --prompt-file) is unreadable or malformed."""


@dataclass(frozen=True)
class WarmPrompt:
    """A stream's opening, as `StreamCore` builds it: the system prompt (None: the bundle's)
    and the task knowledge."""

    system: str | None = None
    knowledge: str = ""


def read_prompt_file(path: Path) -> list[WarmPrompt]:
    """The prompts of `export --prompt-file`: a `.json` file holds one object {"system": ...,
    "knowledge": ...} (both optional) or a list of them; any other file is the task knowledge
    (stripped, as `run --knowledge-file` reads it) under the bundle's system prompt."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"prompt file {path} is unreadable ({e})") from e
    if path.suffix != ".json":
        return [WarmPrompt(None, text.strip())]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"prompt file {path} is not valid JSON ({e})") from e
    items = data if isinstance(data, list) else [data]
    prompts = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and set(item) <= {"system", "knowledge"}
                and isinstance(item.get("system"), str | None)
                and isinstance(item.get("knowledge", ""), str)):
            raise PromptFileError(
                f"prompt file {path}, prompt {i}: give an object with \"system\" and/or "
                '"knowledge" strings, e.g. {"knowledge": "Task knowledge: ..."}, or a list of them'
            )
        prompts.append(WarmPrompt(item.get("system"), item.get("knowledge", "")))
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompt")
    return prompts


def ship_entries(root: Path, prompts: Sequence[WarmPrompt]) -> dict[str, str]:
    """Compute the warm entries of `prompts` for every decoder graph of the bundle at `root`
    (onnxruntime on the CPU) into `root/warm`, under portable keys; returns their files
    (relative to `root`) with their sha256, for the manifest's `files`. The manifest's content
    (`bundle_digest`) must be final: the keys are made from it."""
    from proassist_edge.runtime.bundle import open_bundle
    from proassist_edge.runtime.prompt import PromptBuilder

    manifest = load_manifest(root, verify=False)
    m = manifest.model
    decoders = [k for k in manifest.graphs if k.startswith("decoder")]
    files: dict[str, str] = {}
    for name in decoders:
        b = open_bundle(root, name, verify=False, use_engine=False, ep="cpu")
        pb = PromptBuilder(b.tokenizer, m.chat_format)
        for p in prompts:
            ids = pb.opening(m.system_prompt if p.system is None else p.system, p.knowledge)
            dec = b.new_decoder(len(ids) + 1)
            assert isinstance(dec, KvTransfer), "onnxruntime decoders transfer their memory"
            t0 = time.perf_counter()
            dec.append(b.embed(list(ids)))
            kv = dec.export_kv()
            if not all(np.isfinite(a).all() for a in kv):
                raise BundleError(f"{name}: the prompt's keys or values are not finite; the "
                                  "bundle does not run this prompt")
            key = warm_key(b, dec, ids)
            entry = write_entry(root / WARM_DIR, key.portable(), ids, kv,
                                time.perf_counter() - t0, key.runtime)
            for f in (KV_FILE, ENTRY_FILE):
                files[f"{WARM_DIR}/{entry.name}/{f}"] = sha256_file(entry / f)
    return files


def ship_warm(root: Path, manifest: Manifest, prompts: Sequence[WarmPrompt]) -> None:
    """export --prompt-file: the warm-start entries of `prompts` for every decoder of the bundle
    at `root` (whose manifest is `manifest`, written), listed in its `files` with their sha256
    so opening the bundle checks them as it checks the graphs; the manifest is written again."""
    if not prompts:
        return
    manifest.files.update(ship_entries(root, prompts))
    decoders = sum(k.startswith("decoder") for k in manifest.graphs)
    manifest.notes.append(
        f"warm start: the opening KV of {len(prompts)} prompt(s) for {decoders} decoder(s) ships "
        f"in {WARM_DIR}/ (export --prompt-file); run, replay and eval --warm restore it"
    )
    write_manifest(root, manifest)
