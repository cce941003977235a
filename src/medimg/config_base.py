"""The building blocks of params.yaml's typed tree: frozen models and the names declared once.

Shared by `medimg.config` (the data and training sections, loading) and
`medimg.config_decision` (evaluate, register and gate), so neither module passes 450 lines.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PosInt = Annotated[int, Field(ge=1)]
# Names declared once: params.yaml is checked against these Literals, and code that needs the
# list takes it from them with `typing.get_args` (the model registry, TFLite export).
Optimizer = Literal["adam", "sgd", "rmsprop"]
Schedule = Literal["constant", "poly", "plateau", "cosine"]
Quantize = Literal["none", "float16", "int8"]  # TFLite export: analysis/edge, `medimg export`
QUANTIZE_MODES: tuple[str, ...] = get_args(Quantize)


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
