"""Temperature scaling (Guo et al. 2017): one scalar T, fitted on validation, that softens or
sharpens every probability without changing a single argmax or the ranking (so accuracy and
AUC stay as they are while the probabilities a clinician reads become honest).

Works on probabilities, not logits, so it applies to any saved model unchanged: a sigmoid p
has logit log(p / (1 - p)); softmax probabilities are logits up to a per-row constant, which
the softmax removes again. T > 1 softens, T < 1 sharpens, T = 1 is the identity.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar

EPS = 1e-7
T_BOUNDS = (0.05, 20.0)


def apply_temperature(probs: ArrayLike, temperature: float) -> np.ndarray:
    """Probabilities rescaled by `temperature`: (N,) sigmoid outputs or (N, K) softmax rows."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    if temperature == 1.0 or p.size == 0:
        return np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        logit = np.log(p) - np.log1p(-p)
        return 1.0 / (1.0 + np.exp(-logit / temperature))
    z = np.log(p) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(y: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, EPS, 1.0 - EPS)
    if p.ndim == 1:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def fit_temperature(y_true: ArrayLike, probs: ArrayLike) -> float:
    """The T in [0.05, 20] minimising the negative log-likelihood on (validation) labels.

    Searched on log T (bounded Brent), so halving and doubling are equally easy to reach.
    With a single class present the likelihood only pushes T to a bound, so 1.0 is returned.
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if len(y) == 0 or len(np.unique(y)) < 2:
        return 1.0
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    best = minimize_scalar(
        lambda log_t: _nll(y, apply_temperature(p, float(np.exp(log_t)))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(best.x))
