"""exp, log, pow, sin and cos that give the same bits on every CPU, for the synthetic data.

numpy picks its transcendental functions at run time by the CPU's SIMD level (AVX-512, AVX2,
SSE), and those variants round differently in the last bits: the synthetic generators then
wrote another `images.zip` on each machine (md5 2f84a177… vs 3ca4d6dc… on an EPYC without
AVX-512), so a teammate's `dvc repro` rebuilt other data and trained other models. Addition,
multiplication, division, sqrt, rint and ldexp are correctly rounded by IEEE 754 whatever the
vector width, so these functions use only those: range reduction (Cody-Waite, fdlibm's split
constants) and a Taylor polynomial in Horner form, in float64. They are within a few ulp of
the true value, which is far below the 1/255 that decides a pixel, and above all the same
everywhere. Matrix products are avoided for the same reason (BLAS kernels differ by CPU).

Speed is not a goal (a cell of 150x150 px costs microseconds more); agreement is.
"""

from __future__ import annotations

from typing import overload

import numpy as np

# ln 2 and pi/2 split in a high part with trailing zero bits (k * HI is exact for |k| < 2^20)
# and a low part: fdlibm's constants.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_PIO2_HI = 1.57079632673412561417e00
_PIO2_LO = 6.07710050650619224932e-11
_TWO_OVER_PI = 6.36619772367581382433e-01
_SQRT_HALF = 0.70710678118654757

_EXP_TERMS = 14  # |r| <= ln2/2: the first omitted term is < 1e-17 relative
_TRIG_TERMS = 11  # |r| <= pi/4: sin to r^21, cos to r^20
_LOG_TERMS = 12  # |s| <= 0.172: 2 * s^(2k+1) / (2k+1) up to s^23


@overload
def exp(x: float) -> float: ...
@overload
def exp(x: np.ndarray) -> np.ndarray: ...
def exp(x):
    """e**x; 0 below -708 (no subnormals), inf above 709."""
    a = np.asarray(x, dtype=np.float64)
    safe = np.clip(a, -708.0, 709.0)
    k = np.rint(safe * _INV_LN2)
    r = (safe - k * _LN2_HI) - k * _LN2_LO
    p = np.ones_like(r)
    for n in range(_EXP_TERMS, 0, -1):
        p = 1.0 + p * r / n
    out = np.ldexp(p, k.astype(np.int64))
    out = np.where(a < -708.0, 0.0, np.where(a > 709.0, np.inf, out))
    return _like(x, out)


def _sin_cos_reduced(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Taylor sin and cos of |r| <= pi/4."""
    r2 = r * r
    s = np.ones_like(r)
    c = np.ones_like(r)
    for n in range(_TRIG_TERMS, 0, -1):
        s = 1.0 - s * r2 / ((2 * n) * (2 * n + 1))
        c = 1.0 - c * r2 / ((2 * n - 1) * (2 * n))
    return s * r, c


def _quadrant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64)
    k = np.rint(a * _TWO_OVER_PI)
    r = (a - k * _PIO2_HI) - k * _PIO2_LO
    return r, np.mod(k.astype(np.int64), 4)


@overload
def sin(x: float) -> float: ...
@overload
def sin(x: np.ndarray) -> np.ndarray: ...
def sin(x):
    """sin(x) for |x| < 1e5 (angles in a picture, not astronomy)."""
    r, q = _quadrant(x)
    s, c = _sin_cos_reduced(r)
    out = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    return _like(x, out)


@overload
def cos(x: float) -> float: ...
@overload
def cos(x: np.ndarray) -> np.ndarray: ...
def cos(x):
    """cos(x) for |x| < 1e5."""
    r, q = _quadrant(x)
    s, c = _sin_cos_reduced(r)
    out = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    return _like(x, out)


@overload
def log(x: float) -> float: ...
@overload
def log(x: np.ndarray) -> np.ndarray: ...
def log(x):
    """Natural log of x > 0 (-inf at 0): log(m * 2^e) with m in [sqrt(1/2), sqrt(2))."""
    a = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(np.where(a > 0, a, 1.0))
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)
    e = (e - low).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = np.zeros_like(s)
    for n in range(_LOG_TERMS - 1, -1, -1):
        p = 1.0 / (2 * n + 1) + p * s2
    out = e * _LN2_HI + (2.0 * s * p + e * _LN2_LO)
    return _like(x, np.where(a > 0, out, -np.inf))


@overload
def power(x: float, y: float) -> float: ...
@overload
def power(x: np.ndarray, y: float | np.ndarray) -> np.ndarray: ...
def power(x, y):
    """x**y for x >= 0 (0**y = 0 for y > 0)."""
    a = np.asarray(x, dtype=np.float64)
    out = np.where(a > 0, exp(np.asarray(y, dtype=np.float64) * log(a)), 0.0)
    return _like(x, out)


def hypot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sqrt(x^2 + y^2): sqrt is correctly rounded, numpy's hypot is a libm/SIMD choice."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return np.sqrt(x * x + y * y)


def _like(x: object, out: np.ndarray):
    """A Python float back for a scalar argument, an array otherwise."""
    return float(out) if np.ndim(x) == 0 and not isinstance(x, np.ndarray) else out
