"""Typed errors shared by every part. Each message says what went wrong and what to do."""

from __future__ import annotations


class ProAssistEdgeError(Exception):
    """Base class: every error raised on purpose by this project."""


class CheckpointError(ProAssistEdgeError):
    """A checkpoint folder is missing files or is unreadable."""


class ShapeMismatchError(CheckpointError):
    """Two parts of a checkpoint or bundle disagree on a size."""

    def __init__(self, what: str, expected: int, got: int, fix: str) -> None:
        super().__init__(f"{what}: expected {expected}, got {got}. {fix}")
        self.what, self.expected, self.got = what, expected, got


class BundleError(ProAssistEdgeError):
    """A bundle is missing, corrupt, from another schema version, or its files fail sha256."""


class ExportError(ProAssistEdgeError):
    """Export could not produce a graph."""


class VerificationError(ExportError):
    """An exported or quantized graph does not match its reference."""


class ToleranceError(VerificationError):
    """Outputs agree in shape but differ by more than the tolerance."""


class SourceError(ProAssistEdgeError):
    """A frame source failed or ended unexpectedly."""


class SpeechError(ProAssistEdgeError):
    """A speech sink failed."""


class DataError(ProAssistEdgeError):
    """A dataset or split file is missing, malformed, or disagrees with its index."""


class FrameError(ProAssistEdgeError):
    """A frame has the wrong shape or dtype."""


class MissingDependencyError(ProAssistEdgeError):
    """An optional package or system library is not installed."""

    def __init__(self, package: str, purpose: str, install: str) -> None:
        super().__init__(f"{purpose} needs '{package}', which is not importable here. {install}")
        self.package = package


class MetricsError(ProAssistEdgeError):
    """Evaluation input (frames, window, JSONL file, embedder) is unusable."""


class ContextOverflowError(ProAssistEdgeError):
    """A step's inputs do not fit in the KV memory even before its reply."""
