"""dvc.yaml lists, for every stage, each medimg module the stage imports (so an edit there
re-runs it) and exactly the params `medimg.config.STAGE_PARAMS` declares for it, and the stage
modules are named as the stages. That a stage reads no param outside its entry is checked on
its real run: here for the quick stages, in the end-to-end test for all of them."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import yaml

from medimg.config import STAGE_PARAMS, UNTRACKED_PARAMS, Params, parse_params
from tests.params_reads import recording, undeclared

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# Files a stage uses without importing them: evaluate logs the serving model's code.
EXTRA_ROOTS = {"evaluate": ["src/medimg/pyfunc_classifier.py"]}


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


# ---------------------------------------------------------------------------------- params


def _params(stage: dict) -> list[str]:
    return list(stage.get("params", []))


def templated(stage: dict) -> set[str]:
    """The params keys a stage's dvc.yaml entry interpolates (`${paths.split}`,
    `${train.architectures}`): a changed value there is a changed stage, so DVC re-runs it."""
    return {
        key
        for key in re.findall(r"\$\{\s*([\w.]+)\s*\}", yaml.safe_dump(stage))
        if not key.startswith("item.")
    }


def unlisted_reads(
    reads: dict[str, set[str]], names: Iterable[str] = tuple(STAGES)
) -> dict[str, list[str]]:
    """Per stage of `names`, the keys it read (`tests.params_reads`) that its dvc.yaml entry
    does not track; a stage with no recorded read at all is listed too: the recorder missed it."""
    found = {}
    for name in names:
        stage = STAGES[name]
        if not reads.get(name):
            found[name] = ["<no reads recorded: did the stage run under the recorder?>"]
        elif missing := undeclared(reads[name], _params(stage), templated(stage)):
            found[name] = missing
    return found


def _schema_has(key: str) -> bool:
    model: type = Params
    for part in key.split("."):
        if not hasattr(model, "model_fields"):  # below a leaf or a mapping of sections
            return False
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        if part not in fields:
            return False
        model = fields[part].annotation
    return True


def test_stage_params_are_declared_once_and_listed_by_dvc_yaml():
    assert set(STAGE_PARAMS) == set(STAGES)
    for name, stage in STAGES.items():
        listed = _params(stage)
        assert len(listed) == len(set(listed)), f"dvc.yaml stage {name}: duplicate params"
        assert set(listed) == set(STAGE_PARAMS[name]), (
            f"dvc.yaml stage {name} lists params {sorted(listed)}; "
            f"medimg.config.STAGE_PARAMS declares {sorted(STAGE_PARAMS[name])}"
        )
    for key in {k for keys in STAGE_PARAMS.values() for k in keys} | set(UNTRACKED_PARAMS):
        assert _schema_has(key), f"{key}: not a key of params.yaml"


def test_recorder_sees_leaf_reads_through_properties_methods_getattr_and_dumps():
    params = parse_params({"train": {"overrides": {"tiny": {"epochs": 2}}}})
    with recording(params) as reads:
        values = [
            params.dataset.limits.max_image_pixels,
            params.validate_cfg.classes,  # the alias, not the attribute, names the key
            params.paths.eval_reports("tiny"),  # a method reads what it reads
            getattr(params.evaluate, "bootstrap"),  # noqa: B009  as resolve_plan reads train
            params.train.overrides["tiny"].epochs,
            params.train.augment.color.model_dump(),
            params.model_dump(),  # the whole config: a record (train logs it), not a read
        ]
    values.append(params.gate.min_accuracy)  # after the block: not recorded
    assert reads.keys == {
        "dataset.limits.max_image_pixels",
        "validate.classes",
        "paths.reports",
        "evaluate.bootstrap",
        "train.overrides",
        "train.overrides.tiny.epochs",
        "train.augment.color",
    }


def test_a_read_is_covered_by_its_key_a_section_above_it_a_template_or_mlflow():
    reads = {
        "dataset.limits.max_image_pixels",
        "dataset.limits_x",
        "paths.split",
        "paths.models",
        "mlflow.tracking_uri",
        "seed",
    }
    assert undeclared(reads, ["dataset.limits", "seed"], {"paths.split"}) == [
        "dataset.limits_x",
        "paths.models",
    ]


def test_templated_keys_of_a_stage():
    assert templated(STAGES["evaluate"]) >= {"paths.split", "paths.models", "train.architectures"}
    assert not any(k.startswith("item") for k in templated(STAGES["train"]))


def test_the_register_stage_reads_only_params_it_lists(tmp_path, capsys):
    """The quick stage, run for real here (the end-to-end test runs every stage)."""
    from medimg.io import write_json
    from medimg.register import run
    from tests.conftest import log_candidate, tiny_params

    params = tiny_params(tmp_path, train={"architectures": ["tiny"]}, gate={"min_accuracy": 0.5})
    params.paths.classes_json.parent.mkdir(parents=True, exist_ok=True)
    write_json(params.paths.classes_json, {"fingerprint": "fp1"})
    params.paths.eval_metrics("tiny").parent.mkdir(parents=True, exist_ok=True)
    log_candidate(params, "tiny", np.arange(50) % 5 > 0)
    with recording(params) as reads:
        assert run(params)["promoted"]
    assert unlisted_reads({"register": reads.keys}, ["register"]) == {}
