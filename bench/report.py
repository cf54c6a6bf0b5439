"""The bench's outputs: headline figures, the JSON file, the terminal tables and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

HEADLINE_KEYS = (
    "speedup_vs_torch_reference",
    "decode_vs_ort_genai",
    "decode_over_bandwidth_floor",
    "weight_matmuls_over_bandwidth_floor",
    "context_ratio",
    "context_ratio_flops_predicted",
    "overhead_ms_ctx200",
    "overhead_ms_ctx3500",
    "ttfa_ms_p50",
    "deadline_misses",
)

DEFINITIONS = {
    "speedup_vs_torch_reference": "median no-talk frame step of the PyTorch reference loop / "
    "ours, same frames in lockstep (higher is better)",
    "speedup_vs_torch_reference_decode": "median reply-token decode, reference / ours",
    "decode_vs_ort_genai": "our greedy decode tokens/s / onnxruntime-genai's on the same "
    "weights, precision, prompt and threads (1.0 = parity, above 1 = faster than genai)",
    "decode_over_bandwidth_floor": "our decode time per token / (decoder weight bytes / measured "
    "memory read bandwidth) (1.0 = at the physical limit)",
    "weight_matmuls_over_bandwidth_floor": "the decoder's weight matmuls alone (cut out into a "
    "graph of their own, same kernels), as a share of a decode step timed in turns with it, "
    "times decode_over_bandwidth_floor: how far the kernels themselves are from the memory "
    "bandwidth (the rest of the step is attention, norms, activations and the loop); the share "
    "moves between processes (SmolLM2 int4 here: 0.72-1.09), so read it as approximate",
    "context_ratio": "decode step latency at the largest / the smallest context of the sweep",
    "context_ratio_flops_predicted": "the same ratio if time followed FLOPs: (2*params + "
    "4*layers*heads*head_dim*C) per token",
    "overhead_ms_ctx200": "our step minus the bare pre-bound session run at 200 tokens of "
    "context, the worse of frame step and decode step (median of back-to-back pairs); target "
    "below 1 ms + 10% of the step",
    "overhead_ms_ctx3500": "the same at 3500 tokens of context",
    "overhead_se_ms_ctx200": "standard error of overhead_ms_ctx200 (the noise of a busy machine)",
    "ttfa_ms_p50": "median time from the talk decision to the first audio sample of the reply",
    "deadline_misses": "frame steps (incl. speech hand-off) longer than 1/fps",
}


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (finite(a) and finite(b)) or b == 0:
        return None
    return a / b


def clean(x: Any) -> Any:
    """JSON-safe: numpy to Python, NaN and inf to None, keys to strings."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, np.generic):
        return clean(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(result), indent=2, allow_nan=False))


# --- headline of one bundle ------------------------------------------------------------------
def _overhead_at(sweep: dict[str, Any], context: int) -> tuple[float | None, float | None]:
    """The worse of the frame step's and the decode step's overhead, with its standard error."""
    point = sweep.get("points", {}).get(context, {})
    figs = [v for v in point.values() if finite(v.get("overhead_ms"))]
    if not figs:
        return None, None
    worst = max(figs, key=lambda v: v["overhead_ms"])
    return worst["overhead_ms"], worst.get("overhead_se_ms")


def _sweep_ends(sweep: dict[str, Any], sweep_contexts: list[int]) -> tuple[int, int] | None:
    done = sorted(c for c in sweep.get("points", {}) if c in sweep_contexts)
    return (done[0], done[-1]) if len(done) >= 2 else None


def sweep_p50(sweep: dict[str, Any], context: int, kind: str) -> float | None:
    p50: float | None = sweep["points"][context][kind]["ours_ms"]["p50"]
    return p50


def headline(b: dict[str, Any], sweep_contexts: list[int]) -> dict[str, Any]:
    """The headline figures of one bundle's section of the result."""
    stream = b.get("stream", {})
    ref = b.get("torch_reference") or {}
    dec = b.get("decode", {})
    sweep = b.get("context_sweep", {})
    ends = _sweep_ends(sweep, sweep_contexts)
    measured = predicted = None
    if ends:
        measured = ratio(sweep_p50(sweep, ends[1], "decode"), sweep_p50(sweep, ends[0], "decode"))
        predicted = b.get("context_ratio_flops_predicted")
    ours_decode = stream.get("stages_ms", {}).get("decode", {}).get("p50")
    ref_decode = ref.get("stages_ms", {}).get("decode", {}).get("p50")
    genai = (dec.get("ort_genai") or {}).get("decode_ms_per_token")
    o200, o3500 = _overhead_at(sweep, 200), _overhead_at(sweep, 3500)
    return {
        "speedup_vs_torch_reference": ratio(
            ref.get("no_talk_step_ms_p50"), stream.get("no_talk_step_ms_p50")
        ),
        "speedup_vs_torch_reference_decode": ratio(ref_decode, ours_decode),
        "decode_vs_ort_genai": ratio(genai, (dec.get("ours") or {}).get("decode_ms_per_token")),
        "decode_over_bandwidth_floor": b.get("limit", {}).get("decode_over_bandwidth_floor"),
        "weight_matmuls_over_bandwidth_floor": b.get("limit", {}).get(
            "weight_matmuls_over_bandwidth_floor"),
        "context_ratio": measured,
        "context_ratio_flops_predicted": predicted,
        "context_ratio_contexts": list(ends) if ends else None,
        "overhead_ms_ctx200": o200[0],
        "overhead_se_ms_ctx200": o200[1],
        "overhead_ms_ctx3500": o3500[0],
        "overhead_se_ms_ctx3500": o3500[1],
        "ttfa_ms_p50": stream.get("stages_ms", {}).get("ttfa", {}).get("p50"),
        "deadline_misses": stream.get("deadline_misses"),
    }


# --- terminal -------------------------------------------------------------------------------
def _f(x: Any, digits: int = 1) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}" if finite(x) else "-"


def _pm(fig: dict[str, Any]) -> str:
    if not finite(fig.get("overhead_ms")):
        return "-"
    return f"{fig['overhead_ms']:.2f} ± {_f(fig.get('overhead_se_ms'), 2)}"


def print_report(result: dict[str, Any], console: Any = None) -> None:
    """Rich tables: stages per bundle, context sweep, headline figures."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    m = result["machine"]
    con.print(
        f"[bold]{m.get('cpu_model')}[/], {m.get('cpu_cores')} cores"
        + (f", {m.get('model')} power mode {m.get('power_mode')}" if m.get("jetson") else "")
        + f"; load average {m.get('load_average_start')} at start"
        + f"; other processes {_f(m.get('other_processes_cores'), 2)} cores during the run"
    )
    for name, b in result["bundles"].items():
        t = Table(title=f"{name} ({b['precision']}, {b['decoder']}): stage latency ms")
        for col in ("stage", "n", "p50", "p95", "p99"):
            t.add_column(col, justify="right" if col != "stage" else "left")
        ref = (b.get("torch_reference") or {}).get("stages_ms", {})
        for stage, p in b["stream"]["stages_ms"].items():
            t.add_row(stage, _f(p["n"], 0), _f(p["p50"], 2), _f(p["p95"], 2), _f(p["p99"], 2))
            if stage in ref:
                r = ref[stage]
                t.add_row(f"  torch {stage}", _f(r["n"], 0), _f(r["p50"], 2), _f(r["p95"], 2),
                          _f(r["p99"], 2), style="dim")
        con.print(t)
        s = b["stream"]
        con.print(
            f"sustained {_f(s['sustained_fps'], 2)} fps, {s['deadline_misses']} of {s['frames']} "
            f"frames over {s['deadline_ms']:.0f} ms, {s['talk_frames']} talked; runtime peak RSS "
            f"{_f(b['memory'].get('peak_rss_mb'), 0)} MB; bundle {b['size_bytes'] / 2**20:.1f} MB"
        )
        sweep = b["context_sweep"]
        t = Table(title=f"{name}: latency vs context (ms, p50)")
        for col in ("context", "frame step", "decode step", "overhead frame", "overhead decode"):
            t.add_column(col, justify="right")
        for c, pt in sorted(sweep["points"].items()):
            t.add_row(str(c), _f(pt["frame"]["ours_ms"]["p50"], 2), _f(pt["decode"]["ours_ms"]["p50"], 2),
                      _pm(pt["frame"]), _pm(pt["decode"]))
        con.print(t)
    t = Table(title="headline")
    t.add_column("figure")
    for name in result["bundles"]:
        t.add_column(name, justify="right")
    extra = ("speedup_vs_torch_reference_decode", "overhead_se_ms_ctx200", "overhead_se_ms_ctx3500")
    for key in (*HEADLINE_KEYS, *extra):
        t.add_row(key, *(_f(b["headline"].get(key), 2) for b in result["bundles"].values()))
    con.print(t)
    for note in result.get("notes", []):
        con.print(f"[yellow]note:[/] {note}")


# --- plot -------------------------------------------------------------------------------------
def plot_context(result: dict[str, Any], path: Path) -> None:
    """Latency vs context, frame step and decode step, one line per bundle/precision."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the device or in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, b in result["bundles"].items():
        pts = sorted(b["context_sweep"]["points"].items())
        label = f"{name} ({b['precision']})"
        for ax, kind in zip(axes, ("frame", "decode"), strict=True):
            xs = [c for c, p in pts if finite(p[kind]["ours_ms"]["p50"])]
            ys = [p[kind]["ours_ms"]["p50"] for _, p in pts if finite(p[kind]["ours_ms"]["p50"])]
            ax.plot(xs, ys, marker="o", label=label)
    for ax, title in zip(axes, ("frame step (I tokens)", "decode step (1 token)"), strict=True):
        ax.set_xlabel("context (tokens in the KV memory)")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    m = result["machine"]
    load = (m.get("load_average_start") or [None])[0]
    fig.suptitle(f"latency vs context on {m.get('model') or m.get('cpu_model')}, "
                 f"{m.get('cpu_cores')} cores, load average {load} at start", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
