"""Shared fixtures: tiny checkpoints in the released layout, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CheckpointFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple, Path] = {}

    def __call__(self, tokens_per_frame: int = 5, w2t: str = "lm", lora_rounds: int = 1,
                 train_mode: str = "lora", seed: int = 0) -> Path:
        from proassist_edge.export.fixture import write_tiny_checkpoint

        key = (tokens_per_frame, w2t, lora_rounds, train_mode, seed)
        if key not in self.made:
            out = self.root / "_".join(map(str, key))
            self.made[key] = write_tiny_checkpoint(out, tokens_per_frame, w2t, lora_rounds, train_mode, seed)
        return self.made[key]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("ckpts"))
