"""The TensorRT path's logic on the CPU, with onnxruntime sessions standing in for the engine:
appends longer than the frame profile fed in chunks (same decisions and tokens), the largest step
per past length, and build-engine's replay check that records an agreeing engine and refuses a
disagreeing one (the bundle unchanged). TensorRTDecoder's own code runs on an engine and a CUDA
runtime answered on the host (tests/trt_standin.py): its outputs, keep, fill, close, and bench
timing it as any decoder; greedy generation reuses one decoder. The engine itself:
scripts/gpu_check.sh, not yet run on a GPU."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_runtime_parity import KNOWLEDGE, SYSTEM, dense_messages, small_context
from trt_standin import HostCuda, engine_factory

from proassist_edge.device.engine_check import EngineRefusedError, compare_engine, record_engine
from proassist_edge.device.tensorrt import needs_fp32, optimization_profiles
from proassist_edge.export.verify import synthetic_stream
from proassist_edge.manifest import load_manifest
from proassist_edge.runtime.backend import Decoder, PortableDecoder, StepOut, make_session
from proassist_edge.runtime.bundle import Bundle, open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.greedy import GreedyGenerator
from proassist_edge.runtime.trt_decoder import ChunkedDecoder, append_in_chunks, max_step

SAME = ("talk", "token_ids", "text", "reset", "summary_ids", "context_len")


@pytest.fixture(scope="module")
def tiny(tiny_bundle) -> tuple[Path, float]:
    bundle, _, thr = tiny_bundle(5, "lm", 1, verify_frames=20)
    return bundle, thr


def stand_in(b: Bundle, max_new: int, noise: float = 0.0):
    """`capacity -> Decoder`: the portable graph on onnxruntime, cut into `max_new`-token steps
    as an engine's profile would cut it (with `noise`, logits an engine got wrong)."""
    m = b.manifest.model

    def make(capacity: int) -> Decoder:
        sess = make_session(str(b.root / b.manifest.graphs["decoder"].file), 1, "cpu")
        inner = PortableDecoder(sess, m.num_layers, m.num_kv_heads, m.head_dim, capacity)
        return ChunkedDecoder(Noisy(inner, noise) if noise else inner, max_new)

    return make


class Noisy:
    def __init__(self, inner: PortableDecoder, noise: float) -> None:
        self.inner, self.noise, self.rng = inner, noise, np.random.default_rng(1)
        self.capacity = inner.capacity

    @property
    def kv_len(self) -> int:
        return self.inner.kv_len

    def append(self, embeds: np.ndarray) -> StepOut:
        out = self.inner.append(embeds)
        logits = out.logits + self.noise * self.rng.standard_normal(out.logits.shape).astype(np.float32)
        return StepOut(logits, out.hidden, out.p_not_talk)

    def reset(self) -> None:
        self.inner.reset()

    def keep(self, prefix_len: int, start: int, end: int) -> None:
        self.inner.keep(prefix_len, start, end)


def test_largest_step_per_past_and_the_chunks() -> None:
    profiles = [p.to_dict() for p in optimization_profiles(10, 512, 2, 2, 8, 16, max_step_tokens=64)]
    assert max_step(profiles, 0) == 64 and max_step(profiles, 511) == 64 and max_step(profiles, 512) == 0
    sizes: list[int] = []

    def step(x: np.ndarray) -> StepOut:
        sizes.append(x.shape[1])
        return StepOut(np.zeros(3, np.float32), np.zeros(2, np.float32), None)

    append_in_chunks(step, np.zeros((1, 150, 16), np.float32), 0, lambda p: max_step(profiles, p))
    assert sizes == [64, 64, 22]
    with pytest.raises(Exception, match="no TensorRT profile takes a step over 512"):
        append_in_chunks(step, np.zeros((1, 2, 16), np.float32), 512, lambda p: max_step(profiles, p))


def test_chunked_appends_give_one_appends_outputs(tiny) -> None:
    bundle, _ = tiny
    b = open_bundle(bundle, "decoder", ep="cpu")
    x = np.random.default_rng(0).standard_normal((1, 23, b.manifest.model.hidden_size)).astype(np.float32)
    whole, cut = b.new_decoder(64), stand_in(b, 4)(64)
    a, c = whole.append(x), cut.append(x)
    assert whole.kv_len == cut.kv_len == 23
    np.testing.assert_allclose(a.logits, c.logits, atol=1e-4)
    assert int(np.argmax(a.logits)) == int(np.argmax(c.logits))


@pytest.mark.parametrize("strategy", ["summarize_and_drop"])
def test_a_stream_through_a_small_profile_decides_and_speaks_the_same(tiny, strategy: str) -> None:
    """The opening prompt with the knowledge, user turns and the summary request all exceed an
    8-token profile: chunked, the stream is the one-append stream."""
    bundle, thr = tiny
    b = open_bundle(bundle, "decoder", ep="cpu")
    s = small_context(strategy, thr)
    frames, messages = synthetic_stream(80, seed=3), dense_messages()
    ref = list(StreamCore(b, s, SYSTEM, KNOWLEDGE).replay(frames, messages))
    engine = dataclasses.replace(b, engine=stand_in(b, 8))
    got = list(StreamCore(engine, s, SYSTEM, KNOWLEDGE).replay(frames, messages))
    assert sum(r.reset is not None for r in ref) >= 1 and sum(r.talk for r in ref) > 0
    for field in SAME:
        assert [getattr(r, field) for r in got] == [getattr(r, field) for r in ref], field


def test_build_engine_records_an_agreeing_engine_and_refuses_another(tiny, tmp_path: Path) -> None:
    src, thr = tiny
    root = tmp_path / "b"
    shutil.copytree(src, root)
    data = json.loads((root / "manifest.json").read_text())
    data["model"]["default_threshold"] = thr  # a stream that talks
    (root / "manifest.json").write_text(json.dumps(data))
    b = open_bundle(root, "decoder", ep="cpu", use_engine=False)
    meta = {"device": "stand-in", "tensorrt": None, "profiles": []}

    bad = compare_engine(b, stand_in(b, 8, noise=50.0), frames=12)
    assert not bad.agree and bad.difference.startswith("frame ")
    built = root / ".decoder.engine.new"
    built.write_bytes(b"engine")
    with pytest.raises(EngineRefusedError, match="disagrees with onnxruntime"):
        record_engine(root, "decoder", built, meta, bad)
    assert not built.exists() and load_manifest(root).engines == {}

    good = compare_engine(b, stand_in(b, 8), frames=12)
    assert good.agree and good.talks > 0 and good.max_p_diff < 1e-4, good
    built.write_bytes(b"engine")
    out = record_engine(root, "decoder", built, meta, good)
    entry = load_manifest(root).engines["decoder"]
    assert out == root / "decoder.engine" and entry["file"] == "decoder.engine"
    assert entry["check"]["agree"] and json.loads((root / "decoder.engine.json").read_text())["check"]


def test_fp16_builds_keep_norms_and_softmax_in_fp32() -> None:
    assert all(needs_fp32(k) for k in ("NORMALIZATION", "SOFTMAX", "REDUCE"))
    assert needs_fp32("UNARY", "SQRT") and needs_fp32("ELEMENTWISE", "POW")
    assert not needs_fp32("MATRIX_MULTIPLY") and not needs_fp32("ELEMENTWISE", "SUM")


def engine_bundle(b: Bundle, max_step_tokens: int = 8, cuda: HostCuda | None = None) -> Bundle:
    """`b` with TensorRTDecoder over the stand-in engine of its portable graph."""
    m = b.manifest.model
    profiles = [p.to_dict() for p in optimization_profiles(
        m.tokens_per_frame, m.max_seq_len, m.num_layers, m.num_kv_heads, m.head_dim,
        m.hidden_size, max_step_tokens=max_step_tokens)]
    return dataclasses.replace(b, engine=engine_factory(b.root, b.manifest, profiles, cuda))


def test_the_engine_decoder_matches_onnxruntime_and_frees_its_buffers(tiny) -> None:
    bundle, _ = tiny
    b = open_bundle(bundle, "decoder", ep="cpu")
    cuda = HostCuda()
    dec, ref = engine_bundle(b, cuda=cuda).new_decoder(64), b.new_decoder(64)
    assert type(dec).__name__ == "TensorRTDecoder"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 23, b.manifest.model.hidden_size)).astype(np.float32)
    for step in (x, x[:, :1], x[:, :5]):  # a prompt in chunks of 8, a token, a frame
        a, r = dec.append(step), ref.append(step)
        np.testing.assert_allclose(a.logits, r.logits, atol=1e-4)
        assert a.p_not_talk == pytest.approx(r.p_not_talk, abs=1e-5)
    dec.keep(4, 10, dec.kv_len)
    ref.keep(4, 10, ref.kv_len)
    dec.fill_kv(30, np.random.default_rng(1).standard_normal)
    ref.fill_kv(30, np.random.default_rng(1).standard_normal)
    a, r = dec.append(x[:, :1]), ref.append(x[:, :1])
    assert dec.kv_len == ref.kv_len == 31
    np.testing.assert_allclose(a.logits, r.logits, atol=1e-4)
    dec.close()
    assert cuda.memory == {} and cuda.freed == cuda.allocated and cuda.streams == 0
    with pytest.raises(Exception, match="was closed"):
        dec.append(x[:, :1])


def test_bench_times_an_engine_decoder_like_any_other(tiny) -> None:
    """bench's latency sweep (fill, marks, bare runs) and decode comparison on TensorRTDecoder
    and on a chunked stand-in, which raised TypeError before."""
    from proassist_edge.bench.bandwidth import context_sweep, decode_compare, decode_prompt

    bundle, _ = tiny
    b = open_bundle(bundle, "decoder", ep="cpu")
    frame_tokens = b.encode_frames(synthetic_stream(1))
    for eng, name in ((engine_bundle(b), "TensorRTDecoder"),
                      (dataclasses.replace(b, engine=stand_in(b, 8)), "ChunkedDecoder")):
        sweep = context_sweep(eng, frame_tokens, [16, 40], [16], reps=2)
        assert sweep["decoder"] == name and sorted(sweep["points"]) == [16, 40]
        point = sweep["points"][16]
        assert point["decode"]["bare_ms"]["p50"] > 0 and "overhead_ms" in point["frame"]
        assert point["frame"]["ours_ms"]["p50"] > 0
    prompt = decode_prompt(b)[:20]
    got = decode_compare(engine_bundle(b), prompt, 5, reps=1)["ours"]
    want = decode_compare(b, prompt, 5, reps=1)["ours"]
    assert got["matches_greedy_generate"] and got["tokens"] == want["tokens"]


def test_greedy_generation_keeps_one_decoder_across_calls(tiny) -> None:
    from proassist_edge.runtime.core import greedy_generate

    bundle, _ = tiny
    b = open_bundle(bundle, "decoder", ep="cpu")
    cuda = HostCuda()
    eng = engine_bundle(b, cuda=cuda)
    made: list[Decoder] = []

    def counted(capacity: int) -> Decoder:
        assert eng.engine is not None
        made.append(eng.engine(capacity))
        return made[-1]

    counting = dataclasses.replace(eng, engine=counted)
    prompts = [list(range(5, 30)), list(range(40, 52)), [7, 8, 9]]  # longest first
    fresh = [greedy_generate(b, p, 6, eos=-1) for p in prompts]
    with GreedyGenerator(counting) as gen:
        got = [gen(p, 6, eos=-1) for p in prompts]
        buffers = len(cuda.memory)
        assert gen(prompts[0], 6, eos=-1) == fresh[0] and len(cuda.memory) == buffers
    assert got == fresh and len(made) == 1 and gen.made == 1
    assert cuda.memory == {}  # closed with the generator
    # without a decoder, greedy_generate closes the one it made
    greedy_generate(counting, prompts[2], 3)
    assert len(made) == 2 and cuda.memory == {}
