"""The runtime loads and runs a bundle where torch is not installed.

CI builds the wheel into a venv with the base dependencies only and points
PROASSIST_EDGE_NOTORCH_PYTHON at it. Elsewhere the same script runs in this interpreter with
torch made unimportable (sys.modules['torch'] = None makes every `import torch` fail).
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import sys
if {block}:
    sys.modules["torch"] = None
import numpy as np
from proassist_edge.runtime.bundle import open_bundle
from proassist_edge.runtime.core import StreamCore
from proassist_edge.runtime.prompt import StreamSettings
b = open_bundle(sys.argv[1])
core = StreamCore(b, StreamSettings(threshold=float(sys.argv[2]), max_reply_tokens=4))
frames = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
results = list(core.replay(frames))
assert len(results) == 6
import importlib, pkgutil
import proassist_edge.runtime as rt
for mod in pkgutil.iter_modules(rt.__path__):
    importlib.import_module("proassist_edge.runtime." + mod.name)
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None], "torch was imported"
print("OK", sum(r.talk for r in results))
"""


def test_bundle_runs_without_torch(tiny_bundle, tmp_path) -> None:
    bundle, _, thr = tiny_bundle(1, "lm", 1)
    python = os.environ.get("PROASSIST_EDGE_NOTORCH_PYTHON")
    script = SCRIPT.format(block=python is None)
    proc = subprocess.run(
        [python or sys.executable, "-c", script, str(bundle), str(thr)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout: its proassist_edge/ folder would shadow the installed package
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")
