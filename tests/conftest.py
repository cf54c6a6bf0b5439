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

    def __call__(
        self,
        tokens_per_frame: int = 5,
        w2t: str = "lm",
        lora_rounds: int = 1,
        train_mode: str = "lora",
        seed: int = 0,
        sep_token: str = "",
    ) -> Path:
        from proassist_edge.export.fixture import write_tiny_checkpoint

        key = (tokens_per_frame, w2t, lora_rounds, train_mode, seed, sep_token)
        if key not in self.made:
            out = self.root / ("_".join(map(str, key[:5])) + ("_sep" if sep_token else ""))
            self.made[key] = write_tiny_checkpoint(
                out, tokens_per_frame, w2t, lora_rounds, train_mode, seed, sep_token=sep_token
            )
        return self.made[key]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("ckpts"))


def talk_threshold(ckpt: Path, frames: int = 40) -> float:
    """A threshold near the median P(not talk) of a random fixture, so it both talks and not."""
    import numpy as np

    from proassist_edge.export.checkpoint import load_checkpoint
    from proassist_edge.export.reference import ReferenceLoop
    from proassist_edge.export.verify import synthetic_stream
    from proassist_edge.runtime.prompt import StreamSettings

    ck = load_checkpoint(ckpt)
    loop = ReferenceLoop(ck.model, ck.tokenizer, ck.chat, StreamSettings(threshold=1e-9))  # never talks
    ps = [r.p_not_talk for r in loop.run(synthetic_stream(frames))]
    return float(np.median(ps))


class BundleFactory:
    def __init__(self, root: Path, ckpts: CheckpointFactory) -> None:
        self.root, self.ckpts = root, ckpts
        self.made: dict[tuple, tuple[Path, Path, float]] = {}

    def __call__(
        self,
        tokens_per_frame: int = 5,
        w2t: str = "lm",
        lora_rounds: int = 1,
        verify_frames: int = 150,
        train_mode: str = "lora",
        sep_token: str = "",
    ) -> tuple[Path, Path, float]:
        """(bundle, checkpoint, a threshold that makes the random model talk about half the time)."""
        from proassist_edge.export.bundle import ExportOptions, export_bundle

        key: tuple[object, ...] = (tokens_per_frame, w2t, lora_rounds)
        key += (train_mode,) if train_mode != "lora" else ()
        key += ("sep",) if sep_token else ()
        if key not in self.made:
            ckpt = self.ckpts(tokens_per_frame, w2t, lora_rounds, train_mode, sep_token=sep_token)
            thr = talk_threshold(ckpt)
            out = self.root / "_".join(map(str, key))
            opts = ExportOptions(verify_frames=verify_frames, max_reply_tokens=6, threshold=thr)
            export_bundle(ckpt, out, options=opts)
            self.made[key] = (out, ckpt, thr)
        return self.made[key]


@pytest.fixture(scope="session")
def tiny_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: CheckpointFactory
) -> BundleFactory:
    return BundleFactory(tmp_path_factory.mktemp("bundles"), tiny_ckpt)
