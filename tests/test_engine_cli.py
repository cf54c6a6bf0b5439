"""build-engine: where TensorRT is missing the command says so and changes nothing."""

from __future__ import annotations

import hashlib

from proassist_edge.cli import main


def test_build_engine_without_tensorrt_is_a_clear_error(tiny_bundle, capsys) -> None:
    bundle, _, _ = tiny_bundle(1, "lm", 1)
    before = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert main(["build-engine", str(bundle), "--fp16"]) == 1
    assert "JetPack" in capsys.readouterr().err
    assert hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest() == before
    assert not list(bundle.glob("*.engine"))
