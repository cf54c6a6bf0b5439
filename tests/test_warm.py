"""Warm start (runtime/warm.py): the opening prompt's KV restored from a cache of plain .npy and
JSON gives a cold start's decisions and tokens for every context strategy and both decoders; a
changed prompt, bundle or decoder, or a damaged entry, is computed again."""

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
from proassist_edge.runtime.warm import ENTRY_FILE, KV_FILE, WARM_DIR, warm_start

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
    """A cold start and a warm one restoring the cache: the same stream through every reset
    (after one the stream never restores: drop_all starts from the frame, drop_middle keeps its
    prefix, a summary restarts from its own message)."""
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
        assert core.warm.status == "restored"  # no reset restored anything
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
    gqa = start(open_bundle(bundle, "decoder_gqa"))
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
