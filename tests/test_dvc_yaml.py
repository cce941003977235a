"""dvc.yaml lists, for every stage, each medimg module the stage imports (so an edit there
re-runs it) and the stage modules are named as the stages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Files a stage uses without importing them: evaluate logs the serving model's code.
EXTRA_ROOTS = {"evaluate": ["src/medimg/serving_model.py"]}


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    """Every `medimg...` name imported anywhere in the file, function bodies included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("medimg")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medimg"):
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def module_closure(roots: list[Path]) -> set[Path]:
    """The medimg files reachable from `roots` by imports, parents' `__init__` included."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        for name in _imported(todo.pop()):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen


def _deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def _covered(file: Path, deps: list[str]) -> bool:
    rel = file.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_module_is_a_dependency(name):
    stage = STAGES[name]
    script = REPO / "stages" / f"{name}.py"
    assert stage["cmd"].startswith(f"python stages/{name}.py")
    module = SRC / "medimg" / f"{name}.py"  # imported by name: stage_main("<name>")
    roots = [script, module, *(REPO / p for p in EXTRA_ROOTS.get(name, []))]
    deps = _deps(stage)
    missing = sorted(
        f.relative_to(REPO).as_posix()
        for f in module_closure(roots) | set(roots)
        if not _covered(f, deps)
    )
    assert not missing, f"dvc.yaml stage {name} does not list {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_module_is_named_as_the_stage(name):
    script = REPO / "stages" / f"{name}.py"
    assert f'stage_main("{name}")' in script.read_text()
    assert (SRC / "medimg" / f"{name}.py").exists()


def test_the_closure_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from medimg.analysis.plots import save_figure\n")
    found = {f.relative_to(SRC).as_posix() for f in module_closure([probe])}
    assert {"medimg/analysis/plots.py", "medimg/analysis/__init__.py"} <= found
