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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medimg.data.properties import PROPERTIES, properties_table

REFERENCE_VERSION = 2  # 2: + the model's `embedding` and `predictions` groups
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


def quantile_profile(
    table: Mapping[str, np.ndarray], names: Iterable[str] | None = None
) -> dict[str, Any]:
    """{n, levels, properties: {name: {n, mean, std, quantiles}}} of the columns `names` (all
    of `table` when None): the shape every reference group has, so one KS test reads them all
    (`drift.property_drift`)."""
    levels = np.asarray(QUANTILE_LEVELS, dtype=np.float64)
    props: dict[str, Any] = {}
    n = None
    for name in list(table) if names is None else names:
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
    return {"n": int(n or 0), "levels": [float(x) for x in levels], "properties": props}


def reference_from_table(table: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The image-property reference from column-wise properties (`properties_table`'s output):
    for a caller that already has them (a bench reusing one table for the reference and the
    windows). The top level of every reference; `with_model_outputs` adds the model's groups."""
    return {"version": REFERENCE_VERSION, **quantile_profile(table, PROPERTIES)}


def build_reference(images: Iterable[Any]) -> dict[str, Any]:
    """The reference of `images` (arrays, PIL images or encoded bytes, at original size):
    JSON-serialisable, about 11 KB whatever the number of images."""
    return reference_from_table(properties_table(images))


# ------------------------------------------------------------------- the model's own groups


def fit_embedding(features: np.ndarray, components: int, seed: int = 0) -> dict[str, Any]:
    """A PCA of penultimate-layer embeddings, as plain lists: what the served model needs to
    reduce each request's embedding to `components` numbers (`project`). sklearn's PCA
    (full SVD: deterministic, signs fixed by `svd_flip`); fewer components when the embedding
    or the sample is smaller."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"embedding reference needs (N >= 2, D) features, got {x.shape}")
    k = max(1, min(int(components), x.shape[1], len(x) - 1))
    pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(x)
    return {
        "dim": int(x.shape[1]),
        "mean": [_round(v) for v in pca.mean_],
        "basis": [[_round(v) for v in row] for row in pca.components_],
        "explained_variance_ratio": [_round(v) for v in pca.explained_variance_ratio_],
    }


def embedding_columns(k: int) -> list[str]:
    return [f"emb_{i}" for i in range(k)]


def project(embedding: Mapping[str, Any], features: np.ndarray) -> dict[str, np.ndarray]:
    """(N, D) embeddings → {emb_i: (N,)}: centred and projected on the stored PCA basis."""
    mean = np.asarray(embedding["mean"], dtype=np.float64)
    basis = np.asarray(embedding["basis"], dtype=np.float64)
    x = np.asarray(features, dtype=np.float64).reshape(-1, mean.size)
    z = (x - mean) @ basis.T
    return {name: z[:, i] for i, name in enumerate(embedding_columns(basis.shape[0]))}


def probability_columns(probs: np.ndarray, classes: Sequence[str]) -> dict[str, np.ndarray]:
    """The served answer's `p_<class>` columns (`scoring.result_frame`): binary models give
    the positive class's only."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        return {f"p_{classes[1]}": p}
    return {f"p_{name}": p[:, i] for i, name in enumerate(classes)}


def with_model_outputs(
    reference: Mapping[str, Any],
    *,
    features: np.ndarray | None,
    components: int,
    probs: np.ndarray,
    decisions: Sequence[str],
    classes: Sequence[str],
    seed: int = 0,
) -> dict[str, Any]:
    """The image reference plus what the model made of the same kind of images:

    - `embedding`: the PCA (`fit_embedding`) of `features` and the quantiles of each
      component (absent when `features` is None or `components` is 0);
    - `predictions`: quantiles of the served probabilities (`p_<class>`, calibrated, at the
      served TTA) and the share of each decided class, on val: what a served window's answers
      should look like when nothing has moved.
    """
    out = dict(reference)
    if features is not None and components > 0:
        emb = fit_embedding(features, components, seed)
        out["embedding"] = {**emb, **quantile_profile(project(emb, features))}
    decided = np.asarray(list(decisions))
    share = {c: float(np.mean(decided == c)) if decided.size else 0.0 for c in classes}
    out["predictions"] = {
        **quantile_profile(probability_columns(probs, classes)),
        "classes": list(classes),
        "class_share": share,
    }
    return out
