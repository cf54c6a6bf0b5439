"""The GPU check (scripts/gpu_check.sh): every GPU path of issue #20 in one run, one JSON out.

Steps, each recorded as passed, failed or skipped (with the reason) and timed:
  fixture        the tiny random checkpoint (or --checkpoint)
  export_fp32    the CPU reference bundle (verified on the CPU EP at export)
  export_fp16    the GPU bundle: decoder_cuda for the CUDA EP, the portable fp16 decoder for
                 TensorRT, verified on the CPU EP (verify.json); ep_decoders must name them
  doctor         `proassist-edge doctor BUNDLE --json` on the fp16 bundle
  replay_*       one synthetic episode replayed: fp32 on the CPU (the reference), the fp16
                 bundle on the CPU, the CUDA decoder on the CPU EP, the fp16 bundle with
                 --ep cuda and --ep tensorrt; decisions and reply tokens compared with the
                 reference
  build_engine   `build-engine` on a copy of the fp16 bundle (it replays against onnxruntime
                 and records the engine only when they agree), then a replay on the engine
  bench_*        `bench --quick` on each decoder: CPU, CUDA EP, TensorRT EP, the engine

Nothing is installed and nothing is fetched. A step that cannot run here (no CUDA EP in this
onnxruntime, no TensorRT) is skipped with the reason, never passed. `--cpu` runs the same
script with the CPU provider only: every GPU step is recorded as skipped ("--cpu").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DECISIONS_MIN = 0.95  # fraction of frames whose talk decision equals the fp32 CPU stream's
TOKENS_MIN = 0.8  # fraction of the frames both talk on whose replies start with the same token
REPLY_TOKENS = 16  # reply cap of the replays
FRAMES = 40


class Skip(Exception):
    """A step that cannot run here; the message says why."""


class Check:
    def __init__(self, out: Path, work: Path, cpu_only: bool) -> None:
        self.out, self.work, self.cpu_only = out, work, cpu_only
        self.steps: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None], gpu: bool = False) -> bool:
        """Run one step; record it. A GPU step in --cpu mode is skipped without running."""
        t0 = time.monotonic()
        rec: dict[str, Any] = {"step": name}
        try:
            if gpu and self.cpu_only:
                raise Skip("--cpu: GPU step not run")
            rec.update(fn() or {})
            rec["status"] = "passed"
        except Skip as e:
            rec.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - a failed step is recorded, the rest still run
            rec.update(status="failed", error=f"{type(e).__name__}: {e}"[-2000:])
        rec["seconds"] = round(time.monotonic() - t0, 2)
        self.steps.append(rec)
        print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']} s)"
              + (f": {rec.get('reason') or rec.get('error')}" if rec["status"] != "passed" else ""),
              flush=True)
        self.write()
        return rec["status"] == "passed"

    def write(self) -> Path:
        counts = {s: sum(r["status"] == s for r in self.steps) for s in ("passed", "failed", "skipped")}
        summary = {
            "mode": "cpu" if self.cpu_only else "gpu",
            "ok": counts["failed"] == 0,
            "counts": counts,
            "seconds": round(time.monotonic() - self.t0, 2),
            "environment": environment(),
            "thresholds": {"decisions_min": DECISIONS_MIN, "first_tokens_min": TOKENS_MIN,
                           "reply_tokens": REPLY_TOKENS},
            "steps": self.steps,
        }
        path = self.out / "gpu_check.json"
        path.write_text(json.dumps(summary, indent=2))
        return path


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    from proassist_edge.runtime.providers import offered

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "onnxruntime": ort.__version__, "providers": offered()}
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError:
        env["tensorrt"] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["gpu"] = q.stdout.strip() or None
    return env


def cli(*args: str, ep: str | None = None, timeout: int = 600) -> str:
    """`proassist-edge ARGS` in a child process (as a user runs it); its output, or an error
    with its tail."""
    env = dict(os.environ)
    if ep:
        env["PROASSIST_EDGE_EP"] = ep
    cmd = [sys.executable, "-m", "proassist_edge.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(args[:2])}: "
                           f"{(proc.stderr or proc.stdout)[-1500:]}")
    return proc.stdout


def need_provider(ep: str) -> None:
    from proassist_edge.runtime.providers import offered

    if ep not in offered():
        raise Skip(f"this onnxruntime offers no {ep} execution provider ({', '.join(offered())})")


def need_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise Skip("the tensorrt Python package is not importable (JetPack's, or pip tensorrt)") from e
    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        try:
            from cuda import cudart  # noqa: F401
        except ImportError as e:
            raise Skip("cuda-python is not installed") from e


# --- the episode and the comparison ---------------------------------------------------------------
def write_episode(root: Path) -> Path:
    from proassist_edge.export.verify import synthetic_stream

    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "frames.npy", synthetic_stream(FRAMES, seed=3))
    third = FRAMES // 3
    conversation = [
        {"role": "system", "content": "You guide the user."},
        {"role": "user", "content": "Help me build the tower."},
        {"role": "frames", "start": 0, "end": third},
        {"role": "user", "content": "What's next?"},
        {"role": "frames", "start": third, "end": FRAMES},
    ]
    (root / "conversation.json").write_text(json.dumps(conversation))
    (root / "metadata.json").write_text(json.dumps({"knowledge": "1. Take the red block."}))
    return root


def read_events(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "talk" in r and "index" in r]


def prefix(a: list[int], b: list[int]) -> float:
    """Fraction of positions before the first disagreement (greedy paths part for good)."""
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return k / max(len(a), len(b), 1)


def compare(got: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """Decisions and reply tokens of a stream against the reference's, frame by frame. Replies
    are compared by their first token (the context and the decision are the reference's there)
    and by the share of each reply before the first different token: on near-tied logits (a
    random fixture's) any rounding parts two greedy paths after a few tokens."""
    n = min(len(got), len(ref))
    same = [got[i]["talk"] == ref[i]["talk"] for i in range(n)]
    both = [i for i in range(n) if got[i]["talk"] and ref[i]["talk"]]
    ids = [(got[i].get("token_ids") or [], ref[i].get("token_ids") or []) for i in both]
    first = [a[:1] == b[:1] for a, b in ids]
    return {"frames": n, "decision_agreement": sum(same) / max(n, 1),
            "talks": sum(bool(r["talk"]) for r in got[:n]),
            "reference_talks": sum(bool(r["talk"]) for r in ref[:n]),
            "first_token_agreement": sum(first) / len(first) if first else None,
            "reply_prefix_agreement": float(np.mean([prefix(a, b) for a, b in ids])) if ids else None,
            "identical_replies": sum(a == b for a, b in ids),
            "first_different_decision": next((i for i in range(n) if not same[i]), None),
            "same_length": len(got) == len(ref)}


def judged(fig: dict[str, Any]) -> dict[str, Any]:
    if not fig["same_length"]:
        raise AssertionError(f"streams of different lengths: {fig}")
    if fig["decision_agreement"] < DECISIONS_MIN:
        raise AssertionError(f"decision agreement {fig['decision_agreement']:.3f} < {DECISIONS_MIN}: {fig}")
    tokens = fig["first_token_agreement"]
    if tokens is not None and tokens < TOKENS_MIN:
        raise AssertionError(f"first-token agreement {tokens:.3f} < {TOKENS_MIN}: {fig}")
    return fig


# --- the run ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    c = Check(out, work, args.cpu)
    ck, fp32, fp16, trt = work / "ckpt", work / "fp32", work / "fp16", work / "fp16-trt"
    episode = write_episode(work / "episode")
    verify = "none" if args.quick else "quick"
    state: dict[str, Any] = {"checkpoint": args.checkpoint}

    def fixture() -> dict[str, Any]:
        if args.checkpoint:
            return {"checkpoint": str(args.checkpoint)}
        text = cli("fixture", "tiny", "-o", str(ck))
        state["checkpoint"] = text.strip().split(": ", 1)[-1]
        return {"checkpoint": state["checkpoint"]}

    def export(dest: Path, precision: str) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            if not state["checkpoint"]:
                raise Skip("no checkpoint (the fixture step failed)")
            # verification runs on the CPU EP: the reference numbers the GPU steps compare with
            cli("export", str(state["checkpoint"]), "-o", str(dest), "--precision", precision,
                "--verify", verify, ep="cpu")
            m = json.loads((dest / "manifest.json").read_text())
            fig = {"graphs": {k: g["precision"] for k, g in m["graphs"].items()},
                   "default_decoder": m["default_decoder"], "ep_decoders": m.get("ep_decoders", {})}
            if (dest / "verify.json").is_file():
                v = json.loads((dest / "verify.json").read_text())
                fig["verify"] = {"execution_provider": v.get("execution_provider"),
                                 "targets_met": v.get("targets_met"),
                                 "decoders": sorted(v.get("decoders", {}))}
            if precision == "fp16" and fig["ep_decoders"].get("cuda") != "decoder_cuda":
                raise AssertionError(f"the fp16 manifest names no CUDA decoder: {fig['ep_decoders']}")
            return fig
        return go

    c.step("fixture", fixture)
    c.step("export_fp32", export(fp32, "fp32"))
    c.step("export_fp16", export(fp16, "fp16"))

    def doctor() -> dict[str, Any]:
        if not (fp16 / "manifest.json").is_file():
            raise Skip("no fp16 bundle")
        env = dict(os.environ, PROASSIST_EDGE_EP="cpu" if args.cpu else "auto")
        proc = subprocess.run([sys.executable, "-m", "proassist_edge.cli", "doctor", str(fp16), "--json"],
                              capture_output=True, text=True, env=env, timeout=300)
        checks = json.loads(proc.stdout)
        failed = [x for x in checks if x.get("required") and not x.get("ok")]
        if failed:
            raise AssertionError(f"doctor: required checks failed: {failed}")
        gpu = [x for x in checks if any(k in json.dumps(x).lower() for k in ("cuda", "tensorrt", "provider"))]
        return {"exit": proc.returncode, "checks": len(checks), "gpu_lines": gpu}

    c.step("doctor", doctor)

    def ready(bundle: Path, ep: str, gpu: bool) -> None:
        """A step's preconditions: its provider (GPU steps) and its bundle, else Skip."""
        if gpu:
            need_provider(ep)
        if not (bundle / "manifest.json").is_file():
            raise Skip(f"no bundle {bundle.name}")

    def replay(bundle: Path, name: str, ep: str, decoder: str | None = None,
               gpu: bool = False) -> None:
        def go() -> dict[str, Any]:
            ready(bundle, ep, gpu)
            events = work / f"{name}.jsonl"
            argv = ["replay", str(bundle), "--episode", str(episode), "--events", str(events),
                    "--ep", ep, "--quiet", "--threshold", str(state.get("threshold", 0.5)),
                    "--max-reply-tokens", str(REPLY_TOKENS)]
            if decoder:
                argv += ["--decoder", decoder]
            t0 = time.monotonic()
            cli(*argv)
            fig: dict[str, Any] = {"ep": ep, "decoder": decoder or "manifest's",
                                   "wall_s": round(time.monotonic() - t0, 2)}
            rows = read_events(events)
            if name == "replay_fp32_cpu":
                state["reference"] = rows
                return {**fig, "frames": len(rows), "talks": sum(bool(r["talk"]) for r in rows)}
            if "reference" not in state:
                raise Skip("no fp32 CPU reference stream")
            return {**fig, **judged(compare(rows, state["reference"]))}
        c.step(name, go, gpu=gpu)

    def threshold() -> dict[str, Any]:
        """The median P(not talk) of the fp32 stream: a random fixture then talks on about
        half of the frames, so the replies are compared too."""
        if not (fp32 / "manifest.json").is_file():
            raise Skip("no fp32 bundle")
        events = work / "threshold.jsonl"
        cli("replay", str(fp32), "--episode", str(episode), "--events", str(events), "--ep", "cpu",
            "--quiet", "--threshold", "1e-9", "--max-reply-tokens", "1")
        ps = [r["p_not_talk"] for r in read_events(events)]
        state["threshold"] = float(np.median(ps))
        return {"threshold": state["threshold"]}

    c.step("talk_threshold", threshold)
    replay(fp32, "replay_fp32_cpu", "cpu")
    replay(fp16, "replay_fp16_cpu", "cpu")
    replay(fp16, "replay_cuda_graph_on_cpu_ep", "cpu", decoder="decoder_cuda")
    replay(fp16, "replay_fp16_cuda", "cuda", gpu=True)
    replay(fp16, "replay_fp16_tensorrt_ep", "tensorrt", gpu=True)

    def build_engine() -> dict[str, Any]:
        need_tensorrt()
        if not (fp16 / "manifest.json").is_file():
            raise Skip("no fp16 bundle")
        shutil.copytree(fp16, trt)
        text = cli("build-engine", str(trt), "--fp16", ep="cpu", timeout=900)
        engines = json.loads((trt / "manifest.json").read_text()).get("engines", {})
        if "decoder" not in engines:
            raise AssertionError(f"no engine recorded: {text[-500:]}")
        return {"engine": engines["decoder"].get("file"), "check": engines["decoder"].get("check"),
                "device": engines["decoder"].get("device"), "output": text.strip()[-500:]}

    c.step("build_engine", build_engine, gpu=True)
    replay(trt, "replay_engine", "tensorrt", gpu=True)

    def bench(bundle: Path, ep: str, decoder: str | None, gpu: bool) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            ready(bundle, ep, gpu)
            report = work / f"bench_{bundle.name}_{ep}_{decoder or 'default'}.json"
            argv = ["bench", str(bundle), "--quick", "--compare", "none", "--context-sweep", "64,256",
                    "--tts", "none", "--no-memory-probe", "--ep", ep, "--json", str(report)]
            if decoder:
                argv += ["--decoder", decoder]
            cli(*argv, timeout=900)
            r = json.loads(report.read_text())
            b = next(iter(r["bundles"].values()))
            dec = b.get("decode", {}).get("ours", {})
            return {"ep": ep, "decoder": decoder or "manifest's",
                    "decode_ms_per_token": dec.get("decode_ms_per_token"),
                    "prefill_ms": dec.get("prefill_ms"),
                    "sweep_decoder": b.get("context_sweep", {}).get("decoder"),
                    "matches_greedy_generate": dec.get("matches_greedy_generate")}
        return go

    c.step("bench_cpu_fp32", bench(fp32, "cpu", None, False))
    c.step("bench_cuda_graph_on_cpu_ep", bench(fp16, "cpu", "decoder_cuda", False))
    c.step("bench_cuda_ep", bench(fp16, "cuda", None, True), gpu=True)
    c.step("bench_tensorrt_ep", bench(fp16, "tensorrt", None, True), gpu=True)

    def bench_engine() -> dict[str, Any]:
        need_tensorrt()
        if "engines" not in json.loads((trt / "manifest.json").read_text() if trt.exists() else "{}"):
            raise Skip("no engine was built")
        return bench(trt, "tensorrt", None, True)()

    c.step("bench_engine", bench_engine, gpu=True)
    path = c.write()
    summary = json.loads(path.read_text())
    print(f"[gpu_check] {summary['counts']} in {summary['seconds']} s: {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU provider only: GPU steps recorded as skipped")
    p.add_argument("--out", help="folder for gpu_check.json (default $OUT, else ./gpu_check_out)")
    p.add_argument("--work", help="scratch folder (default OUT/work, removed at the end)")
    p.add_argument("--checkpoint", type=Path, help="a ProAssist checkpoint instead of the tiny fixture")
    p.add_argument("--quick", action="store_true", help="exports without verification")
    p.add_argument("--keep", action="store_true", help="keep the bundles and event files")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
