"""The drift reference: what the training images' properties looked like, in a few KB.

A monitoring job compares served images with the images a model was trained on. Shipping
those images (or even one row per image) with the model is heavy and leaks data, so the
reference keeps, per property of `medimg.data.properties`, only n, mean, std and the values
at fixed quantile levels. That is enough to rebuild the reference CDF (piecewise linear
between the stored quantiles: `drift.reference_cdf`) to within 1% of probability mass, far
below what a KS test on a window of a few hundred requests can resolve, and to bound each
property for the out-of-distribution check (the 0.1% and 99.9% levels).

The properties are the data layer's, computed on the original pixels (before any model
resize), not redefined here: evaluate slices accuracy by the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from medimg.data.properties import PROPERTIES, properties_table

REFERENCE_VERSION = 1
# 0, 0.1%, 1%, 2%, ..., 99%, 99.9%, 100%: 103 levels. The 0.1%/99.9% pair bounds the
# out-of-distribution check; the 1% grid is the CDF the KS test reads.
QUANTILE_LEVELS: tuple[float, ...] = (
    0.0,
    0.001,
    *(round(i / 100, 2) for i in range(1, 100)),
    0.999,
    1.0,
)
# Significant digits kept in the JSON: the properties are measurements, 7 digits is plenty
# and keeps a 10-property reference well under 50 KB.
SIGNIFICANT_DIGITS = 7


def _round(x: float) -> float:
    """`x` to SIGNIFICANT_DIGITS significant digits, as a plain float (JSON-serialisable)."""
    return float(f"{float(x):.{SIGNIFICANT_DIGITS}g}")


def reference_from_table(table: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The reference from column-wise properties (`properties_table`'s output): for a caller
    that already has them (a bench reusing one table for the reference and the windows)."""
    levels = np.asarray(QUANTILE_LEVELS, dtype=np.float64)
    props: dict[str, Any] = {}
    n = None
    for name in PROPERTIES:
        values = np.asarray(table[name], dtype=np.float64)
        if values.size == 0:
            raise ValueError("a reference needs at least one image")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"non-finite values in property {name!r}")
        n = values.size if n is None else n
        if values.size != n:
            raise ValueError(f"property {name!r} has {values.size} values, expected {n}")
        quantiles = np.quantile(values, levels)
        # Rounding may break monotonicity by one ulp; the CDF needs non-decreasing values.
        rounded = np.maximum.accumulate([_round(q) for q in quantiles])
        props[name] = {
            "n": int(values.size),
            "mean": _round(values.mean()),
            "std": _round(values.std()),
            "quantiles": [float(q) for q in rounded],
        }
    return {
        "version": REFERENCE_VERSION,
        "n": int(n or 0),
        "levels": [float(x) for x in levels],
        "properties": props,
    }


def build_reference(images: Iterable[Any]) -> dict[str, Any]:
    """The reference of `images` (arrays, PIL images or encoded bytes, at original size):
    JSON-serialisable, about 11 KB whatever the number of images."""
    return reference_from_table(properties_table(images))
