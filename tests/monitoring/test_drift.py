"""Drift on image properties: constructed cells, shifted on purpose, must be caught, and clean
ones must not."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from medimg.data.properties import properties_table
from medimg.monitoring.drift import (
    check_window,
    out_of_distribution,
    property_drift,
    reference_cdf,
)
from medimg.monitoring.reference import build_reference


def cells(n: int, seed: int) -> list[np.ndarray]:
    """`n` NIH-like cells: a noisy pink disk of random size and stain on a black background
    (the black corners matter: saturation and brightness mix cell and background)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = int(rng.integers(36, 45))
        yy, xx = np.mgrid[:size, :size]
        r = rng.uniform(0.35, 0.48) * size
        disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r**2
        stain = np.array([200, 130, 160]) + rng.normal(0, 8, 3)
        img = np.zeros((size, size, 3))
        img[disk] = stain + rng.normal(0, 12, (int(disk.sum()), 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return build_reference(cells(400, seed=0))


def test_reference_is_small_json(reference: dict) -> None:
    text = json.dumps(reference)
    assert len(text.encode()) < 50_000
    assert json.loads(text) == reference
    assert reference["n"] == 400
    assert len(reference["properties"]["brightness"]["quantiles"]) == len(reference["levels"])


def test_reference_cdf_is_a_cdf(reference: dict) -> None:
    x = np.linspace(0, 1, 200)
    f = reference_cdf(reference, "brightness", x)
    assert f[0] == 0.0 and f[-1] == 1.0
    assert np.all(np.diff(f) >= 0)


def test_clean_window_is_not_flagged(reference: dict) -> None:
    for seed in (1, 2, 3):
        result = check_window(reference, properties_table(cells(100, seed=seed)))
        assert not result["drifted"], result["reasons"]
        assert result["ood"]["share"] <= 0.05


def test_darker_window_is_flagged_as_brightness(reference: dict) -> None:
    dark = [(c * 0.7).astype(np.uint8) for c in cells(100, seed=4)]
    result = check_window(reference, properties_table(dark))
    assert result["drifted"]
    drifted = {n for n, r in result["groups"]["properties"].items() if r["drifted"]}
    assert "brightness" in drifted
    assert "saturation" not in drifted  # scaling keeps hue/saturation


def test_blurred_window_is_flagged_as_sharpness(reference: dict) -> None:
    blurred = [
        np.asarray(Image.fromarray(c).filter(ImageFilter.GaussianBlur(1.5)))
        for c in cells(100, seed=5)
    ]
    drift = property_drift(reference, properties_table(blurred))
    assert drift["sharpness"]["drifted"]
    assert drift["sharpness"]["window_mean"] < drift["sharpness"]["reference_mean"]
    assert not drift["size"]["drifted"]


def test_grayscale_oct_like_image_is_out_of_distribution(reference: dict) -> None:
    rng = np.random.default_rng(6)
    # An OCT-like B-scan: grey speckle in horizontal bands, same size as a cell.
    band = (np.sin(np.linspace(0, 6, 40))[:, None] * 60 + 90).repeat(40, axis=1)
    oct_like = np.clip(band + rng.normal(0, 20, band.shape), 0, 255).astype(np.uint8)
    props = properties_table([oct_like, *cells(3, seed=7)])
    flags, reasons = out_of_distribution(reference, props)
    assert flags.tolist() == [True, False, False, False]
    assert "saturation" in reasons[0]


def test_window_of_oct_like_images_is_flagged_by_ood_share(reference: dict) -> None:
    grey = [np.asarray(Image.fromarray(c).convert("L")) for c in cells(30, seed=8)]
    result = check_window(reference, properties_table(grey + cells(70, seed=9)))
    assert result["ood"]["flagged"] and result["drifted"]
    assert result["ood"]["share"] == pytest.approx(0.3)
    assert "saturation" in result["ood"]["properties"]


def test_sampling_noise_is_added_to_min_statistic(reference: dict) -> None:
    """With no effect floor, a small clean window must still not drift: its noise is
    covered by the KS critical value, which shrinks as the window grows."""
    small = property_drift(reference, properties_table(cells(25, seed=10)), min_statistic=0.0)
    assert not any(r["drifted"] for r in small.values())
    assert small["brightness"]["statistic"] > 0  # so D > 0 alone would have flagged it
    large = property_drift(reference, properties_table(cells(200, seed=11)))
    assert large["brightness"]["critical"] < small["brightness"]["critical"]
