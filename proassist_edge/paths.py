"""Where the project keeps what it builds for the user (bundles, assembled models, features)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """PROASSIST_EDGE_CACHE, else ~/.cache/proassist-edge."""
    root = os.environ.get("PROASSIST_EDGE_CACHE") or Path.home() / ".cache" / "proassist-edge"
    return Path(root)
