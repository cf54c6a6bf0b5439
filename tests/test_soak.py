"""A short soak: 20 simulated minutes at I=10 with a 1024-token budget, every strategy."""

from __future__ import annotations

import numpy as np
import pytest

from proassist_edge.bench.soak import frame_source, soak
from proassist_edge.runtime.prompt import CONTEXT_STRATEGIES


@pytest.mark.parametrize("strategy", CONTEXT_STRATEGIES)
def test_memory_flat_and_context_bounded(tiny_bundle, strategy: str) -> None:
    bundle, _, _ = tiny_bundle(10, "head-mlp", 1)
    # never talks (silent iff P > threshold): the soak measures the memory of the frame path
    rep = soak(bundle, strategy, frames=2400 if strategy == "drop_all" else 1200, every=240,
               threshold=1e-9, max_seq_len=1024, source="noise")
    assert rep.resets >= 1
    assert rep.max_context <= 1024
    assert abs(rep.memory_growth) < 0.05, rep.checkpoints


def test_taskworld_source_cycles_real_episodes() -> None:
    """The default source: test-split episodes back to back, then again with a shifted view."""
    get = frame_source(32, 0, "taskworld")
    first = get(0)
    assert first.shape == (1, 32, 32, 3) and first.dtype == np.uint8
    n = next(i for i in range(1, 5000) if np.array_equal(get(i), first) or i > 4000)
    assert n > 200  # six whole episodes before anything repeats
    assert not np.array_equal(get(0), get(1))
