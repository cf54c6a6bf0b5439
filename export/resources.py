"""What an export needs in memory and disk, estimated from the checkpoint before any work, and
checked against what the machine has: a clear error up front instead of an out-of-memory kill
or a full disk halfway through.

The weights are counted from the safetensors headers (names, dtypes, shapes: no tensor is read),
so the estimate holds for any size of model. The factors below are per stage of `export_bundle`
(export/bundle.py), whose stages hold one part of the model at a time; they were measured on the
tools bench (docs/benchmarks.md) and err on the high side.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from proassist_edge.errors import ExportError
from proassist_edge.fmt import human_bytes

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# bytes per LLM parameter of the optimized decoder at each precision (int4: 4-bit weights plus
# an fp32 scale per block of 32; int8: MatMulInteger weights plus scales)
DECODER_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.05, "int4": 0.625}
TABLE_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 1.0}  # the embedding table's rows
BASELINE = 900_000_000  # python, torch, onnxruntime, transformers loaded (~0.5 GB), and slack
MARGIN = 1.1  # the estimate is a floor: ask for this much more


class ResourceError(ExportError):
    """The machine has less free memory or disk than the export needs."""


@dataclass(frozen=True)
class Weights:
    """Parameters and stored bytes of a folder's weights, and its largest tensor's parameters."""

    params: int = 0
    bytes: int = 0
    dtype: str = "float32"  # the dtype holding most of the bytes
    largest: int = 0

    @property
    def bytes_per_param(self) -> float:
        return self.bytes / self.params if self.params else 4.0

    def __add__(self, other: Weights) -> Weights:
        dtype = self.dtype if self.bytes >= other.bytes else other.dtype
        return Weights(self.params + other.params, self.bytes + other.bytes, dtype,
                       max(self.largest, other.largest))


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor index at the start of a .safetensors file (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def folder_weights(folder: Path) -> Weights:
    """Weights of every .safetensors file in FOLDER (top level); other weight files (a torch
    state dict) count by size as float32."""
    total, largest = 0, 0
    by_dtype: dict[str, int] = {}
    params = 0
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        for t in safetensors_header(f).values():
            n = 1
            for d in t["shape"]:
                n *= int(d)
            size = n * DTYPE_BYTES.get(t["dtype"], 4)
            params, total, largest = params + n, total + size, max(largest, n)
            name = DTYPE_NAMES.get(t["dtype"], t["dtype"].lower())
            by_dtype[name] = by_dtype.get(name, 0) + size
    if not files:
        others = [p for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth")]
        size = sum(p.stat().st_size for p in others)
        return Weights(size // 4, size, "float32", size // 4)
    return Weights(params, total, max(by_dtype, key=lambda k: by_dtype[k]), largest)


@dataclass(frozen=True)
class Plan:
    """What is being exported, as the estimate needs it."""

    llm: Weights
    vision: Weights
    vocab: int
    hidden: int
    precision: str = "fp32"
    vision_precision: str = "fp32"
    portable_precision: str | None = "fp32"  # None: no portable decoder
    optimized: bool = True
    lora: bool = False
    adapters_bytes: int = 0
    verify: bool = True
    reference_bytes_per_param: float = 4.0


@dataclass
class Needs:
    memory: int
    disk: int
    memory_stages: dict[str, int] = field(default_factory=dict)
    disk_parts: dict[str, int] = field(default_factory=dict)

    @property
    def memory_stage(self) -> str:
        return max(self.memory_stages, key=lambda k: self.memory_stages[k])


def _precision_bytes(p: str) -> float:
    return {"fp32": 4.0, "fp16": 2.0}[p]


def estimate(plan: Plan) -> Needs:
    """Peak memory (the largest stage, plus the baseline) and disk (temporary files at their
    peak plus the bundle) of an export."""
    llm, vis = plan.llm, plan.vision
    ck = llm.bytes_per_param
    table = plan.vocab * plan.hidden
    biggest = max(llm.largest, table)  # the head or the table: the largest single tensor
    stages: dict[str, int] = {}
    # factors measured on the 1B shape (export --precision int4, docs/export.md): each stage's
    # RSS over the baseline, per byte of what it holds
    if plan.lora:  # the base in its own dtype, merged in place
        stages["merging LoRA adapters"] = int(llm.bytes * 1.1 + plan.adapters_bytes * 2)
    if plan.optimized:
        # the builder (a child process) holds the weights in their dtype plus the fused
        # gate/up and q/k/v copies (1.6x on the 1B shape); with the head it also casts and
        # transposes the head to float32 (int4 adds the head itself, a block at a time)
        head = 0 if plan.precision == "int4" else biggest * 4 * 2.2
        stages["optimized decoder"] = int(llm.bytes * 1.45 + head)
    stages["vision graph"] = int(vis.params * _precision_bytes(plan.vision_precision) * 1.3)
    if plan.portable_precision:
        stages["portable decoder"] = int(llm.params * _precision_bytes(plan.portable_precision) * 2.5)
    stages["embeddings"] = int(biggest * (ck + 4))
    decoder = DECODER_BYTES[plan.precision] * llm.params
    vision_graph = vis.params * _precision_bytes(plan.vision_precision)
    emb = table * TABLE_BYTES[plan.precision]
    if plan.verify:  # the PyTorch reference, freed before the bundle's sessions load
        reference = (llm.params + vis.params) * plan.reference_bytes_per_param * 1.1
        stages["verification"] = int(max(reference, decoder * 1.6 + vision_graph * 1.1 + emb))
    if plan.precision == "int8":  # the fp32 bundle, then quantize reads its decoders whole
        stages["int8 quantization"] = int(llm.params * 4 * 2.5)
    memory = int((max(stages.values()) + BASELINE) * MARGIN)

    parts: dict[str, int] = {}
    if plan.lora:
        parts["merged LLM (temporary)"] = llm.bytes
    bundle = vision_graph + emb
    if plan.optimized:
        bundle += decoder
        if plan.precision in ("int4", "int8"):
            parts["fp32 decoder graph (temporary)"] = int(llm.params * 4)
    if plan.portable_precision:
        bundle += llm.params * _precision_bytes(plan.portable_precision)
    if plan.precision == "int8":  # the fp32 bundle beside its child
        parts["fp32 bundle (temporary)"] = int(llm.params * 4 * 2 + table * 4 + vis.params * 4)
    parts["bundle"] = int(bundle)
    disk = int(sum(parts.values()) * MARGIN)
    return Needs(memory, disk, stages, parts)


def available_memory() -> int:
    """Memory the system can give without swapping (MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ResourceError("cannot read the free memory (no psutil, no /proc/meminfo): "
                        "install psutil or pass --no-resource-check")


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that will hold PATH (its nearest existing parent)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return int(shutil.disk_usage(p).free)


def check(needs: Needs, out: Path, what: str) -> dict[str, int]:
    """Raise ResourceError when free memory or disk is short of NEEDS; return the figures."""
    memory, disk = available_memory(), free_disk(out.parent)
    short = []
    if needs.memory > memory:
        short.append(
            f"about {human_bytes(needs.memory)} of memory (its largest stage: "
            f"{needs.memory_stage}, {human_bytes(needs.memory_stages[needs.memory_stage])}) "
            f"and {human_bytes(memory)} is available: close other programs or export on a "
            "machine with more memory"
        )
    if needs.disk > disk:
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in needs.disk_parts.items())
        short.append(
            f"about {human_bytes(needs.disk)} of disk ({parts}) and {out.parent} has "
            f"{human_bytes(disk)} free: free some space or write the bundle elsewhere"
        )
    if short:
        raise ResourceError(
            f"{what} needs " + "; and ".join(short)
            + " (the estimate is from the checkpoint's weights; --no-resource-check skips it)"
        )
    return {"memory_needed": needs.memory, "memory_available": memory,
            "disk_needed": needs.disk, "disk_free": disk}


def release() -> None:
    """Give freed memory back to the system after a stage. A model's or a session's weights are
    mostly tensors under glibc's mmap threshold once it has risen (32 MB at most), so freeing
    them leaves the process's heap, and its RSS, as large as before: measured on the 1B shape,
    an onnxruntime bundle of 3.1 GB left 0.77 GB behind, the PyTorch reference about 3 GB, and
    the next stage's load came on top. malloc_trim returns the free pages."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)  # glibc; other C libraries lack it
    except (OSError, AttributeError):
        return
