"""Execution providers (runtime/providers.py) and the decoder's KV memory on the session's device
(runtime/backend.py DeviceKv), on real onnxruntime CPU sessions: the choice for auto and for a
named provider, the typed error for one this build lacks or cannot load, `--ep` through replay,
the manifest's per-provider decoder, and the device code path (KV edited by round trips) giving
the host path's decisions and tokens bit for bit."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_replay import frame_records, write_episode
from test_runtime_parity import KNOWLEDGE, SYSTEM, dense_messages, small_context

from proassist_edge.export.verify import synthetic_stream
from proassist_edge.runtime import providers as pv
from proassist_edge.runtime.backend import Decoder, GqaDecoder, make_session
from proassist_edge.runtime.bundle import Bundle, open_bundle
from proassist_edge.runtime.core import StreamCore

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
SAME = ("talk", "token_ids", "text", "reset", "summary", "summary_ids", "context_len", "p_not_talk")


@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> tuple[Path, float]:
    bundle, _, thr = tiny_bundle(5, "lm", 1, verify_frames=20)
    return bundle, thr


@pytest.fixture(autouse=True)
def no_env_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pv.ENV, "auto")  # undone after the test, as what --ep sets in it is


def offer(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))


# --- selection --------------------------------------------------------------------------------
def test_auto_takes_the_best_offered_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    offer(monkeypatch, ["CPUExecutionProvider", "AzureExecutionProvider", *ALL[:2]])
    assert pv.candidates("auto") == ["tensorrt", "cuda", "cpu"]
    offer(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert pv.candidates("auto") == ["cuda", "cpu"] and pv.candidates("cuda") == ["cuda"]
    offer(monkeypatch, ["CPUExecutionProvider"])
    assert pv.candidates("auto") == ["cpu"]
    assert pv.session_providers("tensorrt") == ALL
    # GroupQueryAttention / MatMulNBits graphs skip TensorRT's parser: CUDA takes them
    assert pv.session_providers("tensorrt", contrib_ops=True) == ALL[1:]
    assert pv.session_providers("cpu") == ALL[2:]
    with pytest.raises(ValueError, match="choose one of auto, cpu, cuda, tensorrt"):
        pv.candidates("gpu")


def test_a_provider_this_build_lacks_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    offer(monkeypatch, ["CPUExecutionProvider"])
    with pytest.raises(pv.ExecutionProviderError) as e:
        pv.candidates("cuda")
    text = str(e.value)
    assert e.value.ep == "cuda" and e.value.reason == pv.NOT_OFFERED
    assert "CUDAExecutionProvider (--ep cuda)" in text and "offers cpu" in text
    assert "pip install 'proassist-edge[gpu]'" in text and "re-export" not in text


def test_a_provider_that_does_not_load_is_refused_not_silently_cpu(
    tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime falls back to the CPU when CUDA's library is absent (here: a CPU build that
    is told it has CUDA); a session asked for CUDA is refused with the reason, auto moves on."""
    bundle, _ = tiny
    offer(monkeypatch, ALL[1:])
    path = str(bundle / "vision.onnx")
    with pytest.raises(pv.ExecutionProviderError) as e:
        make_session(path, 1, "cuda")
    assert e.value.reason == pv.MISSING_LIBRARY and "CUDAExecutionProvider" in str(e.value)
    assert "doctor" in str(e.value) and "--ep cpu" in str(e.value)
    assert make_session(path, 1, "auto").get_providers() == ["CPUExecutionProvider"]
    monkeypatch.setenv(pv.ENV, "cuda")  # what --ep sets for library calls
    with pytest.raises(pv.ExecutionProviderError):
        open_bundle(bundle)


@pytest.mark.parametrize(("text", "reason"), [
    ("CUDA failure 2: out of memory ; GPU=0", pv.OUT_OF_MEMORY),
    ("Failed to allocate memory for requested buffer of size 8589934592", pv.OUT_OF_MEMORY),
    ("libcudnn.so.9: cannot open shared object file: No such file or directory", pv.MISSING_LIBRARY),
    ("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
     "GroupQueryAttention(1) node with name 'attn'", pv.UNSUPPORTED_OP),
    ("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model failed", pv.FAILED),
])
def test_errors_say_why_and_what_to_do(text: str, reason: str) -> None:
    err = pv.provider_error("cuda", RuntimeError(text), "decoder_gqa.onnx")
    assert err.reason == reason and "CUDAExecutionProvider" in str(err)
    assert "decoder_gqa.onnx" in str(err) and "Fix: " in str(err)


# --- bundles ----------------------------------------------------------------------------------
def test_the_manifest_names_a_decoder_per_provider(tiny, tmp_path: Path) -> None:
    bundle, _ = tiny
    old = open_bundle(bundle, ep="cpu")
    assert old.ep == "cpu" and old.decoder_name == old.manifest.default_decoder  # no field: default
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    other = next(k for k in data["graphs"] if k.startswith("decoder") and k != old.decoder_name)
    data["ep_decoders"] = {"cpu": other, "cuda": old.decoder_name}
    (copy / "manifest.json").write_text(json.dumps(data))
    b = open_bundle(copy, ep="cpu")
    assert b.decoder_name == other and b.manifest.decoder_for("cuda") == old.decoder_name
    assert open_bundle(copy, old.decoder_name, ep="cpu").decoder_name == old.decoder_name


def test_replay_takes_ep(tiny, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from proassist_edge.cli import main

    bundle, thr = tiny
    ep, out = write_episode(tmp_path / "ep"), tmp_path / "out.jsonl"
    args = ["replay", str(bundle), "--episode", str(ep), "--events", str(out),
            "--threshold", str(thr), "--max-reply-tokens", "4", "--quiet"]
    assert main([*args, "--ep", "cpu"]) == 0
    assert "replayed 10 frames" in capsys.readouterr().out
    cpu = [(r["talk"], r["token_ids"]) for r in frame_records(out)]
    offer(monkeypatch, ["CPUExecutionProvider"])
    assert main([*args, "--ep", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "CUDAExecutionProvider (--ep cuda) failed" in err and "not in this onnxruntime" in err
    monkeypatch.undo()
    assert main([*args, "--ep", "auto"]) == 0  # auto is the CPU here: the same decisions
    assert [(r["talk"], r["token_ids"]) for r in frame_records(out)] == cpu


# --- the KV memory on the session's device ------------------------------------------------------
@dataclasses.dataclass
class RoundTripBundle(Bundle):
    """A bundle whose GQA decoder edits its KV as it would on a GPU: each buffer copied down,
    edited and written back (`update_inplace`), never through a view of its memory."""

    def new_decoder(self, capacity: int | None = None) -> Decoder:
        dec = super().new_decoder(capacity)
        assert isinstance(dec, GqaDecoder)
        m = self.manifest.model
        return GqaDecoder(dec.sess, m.num_layers, m.num_kv_heads, m.head_dim, dec.capacity,
                          dec.with_hidden, device="cpu", host_views=False)


@pytest.mark.parametrize("strategy", ["drop_middle", "summarize_and_drop"])
def test_device_kv_path_gives_the_host_paths_decisions_and_tokens(tiny, strategy: str) -> None:
    bundle, thr = tiny
    b = open_bundle(bundle, "decoder_gqa", ep="cpu")
    dec = b.new_decoder(64)
    assert isinstance(dec, GqaDecoder) and dec.device == "cpu" and dec.kv_mem.views is not None
    s = small_context(strategy, thr)
    frames, messages = synthetic_stream(100, seed=3), dense_messages()
    host = list(StreamCore(b, s, SYSTEM, KNOWLEDGE).replay(frames, messages))
    rt = RoundTripBundle(**{f.name: getattr(b, f.name) for f in dataclasses.fields(Bundle)})
    device = list(StreamCore(rt, s, SYSTEM, KNOWLEDGE).replay(frames, messages))
    assert sum(r.reset is not None for r in host) >= 1 and 0 < sum(r.talk for r in host) < 100
    for field in SAME:
        assert [getattr(r, field) for r in device] == [getattr(r, field) for r in host], field


def test_device_kv_export_import_and_keep_match_the_host_path(tiny) -> None:
    bundle, _ = tiny
    b = open_bundle(bundle, "decoder_gqa", ep="cpu")
    m = b.manifest.model
    host = b.new_decoder(48)
    assert isinstance(host, GqaDecoder)
    dev = GqaDecoder(host.sess, m.num_layers, m.num_kv_heads, m.head_dim, 48, host.with_hidden,
                     device="cpu", host_views=False)
    x = np.random.default_rng(0).standard_normal((1, 12, m.hidden_size)).astype(np.float32)
    outs = []
    for d in (host, dev):
        d.append(x)
        d.keep(3, 6, 12)
        kv = d.export_kv()
        d.reset()
        d.import_kv(kv)
        outs.append((d.append(x[:, :1]).logits.copy(), d.export_kv()))
    assert np.array_equal(outs[0][0], outs[1][0])
    assert all(np.array_equal(a, c) for a, c in zip(outs[0][1], outs[1][1], strict=True))
