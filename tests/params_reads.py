"""Which params a process reads, as dotted keys: the evidence for the dvc.yaml params check.

`recording(params)` notes where every config model sits in the tree; while it is active,
reading a field (`params.dataset.limits.max_image_pixels`, `getattr(cfg, "bootstrap")`,
through a property such as `validate_cfg` or a method such as `paths.eval_reports`) adds its
key, `dataset.limits.max_image_pixels`, to the reads. Only leaves count: passing through
`params.dataset` on the way to `dataset.limits` reads nothing by itself, and dumping a section
(`cfg.model_dump()`) reads all of it. Dumping the whole config is not counted: train logs it
to its MLflow run as the run's record, and no output is computed from every knob.

`install(folder)` (called by the sitecustomize that `sitecustomize_source` writes) records a
whole process: every config `medimg.config.load_params` returns is recorded, and at exit the
reads go to `folder/<pid>.json` with the process's argv. The end-to-end test runs `dvc repro`
this way, so each stage is checked on its real run, as DVC starts it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from medimg.config import UNTRACKED_PARAMS, Frozen

_GETATTRIBUTE = Frozen.__getattribute__
_MODEL_DUMP = Frozen.model_dump


class Reads:
    """The dotted keys read from the recorded configs."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self._where: dict[int, str] = {}  # id(model) -> its dotted key ("" for the root)
        self._alive: list[BaseModel] = []  # recorded models stay alive: their ids stay theirs

    def track(self, model: BaseModel, prefix: str = "") -> None:
        self._where[id(model)] = prefix
        self._alive.append(model)
        for name, field in type(model).model_fields.items():
            value = model.__dict__[name]
            key = _join(prefix, field.alias or name)
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, item in items:
                if isinstance(item, BaseModel):
                    self.track(item, key if sub is None else f"{key}.{sub}")

    def where(self, model: BaseModel) -> str | None:
        return self._where.get(id(model))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_ACTIVE: list[Reads] = []


def _reading(self: BaseModel, name: str) -> Any:
    value = _GETATTRIBUTE(self, name)
    fields = type(self).model_fields
    if _ACTIVE and name in fields and not isinstance(value, BaseModel):
        for reads in _ACTIVE:
            where = reads.where(self)
            if where is not None:
                reads.keys.add(_join(where, fields[name].alias or name))
    return value


def _dumping(self: BaseModel, *args: Any, **kwargs: Any) -> dict[str, Any]:
    for reads in _ACTIVE:
        where = reads.where(self)
        if where:  # not the root: see the module docstring
            reads.keys.add(where)
    return _MODEL_DUMP(self, *args, **kwargs)


def _hook() -> None:
    Frozen.__getattribute__ = _reading  # type: ignore[method-assign]
    Frozen.model_dump = _dumping  # type: ignore[method-assign]


def _unhook() -> None:
    Frozen.__getattribute__ = _GETATTRIBUTE  # type: ignore[method-assign]
    Frozen.model_dump = _MODEL_DUMP  # type: ignore[method-assign]


@contextlib.contextmanager
def recording(*configs: BaseModel) -> Iterator[Reads]:
    """The keys read from `configs` (whole params trees) inside the block."""
    reads = Reads()
    for config in configs:
        reads.track(config)
    _ACTIVE.append(reads)
    _hook()
    try:
        yield reads
    finally:
        _ACTIVE.remove(reads)
        if not _ACTIVE:
            _unhook()


def undeclared(
    reads: Iterable[str], declared: Iterable[str], templated: Iterable[str]
) -> list[str]:
    """The keys read that neither the stage's params (`declared`) nor its templated dvc.yaml
    entries (`${paths.split}`: a changed value is a changed stage) nor `UNTRACKED_PARAMS`
    cover; a key is covered by itself or by any section above it."""
    covering = (*declared, *templated, *UNTRACKED_PARAMS)

    def covered(key: str) -> bool:
        return any(key == c or key.startswith(f"{c}.") for c in covering)

    return sorted(k for k in set(reads) if not covered(k))


def install(folder: str | Path) -> None:
    """Record every config this process loads; write the reads to `folder/<pid>.json` at exit."""
    import medimg.config as config

    reads = Reads()
    original = config.load_params

    def load_params(path: str | Path = "params.yaml") -> config.Params:
        params = original(path)
        reads.track(params)
        return params

    def write() -> None:
        if reads.keys:
            out = Path(folder) / f"{os.getpid()}.json"
            out.write_text(json.dumps({"argv": sys.argv, "reads": sorted(reads.keys)}))

    config.load_params = load_params
    _ACTIVE.append(reads)
    _hook()
    atexit.register(write)


def sitecustomize_source(folder: Path) -> str:
    """A `sitecustomize.py` that runs `install(folder)` in every Python process it reaches
    (put its folder on PYTHONPATH): the stage processes `dvc repro` starts."""
    return (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('params_reads', {__file__!r})\n"
        "module = sys.modules['params_reads'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"module.install({str(folder)!r})\n"
    )


def stage_reads(folder: Path) -> dict[str, set[str]]:
    """What each stage read, over all its runs (every matrix item), from `install`'s files."""
    found: dict[str, set[str]] = {}
    for file in sorted(Path(folder).glob("*.json")):
        record = json.loads(file.read_text())
        script = Path(record["argv"][0])
        if script.parent.name == "stages":
            found.setdefault(script.stem, set()).update(record["reads"])
    return found
