"""The latency bench: the CLI end to end on a tiny bundle, and each figure's arithmetic on known
data (percentiles, bandwidth, weight bytes, the FLOP model, the Jetson projection)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from proassist_edge.bench import bandwidth as bw
from proassist_edge.bench import latency as lat
from proassist_edge.bench.projection import BOARDS, Assumptions, ModelSpec, markdown, project
from proassist_edge.bench.report import HEADLINE_KEYS, headline
from proassist_edge.cli import main
from proassist_edge.device.speech import NullSink
from proassist_edge.runtime.bundle import open_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle, checkpoint) of the tiny fixture, exported once for this module."""
    from proassist_edge.export.bundle import ExportOptions, export_bundle
    from proassist_edge.export.fixture import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("bench")
    ckpt = write_tiny_checkpoint(root / "ckpt", tokens_per_frame=5)
    out = root / "bundle"
    export_bundle(ckpt, out, options=ExportOptions(verify_frames=10, max_reply_tokens=4))
    return out, ckpt


def test_bench_quick_json_has_finite_headline_and_a_png(tiny, tmp_path: Path) -> None:
    bundle, _ = tiny
    out, png = tmp_path / "bench.json", tmp_path / "ctx.png"
    code = main([
        "bench", str(bundle), "--quick", "--compare", "torch-reference", "--context-sweep", "64,512",
        "--json", str(out), "--plot", str(png), "--tts", "none",
    ])
    assert code == 0
    r = json.loads(out.read_text())
    b = r["bundles"][bundle.name]
    for key in HEADLINE_KEYS:
        if key == "decode_vs_ort_genai":  # needs the genai folder: tested on its own below
            assert r[key] is None
            continue
        assert isinstance(r[key], int | float) and math.isfinite(r[key]), (key, r[key])
        assert b["headline"][key] == r[key]
    assert r["speedup_vs_torch_reference"] > 0 and r["decode_over_bandwidth_floor"] > 0
    assert r["context_ratio_flops_predicted"] > 1.0
    assert b["stream"]["frames"] == 8 and 0 < b["stream"]["talk_frames"] < 8
    assert b["torch_reference"]["frames"] == 8
    assert b["decode"]["ours"]["matches_greedy_generate"] and "ort_genai" not in b["decode"]
    assert b["memory"]["peak_rss_mb"] > 0 and b["memory"]["torch_loaded"] is False
    assert b["size_bytes"] >= b["deployed_size_bytes"] > 0
    assert set(b["context_sweep"]["points"]) == {"64", "200", "512", "3500"}
    assert r["bandwidth"]["bytes_per_s"] > 0
    assert r["machine"]["cpu_cores"] and "load_average_start" in r["machine"]
    assert r["machine"]["other_processes_cores"] >= 0 and b["decode"]["other_processes_cores"] >= 0
    assert "| Jetson AGX Orin 64GB |" in r["projection_markdown"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_times_every_context_on_both_decoders(tiny) -> None:
    bundle, _ = tiny
    for name in ("decoder", "decoder_gqa"):
        b = open_bundle(bundle, name)
        frame_tokens = b.encode_frames(np.zeros((1, 32, 32, 3), np.uint8))
        sweep = bw.context_sweep(b, frame_tokens, [16, 48], [48], reps=2, overhead_reps=3)
        assert sorted(sweep["points"]) == [16, 48]
        assert sweep["points"][16]["decode"]["ours_ms"]["n"] == 2
        assert sweep["points"][48]["frame"]["bare_ms"]["n"] == 3
        assert "overhead_ms" in sweep["points"][48]["decode"]
        assert "overhead_ms" not in sweep["points"][16]["frame"]


def test_mark_puts_the_memory_back_for_both_decoders(tiny) -> None:
    bundle, _ = tiny
    for name in ("decoder", "decoder_gqa"):
        b = open_bundle(bundle, name)
        dec = b.new_decoder(64)
        bw.fill(dec, 20, np.random.default_rng(0))
        mark = bw._mark(dec)
        before = dec.append(b.embed([1])).logits.copy()
        bw._back(dec, mark)
        bw.CoreStep(b, dec).frame(np.ones((1, 5, b.manifest.model.hidden_size), np.float32))
        bw._back(dec, mark)
        assert dec.kv_len == 20
        np.testing.assert_allclose(dec.append(b.embed([1])).logits, before, atol=1e-5)


@pytest.mark.slow
def test_genai_folder_and_decode_in_turns_match_ours(tiny, tmp_path: Path) -> None:
    from proassist_edge.bench.cli_bench import genai_folder

    bundle, ckpt = tiny
    folder = genai_folder(ckpt, "fp32", tmp_path / "genai")
    assert (folder / "genai_config.json").is_file() and (folder / "model.onnx").is_file()
    assert genai_folder(ckpt, "fp32", tmp_path / "genai") == folder  # cached
    b = open_bundle(bundle)
    prompt = bw.decode_prompt(b)
    d = bw.decode_compare(b, prompt, 6, reps=1, genai=folder, threads=1)
    assert d["ours"]["matches_greedy_generate"] and len(d["ours"]["tokens"]) == 6
    assert d["ort_genai"]["new_tokens"] == 6 and d["ort_genai"]["decode_ms"]["n"] == 5
    assert d["ort_genai"]["token_agreement_with_ours"] == 1.0  # the same fp32 weights
    assert d["ort_genai"]["decode_ms_per_token"] > 0


def test_percentiles_on_known_data() -> None:
    p = lat.percentiles(range(1, 101))
    assert p["n"] == 100 and p["mean"] == 50.5
    # linear interpolation between order statistics: rank q/100 * (n - 1)
    assert p["p50"] == pytest.approx(50.5)
    assert p["p95"] == pytest.approx(95.05)
    assert p["p99"] == pytest.approx(99.01)
    assert lat.percentiles([7.0])["p99"] == 7.0
    assert lat.percentiles([1.0, float("nan"), 3.0])["p50"] == 2.0  # non-finite samples dropped
    assert lat.percentiles([])["p50"] is None
    assert lat.median([]) is None


def test_overhead_pairs_and_minima() -> None:
    o = bw.overhead([10.0, 12.0, 30.0], [9.0, 11.5, 12.0])
    assert o["overhead_ms"] == pytest.approx(1.0)  # median of (1, 0.5, 18)
    assert o["overhead_ms_min"] == pytest.approx(1.0)
    assert o["overhead_target_ms"] == pytest.approx(1.0 + 1.15)
    assert o["overhead_se_ms"] == pytest.approx(1.2533 * 1.4826 * 0.5 / math.sqrt(3))
    assert o["within_target"]


def test_bandwidth_is_positive_and_floor_divides() -> None:
    band = bw.measure_bandwidth(32 << 20, repeats=2, threads=2)
    assert band.bytes_per_s > 0 and band.threads == 2
    assert band.bytes_per_s == max(band.single_thread_bytes_per_s, band.threaded_bytes_per_s)
    w = bw.GraphWeights(bytes=10**9, total_bytes=10**9, params=0, source="test")
    fake = bw.Bandwidth(10e9, 10e9, 10e9, 1, 1, 1)
    fig = bw.bandwidth_figures(w, fake, 0.2)
    assert fig["decode_floor_ms"] == pytest.approx(100.0)
    assert fig["decode_over_bandwidth_floor"] == pytest.approx(2.0)


def test_weights_skip_lookup_tables_and_flop_ratio(tiny) -> None:
    bundle, _ = tiny
    b = open_bundle(bundle)
    m = b.manifest
    gqa = bw.decoder_weights(bundle, m, "decoder_gqa")
    portable = bw.decoder_weights(bundle, m, "decoder")
    assert gqa.bytes < gqa.total_bytes  # the rotary cos/sin caches are not read per token
    assert gqa.params == portable.params > m.model.vocab_size * m.model.hidden_size
    heads = m.model.hidden_size // m.model.head_dim
    attn = 4.0 * m.model.num_layers * heads * m.model.head_dim
    expected = (2.0 * gqa.params + attn * 4000) / (2.0 * gqa.params + attn * 100)
    assert bw.context_ratio_predicted(gqa.params, m.model, 100, 4000) == pytest.approx(expected)


def test_projection_follows_bytes_over_bandwidth() -> None:
    p = project()
    agx, nx, nano = (next(b for b in p["boards"] if b["board"] == n.name) for n in BOARDS[:3])
    assert agx["decode_floor_ms"] == pytest.approx(4.5e9 / 204.8e9 * 1e3)  # ~22 ms (jetson.md)
    assert agx["decode_floor_ms"] == pytest.approx(22.0, abs=0.1)
    assert nx["decode_floor_ms"] == pytest.approx(44.0, abs=0.1)
    assert nano["decode_floor_ms"] == pytest.approx(66.2, abs=0.1)
    m, a = ModelSpec(), Assumptions()
    assert m.kv_bytes_per_token == 128 * 1024
    bound = (4.5e9 + a.context * 128 * 1024) / 204.8e9 * 1e3
    assert agx["decode_bound_ms"] == pytest.approx(bound)
    assert agx["decode_ms_expected"] == pytest.approx([bound / 0.7, bound / 0.6])
    assert agx["decode_bound_by"] == "bandwidth" and agx["frame_step_bound_by"] == "bandwidth"
    assert agx["no_talk_frame_ms_expected"][0] == pytest.approx(
        agx["vision_ms_expected"] + agx["frame_step_ms_expected"][0])
    assert tuple(p["assumptions"]["efficiency"]) == (0.6, 0.7)
    assert "Jetson Orin NX 16GB" in markdown(p)


def test_speech_timer_records_ttfa_and_lag_and_closes() -> None:
    timer = lat.SpeechTimer(NullSink())
    timer.say(lat._Piece("Take the red block.", t_frame=1.0, t_decided=1.5, first=True, last=False))
    timer.say(lat._Piece("", t_frame=1.0, t_decided=1.5, first=False, last=True))
    timer.q.join()  # idle() must return once every piece is handled
    timer.close(timeout=5)
    assert not timer.thread.is_alive()
    assert len(timer.ttfa_ms) == 1 and len(timer.lag_ms) == 1 and len(timer.tts_ms) == 1


def test_headline_of_a_section_without_alternatives() -> None:
    section = {
        "stream": {"stages_ms": {"ttfa": {"p50": 120.0}, "decode": {"p50": 10.0}},
                   "no_talk_step_ms_p50": 50.0, "deadline_misses": 2},
        "torch_reference": {"no_talk_step_ms_p50": 150.0, "stages_ms": {"decode": {"p50": 40.0}}},
        "decode": {"ours": {"decode_ms_per_token": 12.0}, "ort_genai": {"decode_ms_per_token": 10.0}},
        "limit": {"decode_over_bandwidth_floor": 1.5},
        "context_sweep": {"points": {
            256: {"decode": {"ours_ms": {"p50": 10.0}}},
            200: {"decode": {"ours_ms": {"p50": 9.0}, "overhead_ms": 0.3},
                  "frame": {"ours_ms": {"p50": 20.0}, "overhead_ms": 0.7}},
            3500: {"decode": {"ours_ms": {"p50": 20.0}}}}},
        "context_ratio_flops_predicted": 1.4,
    }
    h = headline(section, [256, 3500])
    assert h["speedup_vs_torch_reference"] == pytest.approx(3.0)
    assert h["speedup_vs_torch_reference_decode"] == pytest.approx(4.0)
    assert h["decode_vs_ort_genai"] == pytest.approx(10.0 / 12.0)  # tokens/s: ours over genai's
    assert h["context_ratio"] == pytest.approx(2.0) and h["context_ratio_contexts"] == [256, 3500]
    assert h["overhead_ms_ctx200"] == pytest.approx(0.7) and h["overhead_ms_ctx3500"] is None
    assert h["ttfa_ms_p50"] == 120.0 and h["deadline_misses"] == 2


def test_other_load_counts_other_processes_and_not_our_own_threads() -> None:
    """A child burning a core shows up as about one core of other load; our own busy loop does
    not (the child is measured before it is reaped: reaped children count as ours)."""
    import subprocess
    import sys
    import time

    from proassist_edge.bench.busy import BUSY_CORES, OtherLoad, busy_note

    def over(seconds: float, work) -> float:  # type: ignore[no-untyped-def]
        load = OtherLoad()
        work(seconds)
        cores = load.cores()
        assert cores is not None  # Linux: /proc/stat is there
        return cores

    def spin(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    assert busy_note("x", BUSY_CORES) is None and busy_note("x", None) is None
    assert "1.50 cores" in (busy_note("the decode", 1.5) or "")
    base = over(0.5, time.sleep)
    if base > BUSY_CORES:  # their load then moves between the windows by more than we measure
        pytest.skip(f"other processes already use {base:.2f} cores: the machine is not quiet")
    own = over(1.0, spin)
    assert own - base < 0.4, (base, own)
    if base > (os.cpu_count() or 1) - 1.5:
        pytest.skip(f"other processes already use {base:.1f} cores: no room for the burner")
    burn = "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
    burner = subprocess.Popen([sys.executable, "-c", burn])
    try:
        time.sleep(0.5)  # past the interpreter's start
        child = over(1.5, time.sleep)
    finally:
        burner.wait()
    assert child - base > 0.5, (base, child)


@pytest.mark.parametrize("precision", ["portable", "fp32", "int8", "int4"])
def test_weight_matmuls_cut_out_hold_every_weight_read_per_token(tiny, tmp_path, precision) -> None:
    """The cut-out graph has every weight matmul of the decoder (4 per layer and the LM head in
    the GQA graph, whatever the format; q/k/v and gate/up apart in the portable one), reads the
    same weight bytes but the norms', and runs."""
    import onnx

    from proassist_edge.bench import kernels
    from proassist_edge.quant import graphs as qg

    bundle, _ = tiny
    src = bundle / ("decoder.onnx" if precision == "portable" else "decoder_gqa.onnx")
    if precision in ("int8", "int4"):
        dst = tmp_path / "decoder_gqa.onnx"
        qg.apply(qg.Recipe(precision), src, dst, [w.name for w in qg.weight_nodes(qg.load(src))])
        src = dst
    cut = kernels.weight_only_model(src)
    assert cut is not None
    model, ops, count = cut
    b = open_bundle(bundle)
    per_layer = 7 if precision == "portable" else 4
    assert count == per_layer * b.manifest.model.num_layers + 1
    expected = {"int8": "MatMulInteger", "int4": "MatMulNBits"}.get(precision, "MatMul")
    assert ops[expected] == count
    onnx.save(model, str(tmp_path / "cut.onnx"))
    cut_bytes, all_bytes = (bw.graph_weights(p).bytes for p in (tmp_path / "cut.onnx", src))
    norms = (2 * b.manifest.model.num_layers + 1) * b.manifest.model.hidden_size * 4
    assert cut_bytes <= all_bytes <= cut_bytes + norms + 64
    t = kernels.time_weight_matmuls(src, lambda: None, threads=1, reps=1, runs=2)
    assert t["weight_matmuls"] == count and t["weight_matmuls_ms"] > 0
