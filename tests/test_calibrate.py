"""The default talk threshold: chosen on validation data, carried by the checkpoint config into
the bundle manifest, where the runtime and `eval` take it as their default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from proassist_edge.export.model import ProAssistConfig
from proassist_edge.taskworld.calibrate import best_threshold


def test_best_f1_wins_and_ties_go_nearest_one_half() -> None:
    sweep = {"0.3": {"F1": 0.6}, "0.5": {"F1": 0.7}, "0.7": {"F1": 0.8}}
    assert best_threshold(sweep) == 0.7
    tie = {"0.2": {"F1": 0.8}, "0.4": {"F1": 0.8}, "0.8": {"F1": 0.8}}
    assert best_threshold(tie) == 0.4


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
