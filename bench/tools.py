"""The tools bench: how long `export` and `quantize` take and how much memory they hold.

`python -m proassist_edge.bench.tools [--cases tiny,smollm2,1b] [--work DIR] [--json OUT]`
runs each tool as a subprocess of the CLI, as a user would, on fixtures it writes first:

- tiny: `fixture tiny`, `export` (default verification), then `quantize --precision int8` and
  `--precision int4` of that bundle at their defaults;
- smollm2: `fixture smollm2` (real SmolLM2-135M weights), `export --precision int4`;
- 1b: `fixture --shape llama-3.2-1b` (Llama-3.2-1B's configuration and a SigLIP-so400m-shaped
  tower, random bf16 weights), `export --precision int4`.

Per run: wall seconds, the seconds of each stage (from `export --json` and quant_report.json),
the peak RSS of the whole process tree (sampled: export runs onnxruntime-genai's builder as a
child process) and the largest single process's (sampled too), and the load average
beside each figure (the machine may be shared). The 1B row gives peak RSS over the checkpoint's
weights at bf16 and the 8B figure projected from it: the part over the RSS the export returns
to between stages is scaled by the weights (Llama-3.1-8B plus the same tower, counted from their
configurations).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proassist_edge.fmt import human_bytes, table

CASES = ("tiny", "smollm2", "1b")
# the targets (seconds; the 1B row's memory target is a ratio plus a constant)
TARGETS = {"export tiny": 60.0, "quantize tiny int8": 120.0, "quantize tiny int4": 120.0,
           "export smollm2 int4": 300.0}
RSS_RATIO, RSS_PLUS = 1.3, 1e9  # 1B-shape int4 export: peak RSS <= 1.3 x bf16 weights + 1 GB


def tree_rss(pid: int) -> tuple[int, int]:
    """Resident bytes of PID and all its descendants (Linux /proc), and of the largest of them."""
    total, largest, stack, seen = 0, 0, [pid], set()
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                rss = int(f.read().split()[1]) * page
            total, largest = total + rss, max(largest, rss)
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # the process ended between two reads
    return total, largest


def load() -> str:
    """The load averages (1, 5, 15 min), as `uptime` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Run:
    name: str
    cmd: list[str]
    seconds: float = 0.0
    returncode: int = 0
    peak_tree_rss_bytes: int = 0
    max_process_rss_bytes: int = 0  # the largest single process of the tree (sampled)
    load_before: str = ""
    load_after: str = ""
    stages: dict[str, Any] = field(default_factory=dict)
    target_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""


def timed(name: str, cmd: list[str], log: Path, summary: Path | None = None) -> Run:
    """Run CMD, sampling its process tree's RSS every 0.2 s."""
    run = Run(name, cmd, load_before=load(), target_s=TARGETS.get(name))
    print(f"[tools bench] {name}: {' '.join(cmd)} (load {run.load_before})", file=sys.stderr)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                total, largest = tree_rss(proc.pid)
                run.peak_tree_rss_bytes = max(run.peak_tree_rss_bytes, total)
                run.max_process_rss_bytes = max(run.max_process_rss_bytes, largest)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # not the child's ru_maxrss: a forked child starts with its parent's pages counted
        proc.wait()
        done.set()
        sampler.join()
    run.seconds = round(time.perf_counter() - t0, 1)
    run.returncode = proc.returncode
    run.load_after = load()
    run.log_tail = log.read_text()[-1500:]
    if summary is not None and summary.is_file():
        data = json.loads(summary.read_text())
        run.stages = data.get("stages", {})
        run.extra["tool_peak_rss_bytes"] = data.get("peak_rss_bytes")
        for key in ("decision_agreement", "targets_met", "verify"):
            if key in data:
                run.extra[key] = data[key]
    print(f"[tools bench] {name}: {run.seconds} s, rc {run.returncode}, tree peak "
          f"{human_bytes(run.peak_tree_rss_bytes)} (load after {run.load_after})", file=sys.stderr)
    return run


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "proassist_edge.cli", *args]


def weights_bytes_bf16(ckpt_root: Path) -> dict[str, int]:
    """The fixture's weights (LLM, vision tower, adapters) at 2 bytes a parameter."""
    from proassist_edge.export.resources import folder_weights

    parts = {"llm": folder_weights(ckpt_root / "base_llm"),
             "vision": folder_weights(ckpt_root / "base_vision"),
             "adapter": folder_weights(ckpt_root / "checkpoint")}
    return {k: w.params * 2 for k, w in parts.items()}


def shape_params(shape: str) -> int:
    """Parameters of a SHAPES entry (LLM + tower), counted on the meta device."""
    import torch
    from transformers import LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from proassist_edge.export.fixture import SHAPES, shape_llama_config

    with torch.device("meta"):
        llm = LlamaForCausalLM(shape_llama_config(shape))
        vision = SiglipVisionModel(SiglipVisionConfig(**SHAPES[shape].vision))
    unique = {id(p): p.numel() for m in (llm, vision) for p in m.parameters()}  # tied once
    return sum(unique.values())


def case_tiny(work: Path) -> list[Run]:
    ckpt = work / "tiny"
    runs = [timed("fixture tiny", cli("fixture", "tiny", "-o", str(ckpt)), work / "fixture_tiny.log")]
    bundle = work / "tiny_fp32"
    runs.append(timed("export tiny", cli("export", str(ckpt / "checkpoint"), "-o", str(bundle),
                                         "--json", str(work / "export_tiny.json")),
                      work / "export_tiny.log", work / "export_tiny.json"))
    for p in ("int8", "int4"):
        out = work / f"tiny_{p}"
        runs.append(timed(f"quantize tiny {p}", cli("quantize", str(bundle), "-o", str(out),
                                                     "--precision", p),
                          work / f"quantize_tiny_{p}.log", out / "quant_report.json"))
    return runs


def case_smollm2(work: Path) -> list[Run]:
    ckpt = work / "smollm2"
    runs = [timed("fixture smollm2", cli("fixture", "smollm2", "-o", str(ckpt)),
                  work / "fixture_smollm2.log")]
    runs.append(timed("export smollm2 int4",
                      cli("export", str(ckpt / "checkpoint"), "-o", str(work / "smollm2_int4"),
                          "--precision", "int4", "--json", str(work / "export_smollm2_int4.json")),
                      work / "export_smollm2_int4.log", work / "export_smollm2_int4.json"))
    return runs


def case_1b(work: Path) -> list[Run]:
    ckpt = work / "shape1b"
    runs = [timed("fixture llama-3.2-1b", cli("fixture", "tiny", "--shape", "llama-3.2-1b",
                                              "-o", str(ckpt)), work / "fixture_1b.log")]
    run = timed("export llama-3.2-1b int4",
                cli("export", str(ckpt / "checkpoint"), "-o", str(work / "shape1b_int4"),
                    "--precision", "int4", "--json", str(work / "export_1b_int4.json")),
                work / "export_1b_int4.log", work / "export_1b_int4.json")
    weights = weights_bytes_bf16(ckpt)
    bf16 = sum(weights.values())
    ratio = run.peak_tree_rss_bytes / bf16
    p8 = shape_params("llama-3.1-8b") * 2
    # what does not grow with the weights (interpreter, torch, onnxruntime, freed heap): the
    # lowest RSS the export returns to between its stages; the rest is scaled with the weights
    fixed = min((v.get("rss_bytes", run.peak_tree_rss_bytes) for v in run.stages.values()),
                default=0)
    scaled = int((run.peak_tree_rss_bytes - fixed) * p8 / bf16 + fixed)
    run.extra.update(
        bf16_weight_bytes=bf16, weights_bf16=weights, peak_rss_over_bf16=round(ratio, 3),
        target_rss_bytes=int(RSS_RATIO * bf16 + RSS_PLUS), fixed_rss_bytes=fixed,
        projected_8b={"bf16_weight_bytes": p8, "peak_rss_bytes": scaled,
                      "peak_rss_bytes_pure_ratio": int(ratio * p8),
                      "target_rss_bytes": int(RSS_RATIO * p8 + RSS_PLUS),
                      "how": "(peak RSS - the fixed RSS the export returns to between stages) at 1B, "
                             "scaled by Llama-3.1-8B + SigLIP-so400m's bf16 weight bytes over the "
                             "1B shape's, plus the fixed RSS; peak_rss_bytes_pure_ratio scales it "
                             "all (an upper bound)"},
    )
    return [*runs, run]


def verdict(run: Run) -> str:
    if run.returncode != 0:
        return f"failed (exit {run.returncode})"
    if "target_rss_bytes" in run.extra:
        ok = run.peak_tree_rss_bytes <= run.extra["target_rss_bytes"]
        return f"{'met' if ok else 'missed'} (<= {human_bytes(run.extra['target_rss_bytes'])})"
    if run.target_s is None:
        return ""
    return f"{'met' if run.seconds <= run.target_s else 'missed'} (<= {run.target_s:.0f} s)"


def render(runs: Sequence[Run]) -> str:
    rows = [[r.name, f"{r.seconds:.1f}", human_bytes(r.peak_tree_rss_bytes),
             human_bytes(r.max_process_rss_bytes), f"{r.load_before} / {r.load_after}", verdict(r)]
            for r in runs]
    lines = [table(rows, ["run", "seconds", "peak RSS (tree)", "largest process",
                          "load before / after", "target"])]
    for r in runs:
        if r.stages:
            slow = sorted(r.stages.items(), key=lambda kv: -kv[1]["seconds"])[:4]
            lines.append(f"{r.name}: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in slow))
        if "peak_rss_over_bf16" in r.extra:
            e = r.extra
            p8 = e["projected_8b"]
            lines.append(
                f"{r.name}: peak RSS {human_bytes(r.peak_tree_rss_bytes)} = "
                f"{e['peak_rss_over_bf16']:.2f} x bf16 weights ({human_bytes(e['bf16_weight_bytes'])}); "
                f"8B projected: {human_bytes(p8['peak_rss_bytes'])} for "
                f"{human_bytes(p8['bf16_weight_bytes'])} of bf16 weights (target "
                f"{human_bytes(p8['target_rss_bytes'])})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proassist_edge.bench.tools", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    ap.add_argument("--work", type=Path, default=Path("out/tools_bench"),
                    help="folder for the fixtures, bundles and logs (must not exist)")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if bad := set(cases) - set(CASES):
        ap.error(f"unknown cases {sorted(bad)}: choose from {CASES}")
    if args.work.exists():
        ap.error(f"{args.work} exists: choose a new folder")
    args.work.mkdir(parents=True)
    runners = {"tiny": case_tiny, "smollm2": case_smollm2, "1b": case_1b}
    runs: list[Run] = []
    for c in cases:
        runs += runners[c](args.work)
    result = {"machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
              "runs": [asdict(r) for r in runs]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(render(runs))
    return 0 if all(r.returncode == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
