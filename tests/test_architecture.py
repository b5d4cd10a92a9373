"""The layers are a contract: imports only point down, and flows/ stands alone.

cli → orchestration → stages → report → metrics → data → (errors, atomic, config) → flows.
Every import in every module (top level or inside a function) is read with :mod:`ast` and resolved to
its layer; a module may import from its own layer or any layer below it, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Highest first. A module's layer is the first entry that is a prefix of its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("calodistill.pipeline.cli",)),
    ("orchestration", ("calodistill.pipeline.orchestration",)),
    ("stages", ("calodistill.pipeline.stages",)),
    ("report", ("calodistill.pipeline.report",)),
    ("metrics", ("calodistill.pipeline.metrics",)),
    ("data", ("calodistill.pipeline.data",)),
    ("base", ("calodistill.pipeline",)),  # errors, atomic, config: shared by every pipeline layer
    ("flows", ("calodistill.flows",)),
]
RANK = {name: len(LAYERS) - i for i, (name, _) in enumerate(LAYERS)}
FORBIDDEN_IN_FLOWS = ("calodistill.pipeline", "dask", "distributed", "mlflow", "pipeline")


def layer_of(module: str) -> str | None:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = ["calodistill", *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted target) for every import statement in the file."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.level and not node.module:  # "from .. import x": x may be a module
                found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, target))
    return found


def source_files() -> list[Path]:
    return sorted([*(REPO / "flows").rglob("*.py"), *(REPO / "pipeline").rglob("*.py")])


def violations(files: list[Path]) -> list[str]:
    bad: list[str] = []
    for path in files:
        mod = module_name(path)
        own = layer_of(mod)
        for line, target in imports_of(path):
            where = f"{path.relative_to(REPO)}:{line}"
            if own == "flows" and any(target == f or target.startswith(f + ".") for f in FORBIDDEN_IN_FLOWS):
                bad.append(f"{where}: flows/ imports {target}")
                continue
            if target in ("pipeline", "flows") or target.startswith(("pipeline.", "flows.")):
                bad.append(f"{where}: bare import name {target} (use calodistill.* or a relative import)")
                continue
            other = layer_of(target)
            if own and other and RANK[other] > RANK[own]:
                bad.append(f"{where}: {own} imports {other} ({target})")
    return bad


def test_imports_only_point_down() -> None:
    bad = violations(source_files())
    assert not bad, "upward or forbidden imports:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberate data → stages import (and a flows → mlflow one) is reported."""
    data_mod = REPO / "pipeline" / "data" / "_upward_probe.py"
    flows_mod = REPO / "flows" / "_upward_probe.py"
    try:
        data_mod.write_text("from ..stages import generate\n")
        flows_mod.write_text("def f():\n    import mlflow\n")
        bad = violations([data_mod, flows_mod])
    finally:
        data_mod.unlink(missing_ok=True)
        flows_mod.unlink(missing_ok=True)
    assert any("data imports stages" in b for b in bad), bad
    assert any("flows/ imports mlflow" in b for b in bad), bad


def test_no_module_is_long_without_a_reason() -> None:
    """Over ~500 lines a module says why in its docstring ("Long because: ...")."""
    long = []
    for path in source_files():
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > 520 and "Long because" not in doc:
            long.append(f"{path.relative_to(REPO)}: {n} lines")
    assert not long, "modules over 520 lines without a reason in their docstring:\n" + "\n".join(long)
