"""An offline, deterministic stand-in for the NIH malaria cell-image archive.

A fresh clone must run the whole pipeline without a 350 MB download, so the default dataset
is drawn here: segmented red blood cells on black, stained per patient, in the exact zip layout
of `cell_images.zip` (`cell_images/<Parasitized|Uninfected>/C<patient>P<n>thinF_..._cell_<k>.png`).

The data is built to be honest rather than easy. Stain, brightness, texture and illumination
vary per patient (so a patient-level split matters), a quarter of patients are healthy (so
patient grouping is exercised), some parasites are faint or sit on the rim, and confusers
(platelets, stain specks, rim artefacts) appear in *both* classes so they are noise, never a
label cue. A small CNN lands in the 90s, not at 100%.

Rendering is pure numpy on a per-cell generator; only `generate` touches the disk, and it
writes a byte-identical zip for the same config and seed on any CPU: every transcendental
function that shapes a pixel is `medimg.data.exactmath`'s (numpy's own round differently by
SIMD level), and angles are carried as unit vectors, not through arctan2.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medimg.config import SyntheticConfig
from medimg.data import exactmath as em
from medimg.data.packing import write_zip
from medimg.io import atomic_path

CLASSES = ("Parasitized", "Uninfected")
ROOT = "cell_images"

# Colours in [0, 1] RGB: Giemsa-stained cytoplasm (pink → lilac) and parasite chromatin.
PINK = np.array([0.86, 0.55, 0.62])
LILAC = np.array([0.76, 0.58, 0.80])
CHROMATIN = np.array([0.34, 0.12, 0.44])
PLATELET = np.array([0.66, 0.46, 0.74])
SPECK = np.array([0.36, 0.22, 0.40])

# Difficulty knobs: share of parasites drawn faint, and of cells carrying 1 vs 2 confusers.
FAINT_PARASITE_P = 0.15
RIM_PARASITE_P = 0.3
RING_P = 0.45


@dataclass(frozen=True)
class PatientStyle:
    """What one patient's slide looks like: every cell of that patient shares it.

    Real smears differ by staining batch, microscope and camera far more than cells within a
    slide do; drawing those once per patient makes an image-level split leak and a
    patient-level split honest, as with the NIH data.
    """

    hue: float  # 0 = pink cytoplasm, 1 = lilac
    brightness: float  # overall gain of the camera / illumination
    saturation: float  # stain strength: 1 keeps the colour, 0 greys it out
    texture_scale: float  # grain of the cytoplasm texture, in cells across the crop
    texture_strength: float  # amplitude of that texture
    illumination: float  # strength of a linear light gradient across the cell
    pallor: float  # biconcave central pallor (+) or dark centre (-)
    rim: float  # darkening of the membrane edge
    parasite_contrast: float  # how strongly this slide stains chromatin
    noise: float  # per-pixel sensor noise
    confusers: float  # chance a cell carries artefacts: some slides are dirtier than others

    @classmethod
    def sample(cls, rng: np.random.Generator, confuser_fraction: float = 0.3) -> PatientStyle:
        """Draw a slide look; the same law for healthy and infected patients, so no leak."""
        return cls(
            hue=float(rng.uniform(0.0, 1.0)),
            brightness=float(rng.uniform(0.78, 1.08)),
            saturation=float(rng.uniform(0.65, 1.15)),
            texture_scale=float(rng.uniform(4.0, 12.0)),
            texture_strength=float(rng.uniform(0.02, 0.07)),
            illumination=float(rng.uniform(0.0, 0.12)),
            pallor=float(rng.uniform(-0.04, 0.10)),
            rim=float(rng.uniform(0.05, 0.25)),
            parasite_contrast=float(rng.uniform(0.65, 1.0)),
            noise=float(rng.uniform(0.005, 0.02)),
            confusers=float(np.clip(confuser_fraction * rng.uniform(0.5, 1.5), 0.0, 1.0)),
        )


@dataclass(frozen=True)
class _Geometry:
    """Per-pixel polar coordinates of one cell, normalised so the membrane sits at rho == 1.

    The angle is kept as its cosine and sine (a unit vector), so harmonics of it are products
    and sums, exact on every CPU, instead of arctan2 and cos.
    """

    rho: np.ndarray
    cos_t: np.ndarray
    sin_t: np.ndarray
    yy: np.ndarray  # pixel rows
    xx: np.ndarray  # pixel columns
    edge: np.ndarray  # radius of the membrane at each pixel's angle
    mask: np.ndarray  # anti-aliased cell coverage in [0, 1]
    scale: float  # pixels per unit of the cell's mean radius


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _geometry(rng: np.random.Generator, h: int, w: int) -> _Geometry:
    """An irregular, tightly cropped round cell: low harmonics wobble its outline."""
    ry, rx = 0.5 * h * rng.uniform(0.86, 0.93), 0.5 * w * rng.uniform(0.86, 0.93)
    cy, cx = (h - 1) / 2 + rng.normal(0, 0.01 * h), (w - 1) / 2 + rng.normal(0, 0.01 * w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    rho = em.hypot(dy, dx)
    safe = np.where(rho > 0, rho, 1.0)
    cos_t, sin_t = np.where(rho > 0, dx / safe, 1.0), np.where(rho > 0, dy / safe, 0.0)
    edge = np.ones_like(rho)
    cos_k, sin_k = cos_t, sin_t  # cos and sin of k * theta, by complex multiplication
    for k, amp in zip(
        (1, 2, 3, 4, 5), [0.0, *rng.uniform(0, [0.04, 0.025, 0.015, 0.01])], strict=True
    ):
        if k > 1:
            cos_k, sin_k = cos_k * cos_t - sin_k * sin_t, sin_k * cos_t + cos_k * sin_t
            phase = rng.uniform(0, 2 * np.pi)  # amp * cos(k * theta + phase)
            edge += amp * (cos_k * em.cos(phase) - sin_k * em.sin(phase))
    scale = 0.5 * (rx + ry)
    mask = np.clip((edge - rho) * scale + 0.5, 0.0, 1.0)
    return _Geometry(rho, cos_t, sin_t, yy, xx, edge, mask, float(scale))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Zero-mean texture of a given grain: a coarse random grid, bicubically upsampled."""
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float64)  # Pillow's resampling is plain C: no SIMD choice


def _body(rng: np.random.Generator, style: PatientStyle, geo: _Geometry) -> np.ndarray:
    """Stained cytoplasm with texture, central pallor, darker rim and uneven light."""
    h, w = geo.rho.shape
    hue = np.clip(style.hue + rng.normal(0, 0.08), 0, 1)
    base = (1 - hue) * PINK + hue * LILAC
    grey = (base[0] + base[1] + base[2]) / 3
    base = grey + style.saturation * (base - grey)
    r = geo.rho / geo.edge
    shade = 1.0 + style.pallor * em.exp(-((r / 0.45) ** 2)) - style.rim * np.clip(r - 0.7, 0, 1)
    shade += style.texture_strength * _smooth_noise(rng, h, w, style.texture_scale)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (em.cos(angle) * (geo.xx / w - 0.5) + em.sin(angle) * (geo.yy / h - 0.5)) * 2
    shade += style.illumination * ramp
    return base[None, None, :] * shade[..., None]


def _spot_centre(rng: np.random.Generator, geo: _Geometry, r_lo: float, r_hi: float) -> tuple:
    """A point inside the cell at a relative radius in [r_lo, r_hi], in pixel coordinates."""
    h, w = geo.rho.shape
    ang, rel = rng.uniform(0, 2 * np.pi), rng.uniform(r_lo, r_hi)
    cy = (h - 1) / 2 + em.sin(ang) * rel * 0.5 * h * 0.86
    cx = (w - 1) / 2 + em.cos(ang) * rel * 0.5 * w * 0.86
    return float(cy), float(cx)


def _blob(geo: _Geometry, cy: float, cx: float, radius: float) -> np.ndarray:
    """A soft round spot of `radius` pixels: Gaussian falloff, peak 1."""
    d2 = (geo.yy - cy) ** 2 + (geo.xx - cx) ** 2
    return em.exp(-d2 / (2 * radius**2))


def _ring(geo: _Geometry, cy: float, cx: float, radius: float, width: float) -> np.ndarray:
    """A thin annulus, the ring-form trophozoite, with its chromatin dot on one side."""
    d = em.hypot(geo.yy - cy, geo.xx - cx)
    band = em.exp(-(((d - radius) / width) ** 2))
    dot = _blob(geo, cy - radius * 0.7, cx + radius * 0.7, width * 1.2)
    return np.maximum(band * 0.8, dot)


def _paint(rgb: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend a stain colour over the cell (stains absorb, so they darken)."""
    a = np.clip(alpha, 0, 1)[..., None]
    return rgb * (1 - a) + colour[None, None, :] * a


def _parasites(
    rng: np.random.Generator, style: PatientStyle, geo: _Geometry, rgb: np.ndarray
) -> np.ndarray:
    """1-3 chromatin dots or rings; some on the rim, some faint, as in thin-smear falciparum."""
    n = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    for _ in range(n):
        rim = rng.random() < RIM_PARASITE_P
        cy, cx = _spot_centre(rng, geo, *((0.75, 0.95) if rim else (0.0, 0.7)))
        strength = style.parasite_contrast * rng.uniform(0.6, 0.95)
        if rng.random() < FAINT_PARASITE_P:
            strength *= rng.uniform(0.3, 0.55)
        if rng.random() < RING_P:
            shape = _ring(geo, cy, cx, geo.scale * rng.uniform(0.12, 0.18), geo.scale * 0.05)
        else:
            shape = _blob(geo, cy, cx, geo.scale * rng.uniform(0.06, 0.10))
        rgb = _paint(rgb, strength * shape, CHROMATIN * rng.uniform(0.85, 1.15))
    return rgb


def _confuser(rng: np.random.Generator, geo: _Geometry, rgb: np.ndarray) -> np.ndarray:
    """One parasite look-alike: a pale platelet, a small stain speck or a faint rim arc."""
    kind = rng.choice(["platelet", "speck", "rim"], p=[0.4, 0.35, 0.25])
    if kind == "platelet":
        cy, cx = _spot_centre(rng, geo, 0.2, 0.9)
        shape = _blob(geo, cy, cx, geo.scale * rng.uniform(0.09, 0.16))
        return _paint(rgb, rng.uniform(0.25, 0.5) * shape, PLATELET)
    if kind == "speck":
        cy, cx = _spot_centre(rng, geo, 0.0, 0.9)
        shape = _blob(geo, cy, cx, geo.scale * rng.uniform(0.02, 0.04))
        return _paint(rgb, rng.uniform(0.35, 0.75) * shape, SPECK)
    centre, span = rng.uniform(-np.pi, np.pi), rng.uniform(0.4, 1.2)
    cos_off = geo.cos_t * em.cos(centre) + geo.sin_t * em.sin(centre)  # cos(theta - centre)
    arc = cos_off > em.cos(span / 2)
    band = em.exp(-(((geo.rho - 0.9 * geo.edge) * geo.scale / 2.5) ** 2)) * arc
    return _paint(rgb, rng.uniform(0.15, 0.35) * band, CHROMATIN)


def render_cell(
    rng: np.random.Generator, style: PatientStyle, infected: bool, size: int | tuple[int, int]
) -> np.ndarray:
    """One segmented cell as an HxWx3 uint8 array on a black background.

    `size` is the side of a square crop or an (h, w) pair, since real crops are the cell's
    bounding box and rarely square. Confusers are drawn with the same probability whatever
    `infected` is, so only the chromatin carries the label.
    """
    h, w = _shape(size)
    geo = _geometry(rng, h, w)
    rgb = _body(rng, style, geo)
    if infected:
        rgb = _parasites(rng, style, geo, rgb)
    if rng.random() < style.confusers:
        for _ in range(int(rng.choice([1, 2], p=[0.7, 0.3]))):
            rgb = _confuser(rng, geo, rgb)
    rgb = rgb * style.brightness + rng.normal(0, style.noise, rgb.shape)
    rgb = rgb * geo.mask[..., None]
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    """PNG with no timestamp or text chunks and a fixed level, so bytes depend on pixels only."""
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@dataclass(frozen=True)
class _Cell:
    """One planned image: where it goes in the zip and what to draw."""

    name: str
    patient: int
    infected: bool
    shape: tuple[int, int]


def _n_healthy(cfg: SyntheticConfig) -> int:
    """Healthy patients, rounded half up, leaving at least one infected patient when possible."""
    n = int(np.floor(cfg.patients * cfg.healthy_patient_fraction + 0.5))
    return min(n, cfg.patients - 1) if cfg.patients > 1 else n


def _n_infected(rng: np.random.Generator, n: int, fraction: float) -> int:
    """Infected cells of an infected patient: never all, never none, so both classes appear."""
    k = int(rng.binomial(n, fraction))
    return int(np.clip(k, 1, n - 1)) if n >= 2 else 1


def _crop_shape(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    """Bounding-box sides of a cell: near square, both within [lo, hi]."""
    h = int(rng.integers(lo, hi + 1))
    w = int(np.clip(round(h * float(np.exp(rng.normal(0, 0.08)))), lo, hi))
    return h, w


def _patient_cells(
    rng: np.random.Generator, cfg: SyntheticConfig, index: int, pid: int, healthy: bool
) -> list[_Cell]:
    """A patient's cells, spread over 1-3 fields of view named like the NIH camera files."""
    n = int(rng.integers(cfg.cells_per_patient[0], cfg.cells_per_patient[1] + 1))
    k_inf = 0 if healthy else _n_infected(rng, n, cfg.infected_cell_fraction)
    infected = rng.permutation(np.arange(n) < k_inf)
    fields = int(min(n, rng.integers(1, 4)))
    field_of = np.sort(rng.integers(0, fields, n))
    slide = int(rng.integers(1, 250))
    day = f"2015{int(rng.integers(6, 10)):02d}{int(rng.integers(1, 29)):02d}"
    seconds = np.sort(rng.choice(9 * 3600, fields, replace=False)) + 9 * 3600
    cells = []
    for j in range(n):
        t = int(seconds[field_of[j]])
        stamp = f"{t // 3600:02d}{t % 3600 // 60:02d}{t % 60:02d}"
        name = f"C{pid}P{slide}thinF_IMG_{day}_{stamp}_cell_{j + 1}.png"
        shape = _crop_shape(rng, *cfg.size_range)
        cells.append(_Cell(name, index, bool(infected[j]), shape))
    return cells


def _plan(
    cfg: SyntheticConfig, seed: int
) -> tuple[list[np.random.SeedSequence], list[PatientStyle], list[_Cell], int]:
    """Decide every patient, style and file name before drawing a pixel.

    Each patient has its own child seed, so the pixels of one patient do not shift when
    another patient gets more cells.
    """
    root = np.random.SeedSequence(seed)
    plan_seed, *patient_seeds = root.spawn(cfg.patients + 1)
    rng = np.random.default_rng(plan_seed)
    pids = np.sort(rng.choice(np.arange(1, max(1000, 4 * cfg.patients)), cfg.patients, False))
    n_healthy = _n_healthy(cfg)
    healthy = rng.permutation(np.arange(cfg.patients) < n_healthy)
    styles, cells = [], []
    for i, ss in enumerate(patient_seeds):
        prng = np.random.default_rng(ss)
        styles.append(PatientStyle.sample(prng, cfg.confuser_fraction))
        cells += _patient_cells(prng, cfg, i, int(pids[i]), bool(healthy[i]))
    return patient_seeds, styles, cells, n_healthy


def _member(cell: _Cell) -> str:
    return f"{ROOT}/{CLASSES[0] if cell.infected else CLASSES[1]}/{cell.name}"


def _entries(
    seeds: list[np.random.SeedSequence],
    styles: list[PatientStyle],
    cells: list[_Cell],
) -> Iterator[tuple[str, bytes]]:
    """Folders, then cells rendered in sorted member order: one image in memory at a time."""
    pixel_rngs = [np.random.default_rng(ss.spawn(1)[0]) for ss in seeds]
    for name in (f"{ROOT}/", *(f"{ROOT}/{c}/" for c in CLASSES)):
        yield name, b""
    for cell in sorted(cells, key=_member):
        p = cell.patient
        yield (
            _member(cell),
            png_bytes(render_cell(pixel_rngs[p], styles[p], cell.infected, cell.shape)),
        )


def generate(dest: Path, cfg: SyntheticConfig, seed: int) -> dict:
    """Write the whole dataset as one zip at `dest`, atomically, and summarise it.

    Same `cfg` and `seed` give a byte-identical file, so DVC sees no change on a re-run.
    Returns {"images", "patients", "per_class": {class: n}, "healthy_patients"}.
    """
    seeds, styles, cells, n_healthy = _plan(cfg, seed)
    with atomic_path(dest) as tmp:
        write_zip(tmp, _entries(seeds, styles, cells))
    n_infected = sum(c.infected for c in cells)
    return {
        "images": len(cells),
        "patients": cfg.patients,
        "per_class": {CLASSES[0]: n_infected, CLASSES[1]: len(cells) - n_infected},
        "healthy_patients": n_healthy,
    }
