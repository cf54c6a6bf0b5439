"""Warm start (runtime/warm.py): the opening prompt's KV restored from a cache of plain .npy and
JSON gives a cold start's decisions and tokens for every context strategy and both decoders,
through resets (a summary's restart restores the ids it shares with the opening); a changed
prompt, bundle or decoder, or a damaged entry, is computed again; `export --prompt-file` ships
the entries in the bundle, listed with their sha256, and quantize's children do not carry them."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_runtime_parity import KNOWLEDGE, SYSTEM, dense_messages, small_context

from proassist_edge.errors import BundleError
from proassist_edge.export.verify import synthetic_stream
from proassist_edge.runtime.backend import KvTransfer, StepOut
from proassist_edge.runtime.bundle import Bundle, open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.messages import FrameResult
from proassist_edge.runtime.prompt import CONTEXT_STRATEGIES
from proassist_edge.runtime.warm import (
    ENTRY_FILE,
    KV_FILE,
    WARM_DIR,
    PromptFileError,
    WarmPrefix,
    WarmPrompt,
    bundle_digest,
    read_prompt_file,
    warm_start,
)

DECODERS = ("decoder", "decoder_gqa")
SAME = ("talk", "token_ids", "text", "reset", "summary", "summary_ids", "context_len")


@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> tuple[Path, float]:
    bundle, _, thr = tiny_bundle(5, "lm", 1, verify_frames=20)  # (the decoders are verified elsewhere)
    return bundle, thr


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROASSIST_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / WARM_DIR


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def status(core: StreamCore) -> str:
    assert core.warm is not None
    return core.warm.status


def assert_same(got: list[FrameResult], ref: list[FrameResult], label: str, tol: float) -> None:
    for field in SAME:
        assert [getattr(r, field) for r in got] == [getattr(r, field) for r in ref], (label, field)
    assert max(abs(a.p_not_talk - b.p_not_talk) for a, b in zip(got, ref, strict=True)) <= tol, label


@pytest.mark.parametrize("strategy", CONTEXT_STRATEGIES)
def test_warm_start_gives_a_cold_starts_decisions_and_tokens(tiny, user_cache, strategy) -> None:
    """A cold start and a warm one restoring the cache: the same stream through every reset.
    After a reset only a summary's restart restores (the ids its message shares with the
    opening); drop_all starts from the frame, drop_middle keeps its prefix."""
    bundle, thr = tiny
    s = small_context(strategy, thr)
    frames, messages = synthetic_stream(160, seed=3), dense_messages()
    for decoder in DECODERS:
        b = open_bundle(bundle, decoder)
        cold = list(StreamCore(b, s, SYSTEM, KNOWLEDGE).replay(frames, messages))
        assert sum(r.reset is not None for r in cold) >= 2 and 0 < sum(r.talk for r in cold) < 160
        assert {r.reset for r in cold} - {None} >= {strategy}
        for expect in ("computed", "restored"):
            core = StreamCore(b, replace(s, warm=True), SYSTEM, KNOWLEDGE)
            assert core.warm is not None and core.warm.status == expect, decoder
            assert core.pending == [] and core.kv_len == core.warm.tokens > 20
        warm = list(core.replay(frames, messages))
        assert core.warm.status == "restored" and core.warm.prefix is not None
        restarts = sum(r.reset is not None for r in cold[:-1])  # resets with a frame after them
        if strategy == "summarize_and_drop":
            assert restarts >= 2 and core.warm.prefix.restores == restarts, decoder
            # each restart took the opening's whole content (the summary follows it)
            assert core.warm.prefix.tokens >= restarts * (core.warm.tokens - 2)
        else:
            assert core.warm.prefix.restores == 0, decoder
        assert_same(warm, cold, decoder, 1e-5)
    assert len(entries(user_cache)) == 2  # one per decoder


def test_the_cache_is_plain_npy_and_json_and_follows_prompt_bundle_and_decoder(
    tiny, user_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle, thr = tiny
    s = replace(small_context("drop_all", thr), warm=True)
    b = open_bundle(bundle)

    def start(b: Bundle = b, system: str = SYSTEM, knowledge: str = KNOWLEDGE) -> StreamCore:
        return StreamCore(b, s, system, knowledge)

    first = start()
    assert first.warm is not None and first.warm.status == "computed" and first.warm.path
    frames = synthetic_stream(40, seed=5)
    computed = list(first.replay(frames))
    assert list(start().replay(frames)) == computed, "the restored memory is the computed one"
    entry = first.warm.path
    assert entry.parent == user_cache and sorted(p.name for p in entry.iterdir()) == [KV_FILE, ENTRY_FILE]
    meta = json.loads((entry / ENTRY_FILE).read_text())
    stacked = np.load(entry / KV_FILE, allow_pickle=False)
    m = b.manifest.model
    assert stacked.shape == (2 * m.num_layers, m.num_kv_heads, first.warm.tokens, m.head_dim)
    assert meta["ids"] == first.pb.opening(SYSTEM, KNOWLEDGE) and meta["tokens"] == first.warm.tokens
    assert set(meta["key"]) == {"bundle", "decoder", "runtime", "prefix"}

    assert status(start()) == "restored"
    assert status(start(knowledge="Another task.")) == "computed"
    assert status(start(system="Speak rarely.")) == "computed"
    # the other decoder (export picks the default by timing, so either can be the default)
    other_decoder = next(d for d in ("decoder", "decoder_gqa") if d != b.decoder_name)
    gqa = start(open_bundle(bundle, other_decoder))
    assert gqa.warm is not None and gqa.warm.status == "computed"
    assert len(entries(user_cache)) == 4

    # another bundle (here: the same graphs, another manifest) has its own entry
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    data = json.loads((other / "manifest.json").read_text())
    data["model"]["system_prompt"] = "Speak rarely."
    (other / "manifest.json").write_text(json.dumps(data))
    assert status(start(open_bundle(other))) == "computed"
    assert len(entries(user_cache)) == 5

    # a damaged entry is computed again, and sound afterwards
    raw = bytearray((entry / KV_FILE).read_bytes())
    raw[-4:] = b"\xff\xff\xff\xff"
    (entry / KV_FILE).write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="proassist_edge.runtime.warm"):
        assert status(start()) == "computed"
    assert "fails its sha256" in caplog.text
    assert status(start()) == "restored"

    # an entry shipped in the bundle is read first
    shipped = tmp_path / "shipped"
    shutil.copytree(bundle, shipped)
    (shipped / WARM_DIR).mkdir()
    shutil.copytree(entry, shipped / WARM_DIR / entry.name)
    core = start(open_bundle(shipped))
    assert core.warm is not None and core.warm.status == "restored"
    assert core.warm.path == shipped / WARM_DIR / entry.name


class SealedDecoder:
    """A decoder whose memory cannot be read out (as TensorRT's)."""

    def __init__(self, capacity: int) -> None:
        self.kv_len, self.capacity = 0, capacity

    def append(self, embeds: np.ndarray) -> StepOut:
        raise AssertionError("not called")

    def reset(self) -> None:
        self.kv_len = 0

    def keep(self, prefix_len: int, start: int, end: int) -> None:
        raise AssertionError("not called")


def test_a_decoder_without_kv_transfer_starts_cold(tiny, user_cache: Path) -> None:
    bundle, _ = tiny
    b = open_bundle(bundle)
    dec = SealedDecoder(64)
    assert not isinstance(dec, KvTransfer) and isinstance(b.new_decoder(64), KvTransfer)
    done = warm_start(b, dec, [1, 2, 3])
    assert done.status == "cold" and not done.ready and "cannot take a memory" in done.reason
    assert dec.kv_len == 0 and entries(user_cache) == []


@pytest.mark.parametrize("decoder", DECODERS)
def test_export_and_import_kv_continue_the_same_memory(tiny, decoder: str) -> None:
    bundle, _ = tiny
    b = open_bundle(bundle, decoder)
    first, second = b.new_decoder(64), b.new_decoder(64)
    assert isinstance(first, KvTransfer) and isinstance(second, KvTransfer)
    first.append(b.embed(list(range(10, 30))))
    kv = first.export_kv()
    assert len(kv) == 2 * b.manifest.model.num_layers and kv[0].shape[2] == 20
    second.import_kv(kv)
    assert second.kv_len == 20
    x = b.embed([40, 41, 42])
    np.testing.assert_array_equal(first.append(x).logits, second.append(x).logits)
    with pytest.raises(BundleError, match="compute it again"):
        second.import_kv([a.astype(np.float16) for a in kv])
    with pytest.raises(BundleError, match="compute it again"):
        second.import_kv(kv[:-2])
    with pytest.raises(BundleError, match="compute it again"):
        b.new_decoder(8).import_kv(kv)  # type: ignore[attr-defined]


def test_replay_and_eval_take_warm(tiny, user_cache: Path, tmp_path: Path) -> None:
    from test_replay import write_episode

    from proassist_edge.cli import main
    from proassist_edge.eval.evaluate import evaluate
    from proassist_edge.eval.textsim import ExactSimilarity
    from proassist_edge.taskworld import generate_split

    bundle, thr = tiny
    ep = write_episode(tmp_path / "ep")
    records: list[list[dict]] = []
    for warm in ([], ["--warm"], ["--warm"]):
        out = tmp_path / f"events{len(records)}.jsonl"
        args = ["replay", str(bundle), "--episode", str(ep), "--events", str(out), "--quiet",
                "--threshold", str(thr), "--max-reply-tokens", "4", *warm]
        assert main(args) == 0
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert lines[0]["settings"]["warm"] == bool(warm)
        records.append([{k: e[k] for k in ("talk", "token_ids", "context_len")}
                        for e in lines if e["type"] == "frame"])
    assert records[0] == records[1] == records[2] and len(entries(user_cache)) == 1

    split = generate_split("test", tmp_path / "split", episodes=1)
    out = tmp_path / "eval.json"
    assert main(["eval", str(bundle), "--data", str(split), "--threshold", "1e-9", "--warm",
                 "--embedder", "exact", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"] == {"warm": True}
    assert len(entries(user_cache)) == 2  # the split's own system prompt
    reports = [evaluate(bundle, split, [thr], ExactSimilarity(),
                        settings={"max_reply_tokens": 4, "warm": warm}) for warm in (False, True)]
    assert reports[0] == reports[1] and reports[0]["num_gen"] > 0


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_restart_takes_only_the_ids_it_shares_with_the_opening(tiny, decoder: str) -> None:
    """The restored positions are those a cold append of the same ids computes; ids that part
    from the opening, an empty restart (drop_all) or another decoder take nothing more."""
    bundle, thr = tiny
    b = open_bundle(bundle, decoder)
    core = StreamCore(b, replace(small_context("summarize_and_drop", thr), warm=True), SYSTEM,
                      KNOWLEDGE)
    assert core.warm is not None and core.warm.prefix is not None
    prefix = core.warm.prefix
    opening = list(prefix.ids)
    restart = opening[:15] + [opening[15] + 1, 7, 8]  # parts from the opening at 15
    core.dec.reset()
    assert prefix.restore(core.dec, restart) == restart[15:] and core.kv_len == 15
    fresh = b.new_decoder(64)
    assert isinstance(fresh, KvTransfer) and isinstance(core.dec, KvTransfer)
    fresh.append(b.embed(opening[:15]))
    for got, want in zip(core.dec.export_kv(), fresh.export_kv(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    core.dec.reset()
    assert prefix.restore(core.dec, []) == [] and core.kv_len == 0
    assert prefix.restore(core.dec, [opening[0] + 1, *opening[1:]]) == [opening[0] + 1, *opening[1:]]
    assert core.kv_len == 0
    other = b.new_decoder(64)  # the lag controller's other graph would be another instance
    assert prefix.restore(other, opening) == opening and other.kv_len == 0
    assert (prefix.restores, prefix.tokens) == (1, 15)
    core.dec.append(b.embed([1]))
    with pytest.raises(ValueError, match="empty memory"):
        prefix.restore(core.dec, opening)
    assert WarmPrefix((1, 2), [], core.dec).shared([1, 2, 3]) == 2


def test_prompt_files(tmp_path: Path) -> None:
    text = tmp_path / "knowledge.txt"
    text.write_text("  Task knowledge: 1. a 2. b\n")
    assert read_prompt_file(text) == [WarmPrompt(None, "Task knowledge: 1. a 2. b")]
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"system": SYSTEM}))
    assert read_prompt_file(one) == [WarmPrompt(SYSTEM, "")]
    many = tmp_path / "many.json"
    many.write_text(json.dumps([{"knowledge": "k"}, {"system": "s", "knowledge": "k2"}]))
    assert read_prompt_file(many) == [WarmPrompt(None, "k"), WarmPrompt("s", "k2")]
    for bad in ("[]", "{nope", json.dumps({"task": "x"}), json.dumps([{"system": 3}]), '"text"'):
        many.write_text(bad)
        with pytest.raises(PromptFileError, match="prompt file"):
            read_prompt_file(many)
    with pytest.raises(PromptFileError, match="unreadable"):
        read_prompt_file(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def shipped(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The tiny checkpoint exported with `--prompt-file` (two prompts)."""
    from proassist_edge.cli import main

    _, ckpt, thr = tiny_bundle(5, "lm", 1, verify_frames=20)
    root = tmp_path_factory.mktemp("shipped")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps([{"system": SYSTEM, "knowledge": KNOWLEDGE}, {"knowledge": "k"}]))
    out = root / "bundle"
    assert main(["export", str(ckpt), "-o", str(out), "--verify-frames", "20", "--threshold",
                 str(thr), "--prompt-file", str(prompts)]) == 0
    return out, thr


def test_export_ships_the_warm_start_in_the_bundle(shipped, user_cache: Path, tmp_path: Path) -> None:
    from proassist_edge.manifest import load_manifest, sha256_file

    bundle, thr = shipped
    m = load_manifest(bundle)
    decoders = [k for k in m.graphs if k.startswith("decoder")]
    warm_files = sorted(f for f in m.files if f.startswith(f"{WARM_DIR}/"))
    assert len(warm_files) == 2 * 2 * len(decoders)  # kv.npy and warm.json, 2 prompts
    for f in warm_files:
        assert m.files[f] == sha256_file(bundle / f)
    assert any("warm start" in n and "--prompt-file" in n for n in m.notes)
    meta = json.loads((bundle / warm_files[1]).read_text())
    assert meta["key"]["runtime"] == "" and meta["computed_on"].startswith("onnxruntime ")
    assert meta["key"]["bundle"] == bundle_digest(m)
    assert not list(bundle.parent.glob(".bundle*")), "no temporary folder left"

    s = small_context("summarize_and_drop", thr)
    frames, messages = synthetic_stream(120, seed=3), dense_messages()
    for decoder in decoders:
        b = open_bundle(bundle, decoder)
        cold = list(StreamCore(b, s, SYSTEM, KNOWLEDGE).replay(frames, messages))
        core = StreamCore(b, replace(s, warm=True), SYSTEM, KNOWLEDGE)
        assert core.warm is not None and core.warm.status == "restored", decoder
        assert core.warm.path is not None and core.warm.path.parent == bundle / WARM_DIR
        assert_same(list(core.replay(frames, messages)), cold, decoder, 1e-5)
        assert core.warm.prefix is not None and core.warm.prefix.restores >= 1
        # the second prompt (the bundle's system prompt) is shipped too
        assert status(StreamCore(b, replace(s, warm=True), None, "k")) == "restored"
    assert entries(user_cache) == []  # nothing computed
    # a changed prompt does not reuse the shipped KV: computed into the user cache
    assert status(StreamCore(open_bundle(bundle), replace(s, warm=True), SYSTEM, "k")) == "computed"
    assert len(entries(user_cache)) == 1

    # a damaged shipped file fails the bundle's own check, as a damaged graph does
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    kv = damaged / next(f for f in warm_files if f.endswith(KV_FILE))
    raw = bytearray(kv.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"
    kv.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="fails its sha256"):
        open_bundle(damaged)


def test_a_failed_warm_start_leaves_no_bundle(tiny_bundle, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The entries are computed in export's temporary folder: a failure there leaves nothing."""
    import proassist_edge.runtime.warm as warm
    from proassist_edge.export.bundle import ExportOptions, export_bundle

    def fail(root: Path, prompts: object) -> dict[str, str]:
        raise BundleError("the prompt's keys are not finite")

    monkeypatch.setattr(warm, "ship_entries", fail)
    _, ckpt, _ = tiny_bundle(5, "lm", 1, verify_frames=20)
    out = tmp_path / "out"
    opts = ExportOptions(verify="none", variants=("portable",), prompts=(WarmPrompt(),))
    with pytest.raises(BundleError, match="not finite"):
        export_bundle(ckpt, out, options=opts)
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_child_carries_no_shipped_warm_start(shipped, user_cache: Path,
                                                          tmp_path: Path) -> None:
    """KV depends on the decoder's precision: quantize writes its child's files afresh and the
    parent's warm/ is not among them; the child's --warm computes its own."""
    from proassist_edge.manifest import load_manifest
    from proassist_edge.quant.quantize import quantize_bundle

    parent, thr = shipped
    child = tmp_path / "int8"
    quantize_bundle(parent, child, "int8", skip={"vision"}, streams=1, frames=6, reply_tokens=2,
                    per_channel=False, max_calibration_samples=16, threads=1, progress=False)
    m = load_manifest(child)
    assert not (child / WARM_DIR).exists()
    assert not [f for f in m.files if f.startswith(f"{WARM_DIR}/")]
    assert not [n for n in m.notes if n.startswith("warm start")]
    s = replace(small_context("drop_all", thr), warm=True)
    assert status(StreamCore(open_bundle(child), s, SYSTEM, KNOWLEDGE)) == "computed"


def test_int8_export_computes_the_warm_start_for_quantizes_child(tiny_bundle, tmp_path: Path,
                                                                 user_cache: Path) -> None:
    """export --precision int8 hands an fp32 bundle to quantize: that parent computes no entries
    (they would be the fp32 decoder's), the child gets its own, listed in its manifest."""
    from proassist_edge.export.bundle import ExportOptions, export_bundle
    from proassist_edge.manifest import load_manifest, write_manifest

    parents: list[bool] = []

    def quantizer(parent: Path, out: Path, precision: str) -> dict[str, object]:
        parents.append((parent / WARM_DIR).exists())
        shutil.copytree(parent, out)  # a stand-in child: the graphs as they are
        m = load_manifest(out)
        m.graphs["decoder"] = replace(m.graphs["decoder"], precision="int8")
        write_manifest(out, m)
        return {"targets_met": True}

    _, ckpt, thr = tiny_bundle(5, "lm", 1, verify_frames=20)
    out = tmp_path / "int8"
    opts = ExportOptions(verify="none", variants=("portable",), precision="int8",
                         check_resources=False, prompts=(WarmPrompt(SYSTEM, KNOWLEDGE),))
    export_bundle(ckpt, out, options=opts, quantizer=quantizer)
    assert parents == [False]
    m = load_manifest(out)  # checks the listed entries' sha256
    assert len([f for f in m.files if f.startswith(f"{WARM_DIR}/")]) == 2
    s = replace(small_context("drop_all", thr), warm=True)
    core = StreamCore(open_bundle(out), s, SYSTEM, KNOWLEDGE)
    assert core.warm is not None and core.warm.status == "restored"
    assert core.warm.path is not None and core.warm.path.parent == out / WARM_DIR
    assert entries(user_cache) == []
