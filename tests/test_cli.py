"""The command line lists a subcommand whose extra is missing as unavailable, whether the part's
module or its parser builder needs it (the torch-free runtime venv runs `--help`)."""

from __future__ import annotations

import argparse

import pytest

from proassist_edge.cli import _optional


def _needs_scipy(sub: argparse._SubParsersAction) -> None:
    raise ImportError("no scipy", name="scipy")  # as `from scipy.sparse import ...` would


@pytest.mark.parametrize("where", ["module", "parser"])
def test_a_missing_extra_leaves_the_subcommand_listed_as_unavailable(where: str, capsys) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")

    def register():  # type: ignore[no-untyped-def]
        if where == "module":
            raise ImportError("no scipy", name="scipy")
        return _needs_scipy

    _optional(register, sub, "eval", "evaluate a bundle")
    args = parser.parse_args(["eval"])
    assert args.func(args) != 0
    assert "scipy" in capsys.readouterr().err
    assert "unavailable: scipy not installed" in parser.format_help()
