"""The parts import only the layers below them (docs/architecture.md): no cycle, no upward arrow.

Every import counts, lazy ones inside functions too (they tie the parts just the same)."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# part -> the parts it may import
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "runtime": {"core"},
    "device": {"runtime", "core"},
    "export": {"runtime", "core"},
    "quant": {"runtime", "core"},
    "eval": {"runtime", "core"},
    "taskworld": {"export", "eval", "runtime", "core"},
    "bench": {"taskworld", "eval", "quant", "export", "device", "runtime", "core"},
    "cli": {"bench", "taskworld", "eval", "quant", "export", "device", "runtime", "core"},
}


def part_of(module: str, parts: set[str]) -> str | None:
    bits = module.split(".")
    if bits[0] != "proassist_edge":
        return None
    if len(bits) == 1:
        return "core"
    if bits[1] in ("cli", "__main__"):
        return "cli"
    return bits[1] if bits[1] in parts else "core"


def modules() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    out: dict[str, Path] = {}
    for prefix, folder in cfg["tool"]["setuptools"]["package-dir"].items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            name = ".".join([prefix, *(p for p in rel.parts if p != "__init__")])
            out.setdefault(name, f)
    return out


def imported(name: str, path: Path) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def arrows() -> set[tuple[str, str, str]]:
    """(from part, to part, module that imports)."""
    parts = set(ALLOWED) - {"core", "cli"}
    out = set()
    for name, path in modules().items():
        src = part_of(name, parts)
        for target in imported(name, path):
            dst = part_of(target, parts)
            if src and dst and dst != src:
                out.add((src, dst, name))
    return out


def test_every_part_imports_only_the_layers_below() -> None:
    bad = sorted(f"{m}: {s} -> {d}" for s, d, m in arrows() if d not in ALLOWED[s])
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_folder_is_a_known_part() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {k.split(".")[1] if "." in k else "core" for k in cfg["tool"]["setuptools"]["package-dir"]}
    assert names <= set(ALLOWED), names - set(ALLOWED)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..bench import demo\n    import proassist_edge.cli\n")
    got = imported("proassist_edge.runtime.m", f)
    assert {"proassist_edge.bench", "proassist_edge.bench.demo", "proassist_edge.cli"} <= got
