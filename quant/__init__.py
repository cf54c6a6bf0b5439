"""int8 / int4 / fp16 children of an fp32 bundle, calibrated on multimodal streams, with the
accuracy they cost written into each child (quant_report.json).

Imports are lazy: `proassist_edge.cli.quant` must load (for `proassist-edge --help`) where onnx
and tqdm are not installed, as on the glasses.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "quantize_bundle": "quantize",
    "layer_sensitivity": "sensitivity",
    "Targets": "report",
    "render": "report",
    "QuantizeError": "graphs",
    "add_quantize_parser": "cli",
    "run_quantize": "cli",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
