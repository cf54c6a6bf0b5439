"""bench/tools.py: the run record (time, the process tree's peak RSS, the tool's own stages),
the projection's parameter counts, the table. The tools themselves run in the bench, not here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from proassist_edge.bench import tools


def test_timed_records_the_tree_peak_and_the_tools_stages(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"stages": {"a": {"seconds": 1.5, "peak_rss_bytes": 10}},
                                   "peak_rss_bytes": 10}))
    # a parent holding ~40 MB whose child holds ~80 MB: the tree's peak counts both
    child = "b = b'y' * (80 << 20); import time; time.sleep(3)"
    code = f"import subprocess, sys; a = b'x' * (40 << 20); subprocess.run([sys.executable, '-c', {child!r}])"
    run = tools.timed("export tiny", [sys.executable, "-c", code], tmp_path / "log", summary)
    assert run.returncode == 0 and run.seconds > 1.0 and run.target_s == 60.0
    assert run.peak_tree_rss_bytes > 120 << 20 > run.max_process_rss_bytes > 80 << 20
    assert run.stages == {"a": {"seconds": 1.5, "peak_rss_bytes": 10}}
    assert run.load_before.count(",") == 2
    failed = tools.timed("x", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log2")
    assert failed.returncode == 3 and tools.verdict(failed) == "failed (exit 3)"
    text = tools.render([run, failed])
    assert "export tiny" in text and "met (<= 60 s)" in text and "a 1.5 s" in text


def test_shape_parameters_are_counted_from_the_configs() -> None:
    n1, n8 = tools.shape_params("llama-3.2-1b"), tools.shape_params("llama-3.1-8b")
    # Llama-3.2-1B: 1.236 B with its head tied to the table; Llama-3.1-8B: 8.03 B; the tower ~0.43 B
    assert 1.65e9 < n1 < 1.68e9 and 8.44e9 < n8 < 8.48e9
