"""exactmath agrees with numpy to a few ulp, and keeps the edge cases the generators hit."""

from __future__ import annotations

import numpy as np

from medimg.data import exactmath as em


def test_close_to_numpy_over_the_ranges_the_generators_use():
    x = np.linspace(-60, 8, 20_001)
    np.testing.assert_allclose(em.exp(x), np.exp(x), rtol=1e-15, atol=0)
    a = np.linspace(-40, 40, 20_001)
    np.testing.assert_allclose(em.sin(a), np.sin(a), rtol=0, atol=1e-15)
    np.testing.assert_allclose(em.cos(a), np.cos(a), rtol=0, atol=1e-15)
    p = np.geomspace(1e-12, 1e12, 20_001)
    np.testing.assert_allclose(em.log(p), np.log(p), rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(em.power(p[:5000], 1.3), p[:5000] ** 1.3, rtol=1e-14)
    np.testing.assert_allclose(em.hypot(a, x[::-1]), np.hypot(a, x[::-1]), rtol=1e-15)


def test_edges_and_scalars():
    assert em.exp(0.0) == 1.0 and em.exp(-1000.0) == 0.0 and em.exp(1000.0) == np.inf
    assert em.log(1.0) == 0.0 and em.log(0.0) == -np.inf
    assert em.power(0.0, 2.2) == 0.0 and em.cos(0.0) == 1.0 and em.sin(0.0) == 0.0
    assert isinstance(em.exp(1.0), float) and isinstance(em.exp(np.ones(2)), np.ndarray)
