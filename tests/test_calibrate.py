"""The default talk threshold: chosen on validation data, carried by the checkpoint config into
the bundle manifest, where the runtime and `eval` take it as their default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from proassist_edge.export.model import ProAssistConfig
from proassist_edge.taskworld.calibrate import best_threshold, main


def test_best_f1_wins_and_ties_go_nearest_one_half() -> None:
    sweep = {"0.3": {"F1": 0.6}, "0.5": {"F1": 0.7}, "0.7": {"F1": 0.8}}
    assert best_threshold(sweep) == 0.7
    tie = {"0.2": {"F1": 0.8}, "0.4": {"F1": 0.8}, "0.8": {"F1": 0.8}}
    assert best_threshold(tie) == 0.4


def sweep_entry(f1: float, right: int, gen: int, ref: int = 10) -> dict:
    return {"F1": f1, "num_gen": gen, "num_ref": ref,
            "content": {"num_right_step": right, "right_step_rate": right / gen if gen else 0.0}}


def test_select_right_step_counts_right_replies_as_f1_counts_matches() -> None:
    sweep = {
        "0.3": sweep_entry(0.8, right=4, gen=10),  # the best F1, 4 of its 10 replies right
        "0.5": sweep_entry(0.7, right=7, gen=10),  # fewer good matches, more right steps
        "0.8": sweep_entry(0.2, right=2, gen=2),  # nearly silent: every reply right, rate 1.0
    }
    assert best_threshold(sweep) == 0.3 == best_threshold(sweep, "f1")
    assert best_threshold(sweep, "right_step") == 0.5  # 2*7/20, not the silent 0.8's 2*2/12
    tie = {"0.4": sweep_entry(0.6, 5, 10), "0.6": sweep_entry(0.7, 5, 10)}
    assert best_threshold(tie, "right_step") == 0.6  # then F1
    with pytest.raises(ValueError, match="select"):
        best_threshold(sweep, "bleu")


def test_calibrate_select_right_step_records_the_content_score(
    tiny_bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole command on a tiny fixture bundle (export replaced by a copy), scored exactly."""
    from proassist_edge.export import bundle as export_mod
    from proassist_edge.taskworld import models

    bundle, ckpt, thr = tiny_bundle(1, "lm", 1)
    meta_path = tmp_path / "asset.json"
    meta_path.write_text(json.dumps({"proassist": {"default_threshold": 0.5}}))
    monkeypatch.setattr(models, "shipped_checkpoint", lambda name: ckpt)
    monkeypatch.setattr(models, "asset_paths", lambda name: (tmp_path / "w", meta_path))
    monkeypatch.setattr(export_mod, "export_bundle",
                        lambda src, out, options=None: shutil.copytree(bundle, out))
    rc = main(["taskworld-tiny", "--episodes", "1", "--thresholds", f"{thr:g}", "1e-9",
               "--select", "right_step", "--embedder", "exact", "--test-episodes", "1"])
    assert rc == 0
    meta = json.loads(meta_path.read_text())
    cal = meta["calibration"]
    assert cal["select"] == "right_step" and "--select right_step" in cal["command"]
    assert set(cal["content"]) == {f"{thr:g}", "1e-09"}
    assert cal["content"]["1e-09"]["num_replies"] == 0  # never talks: no reply to be right
    chosen = cal["content"][f"{cal['chosen']:g}"]
    assert cal["chosen_content"] == chosen and 0.0 <= chosen["right_step_rate"] <= 1.0
    assert meta["proassist"]["default_threshold"] == cal["chosen"]
    test = meta["metrics"]["test-1-bundle"]
    assert test["threshold"] == cal["chosen"] and "right_step_rate" in test["content"]
    out = capsys.readouterr().out
    assert "chosen on right_step" in out and "test content: right step" in out


def test_config_threshold_reaches_the_manifest(tiny_ckpt, tmp_path: Path) -> None:
    from proassist_edge.export.bundle import ExportOptions, export_bundle
    from proassist_edge.runtime.bundle import open_bundle
    from proassist_edge.runtime.core import settings_from_manifest

    plain = ProAssistConfig.from_json({"llm_pretrained": "a", "vision_pretrained": "b"})
    assert plain.default_threshold == 0.5  # released checkpoints: the paper's default
    src = tiny_ckpt(1, "lm", 1)
    shutil.copytree(src.parent, tmp_path / "fx")  # with the base model folders it points at
    ckpt = tmp_path / "fx" / src.name
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "default_threshold": 0.7}))
    opts = ExportOptions(verify=False, variants=("portable",))
    export_bundle(ckpt, tmp_path / "b", options=opts)
    b = open_bundle(tmp_path / "b")
    assert b.manifest.model.default_threshold == 0.7
    assert settings_from_manifest(b).threshold == 0.7
    export_bundle(ckpt, tmp_path / "b2", options=ExportOptions(verify=False, variants=("portable",),
                                                               threshold=0.3))
    assert open_bundle(tmp_path / "b2").manifest.model.default_threshold == 0.3  # --threshold wins
