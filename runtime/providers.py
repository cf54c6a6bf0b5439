"""Execution providers: which onnxruntime provider runs a graph, chosen explicitly.

`--ep auto|cpu|cuda|tensorrt` (run, replay, bench, eval) names one; `auto` is the best this
onnxruntime build offers, TensorRT EP > CUDA EP > CPU. A session asked for a provider either runs
on it or raises `ExecutionProviderError`, which names the provider, why it failed (its library
did not load, an op has no kernel there, out of memory) and what to do. onnxruntime itself would
fall back to the CPU silently when a GPU provider's library does not load; a session that did so
is refused here, so a run never reports CPU figures as GPU ones.

Library code that opens a bundle for a command it does not own (replay, eval) reads the choice
from the environment (`PROASSIST_EDGE_EP`, which the commands' `--ep` sets): one setting for the
process and the subprocesses a benchmark starts.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence

import onnxruntime as ort

from proassist_edge.errors import BundleError

EP_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
BEST_FIRST = ("tensorrt", "cuda", "cpu")
ORT_PROVIDER = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
ENV = "PROASSIST_EDGE_EP"
# providers whose sessions hold their tensors in CUDA memory (KV buffers go there too)
_CUDA_MEMORY = {ORT_PROVIDER["tensorrt"], ORT_PROVIDER["cuda"]}

MISSING_LIBRARY, UNSUPPORTED_OP, OUT_OF_MEMORY = "missing library", "unsupported op", "out of memory"
NOT_OFFERED, FAILED = "not in this onnxruntime build", "failed"

_FIXES = {
    MISSING_LIBRARY: "install the CUDA, cuDNN and TensorRT libraries this onnxruntime-gpu was built "
    "for (on a Jetson: JetPack, then scripts/install.sh), check with `proassist-edge doctor`, or "
    "run with --ep cpu",
    UNSUPPORTED_OP: "the graph has an op with no kernel on this provider: run another decoder "
    "(--decoder, or the manifest's `ep_decoders`) or another provider (--ep cuda or --ep cpu)",
    OUT_OF_MEMORY: "the graph or its KV memory does not fit: use a smaller precision (an int4 "
    "child: proassist-edge quantize), a shorter --max-seq-len, close other GPU processes, or "
    "run with --ep cpu",
    NOT_OFFERED: "install onnxruntime-gpu (x86: pip install 'proassist-edge[gpu]'; Jetson: "
    "scripts/install.sh), or choose one of the providers offered (--ep auto picks the best)",
    FAILED: "if the CPU provider fails too the graph file is damaged: re-export or re-copy the "
    "bundle; else run with --ep cpu",
}
# What onnxruntime's messages say, per reason (its exceptions carry no machine-readable kind).
_PATTERNS = [
    (OUT_OF_MEMORY, r"out of memory|cudaErrorMemoryAllocation|Failed to allocate|bad_alloc|OOM"),
    (MISSING_LIBRARY, r"\.so[.\d]*\b|cannot open shared object|LoadLibrary|Failed to load library|"
                      r"libcudnn|libcublas|libnvinfer|CUDA driver version|no CUDA-capable device"),
    (UNSUPPORTED_OP, r"NOT_IMPLEMENTED|Could not find an implementation|No op registered|"
                     r"not supported|Unsupported"),
]


class ExecutionProviderError(BundleError):
    """An execution provider could not load or run a graph; says which, why, and what to do."""

    def __init__(self, ep: str, reason: str, detail: str, what: str = "") -> None:
        self.ep, self.reason = ep, reason
        where = f" for {what}" if what else ""
        super().__init__(f"execution provider {ORT_PROVIDER.get(ep, ep)} (--ep {ep}) failed{where}: "
                         f"{reason} ({detail}). Fix: {_FIXES[reason]}")


def classify(text: str) -> str:
    """The reason an onnxruntime error message gives: missing library, unsupported op, out of
    memory, or plain failure."""
    return next((reason for reason, pat in _PATTERNS if re.search(pat, text)), FAILED)


def provider_error(ep: str, e: BaseException, what: str = "") -> ExecutionProviderError:
    text = f"{type(e).__name__}: {e}".strip()
    return ExecutionProviderError(ep, classify(text), text[:400], what)


def check_ep(ep: str) -> str:
    if ep not in EP_CHOICES:
        raise ValueError(f"--ep {ep!r}: choose one of {', '.join(EP_CHOICES)}")
    return ep


def default_ep() -> str:
    """The choice of the command that runs this process: $PROASSIST_EDGE_EP, else auto."""
    return check_ep(os.environ.get(ENV) or "auto")


def offered() -> list[str]:
    """The providers this onnxruntime build offers, best first, as --ep names."""
    names = set(ort.get_available_providers())
    return [ep for ep in BEST_FIRST if ORT_PROVIDER[ep] in names]


def candidates(ep: str) -> list[str]:
    """The providers to try for `ep`, best first: every one offered for auto, else `ep` alone
    (ExecutionProviderError when this build does not offer it)."""
    check_ep(ep)
    have = offered()
    if ep == "auto":
        return have or ["cpu"]
    if ep not in have:
        raise ExecutionProviderError(
            ep, NOT_OFFERED,
            f"this onnxruntime {ort.__version__} offers {', '.join(have) or 'none'}")
    return [ep]


def session_providers(ep: str, contrib_ops: bool = False) -> list[str]:
    """onnxruntime's provider list for a session on `ep` (resolved: not auto): the provider,
    then the ones that take the nodes it cannot. A graph of onnxruntime contrib ops
    (GroupQueryAttention, MatMulNBits) skips TensorRT, whose parser does not know them."""
    chain = {"tensorrt": ["tensorrt", "cuda", "cpu"], "cuda": ["cuda", "cpu"], "cpu": ["cpu"]}
    order = chain[ep][1:] if ep == "tensorrt" and contrib_ops else chain[ep]
    return [ORT_PROVIDER[p] for p in order]


def new_session(path: str, opts: ort.SessionOptions, ep: str, contrib_ops: bool = False,
                what: str = "") -> ort.InferenceSession:
    """A session on `ep` (resolved), or ExecutionProviderError naming it and why."""
    providers = session_providers(ep, contrib_ops)
    try:
        with warnings.catch_warnings():  # "not in available provider names": checked below
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (no common base)
        raise provider_error(ep, e, what or path) from e
    if providers[0] not in sess.get_providers():
        raise ExecutionProviderError(
            ep, MISSING_LIBRARY,
            f"onnxruntime fell back to {', '.join(sess.get_providers())}: the provider's shared "
            "library or one it needs did not load (onnxruntime's log names it)", what or path)
    return sess


def session_device(sess: ort.InferenceSession) -> str:
    """"cuda" when the session's first provider keeps tensors in CUDA memory, else "cpu"."""
    first: Sequence[str] = sess.get_providers()[:1]
    return "cuda" if first and first[0] in _CUDA_MEMORY else "cpu"


def session_ep(sess: ort.InferenceSession) -> str:
    """The --ep name of the provider a session runs on first."""
    first = sess.get_providers()[0]
    return next((ep for ep, name in ORT_PROVIDER.items() if name == first), first)


def set_default_ep(ep: str) -> None:
    """Make `ep` the choice of every bundle this process (and the processes it starts) opens
    without naming one: the commands' --ep, for library calls that open their own bundle."""
    os.environ[ENV] = check_ep(ep)
