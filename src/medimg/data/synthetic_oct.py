"""An offline, deterministic stand-in for the OCT2017 retina archive (Kermany et al. 2018).

A fresh clone, CI or a test must run the OCT path without the 5 GB download, so grayscale
B-scans are drawn here and named like the real set (`OCT2017/<CLASS>/<CLASS>-<PATIENT>-<N>.jpeg`,
one class per patient): patient parsing, JPEG validation and 4-class training then run the
same code as for real data. A scan is a stack of curved layers built up from Bruch's membrane
(choroid, RPE, photoreceptors, inner retina with a foveal pit, dark vitreous) under speckle;
classes differ by what their pathology does to that stack: NORMAL none; DME a thickened
retina with dark cystoid spaces (and exudates); CNV a bright mottled sub-RPE bulge lifting the
retina, often with subretinal fluid and a shadow; DRUSEN small dome-shaped RPE elevations.

Same bytes on every CPU: the transcendental functions are `medimg.data.exactmath`'s and the
noise upsampling is two-tap interpolation written out, not a BLAS product (numpy's SIMD
variants and BLAS kernels round differently per CPU).

Honest rather than easy: device and eye looks are drawn per patient by one law for all
classes, faint or off-fovea lesions occur (`mild_fraction`), and class-free look-alikes
(vessel shadows, RPE waviness, hyaloid lines, white registration wedges) appear everywhere.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from medimg.config import OctSyntheticConfig
from medimg.data import exactmath as em
from medimg.data.packing import write_zip
from medimg.io import atomic_path

Rng = np.random.Generator
CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
ROOT = "OCT2017"
REF_HEIGHT = 496  # geometry is designed in pixels of a real 496-row scan, then scaled
LUT_RES = 48  # lookup entries per layer segment

# Inner retina from ILM (0) to ELM (1): RNFL, GCL, IPL, INL, OPL, ONL, ELM reflectivities.
INNER_D = np.array([0.0, 0.08, 0.14, 0.24, 0.3, 0.38, 0.44, 0.5, 0.55, 0.6, 0.66, 0.95, 1.0])
INNER_V = np.array([0.5, 0.44, 0.28, 0.26, 0.36, 0.34, 0.15, 0.14, 0.36, 0.32, 0.1, 0.1, 0.26])
# Rounded to 6 decimals: a last-bit difference of the platform's libm cannot reach a level.
NORMAL_LEVELS = np.array(
    [round(NormalDist().inv_cdf((k + 0.5) / 256), 6) for k in range(256)], np.float32
)


def _law(lo: float, hi: float) -> Any:
    """A ScanStyle field drawn uniformly from [lo, hi] for every patient."""
    return field(metadata={"law": (lo, hi)})


@dataclass(frozen=True)
class ScanStyle:
    """One patient's device, eye shape and (if ill) disease extent, drawn by one law for all
    classes: it identifies a patient (an image split leaks, as with real data), not a label."""

    gain: float = _law(0.8, 1.15)  # overall brightness
    gamma: float = _law(0.85, 1.3)  # contrast curve of the device export
    speckle: float = _law(0.25, 0.5)  # multiplicative speckle in tissue
    floor: float = _law(0.08, 0.13)  # background level of vitreous and fluid
    floor_noise: float = _law(0.015, 0.035)  # additive noise amplitude
    rolloff: float = _law(0.35, 0.65)  # signal lost from top to bottom row
    tilt: float = _law(-0.1, 0.1)  # rows per column of Bruch's membrane
    sag: float = _law(-10, 50)  # curvature: rows the line rises at the edges
    depth: float = _law(0.42, 0.6)  # row of Bruch's membrane at the centre / height
    thickness: float = _law(48, 70)  # inner retina (ILM..ELM) px, off the fovea at 496 rows
    pit: float = _law(0.45, 0.75)  # fraction of that thickness missing at the fovea
    pit_width: float = _law(22, 40)  # foveal pit sigma, px
    contrast: float = _law(0.6, 1.2)  # how distinct the retinal layers are
    choroid: float = _law(0.35, 0.6)  # choroid reflectivity
    wedge: float = _law(-0.3, 0.4)  # chance of a white registration wedge (<= 0: never)
    severity: float = _law(0.6, 1.0)  # disease extent for a diseased patient

    @classmethod
    def sample(cls, rng: Rng) -> ScanStyle:
        """Draw a patient look; the law does not depend on the class, so no leak."""
        return cls(**{f.name: float(rng.uniform(*f.metadata["law"])) for f in fields(cls)})


def _gauss(x: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    return em.exp(-0.5 * ((x - centre) / sigma) ** 2).astype(np.float32)


def _lerp_axis(grid: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of `grid` along `axis` to n_out samples, end points kept: two
    taps per output written out (a BLAS product would round differently per CPU)."""
    n_in = grid.shape[axis]
    pos = np.linspace(0, n_in - 1, n_out, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), n_in - 2)
    frac = pos - i0
    a, b = np.take(grid, i0, axis=axis), np.take(grid, i0 + 1, axis=axis)
    shape = [1, 1]
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return a + frac * (b - a)


def _smooth_noise(rng: Rng, h: int, w: int, gh: int, gw: int) -> np.ndarray:
    """Zero-mean noise with an h/gh x w/gw grain: a random grid linearly upsampled, ~10x
    cheaper than an image resize, which matters at 100+ scans a second."""
    grid = rng.standard_normal((max(2, gh), max(2, gw)), dtype=np.float32)
    return _lerp_axis(_lerp_axis(grid, h, 0), w, 1)


def _speckle(rng: Rng, h: int, w: int) -> np.ndarray:
    """Standard normal noise from random bytes via an inverse-CDF table: ~10x faster than
    `standard_normal`, and 256 levels are plenty for an 8-bit result."""
    half = (w + 1) // 2  # grain two pixels wide: OCT speckle is elongated laterally
    raw = np.frombuffer(rng.bytes(h * half), dtype=np.uint8).reshape(h, half)
    return np.repeat(np.take(NORMAL_LEVELS, raw), 2, axis=1)[:, :w]


@dataclass
class _Scan:
    """Per-column boundaries (rows) plus the canvas; lesions edit them before the layers."""

    x: np.ndarray  # column coordinates
    s: float  # pixel scale relative to a 496-row scan
    fovea: float  # column of the foveal centre
    bruch: np.ndarray  # Bruch's membrane
    thick: np.ndarray  # inner retina thickness
    sub: np.ndarray  # sub-RPE material (drusen, CNV) lifting the RPE
    fluid: np.ndarray  # subretinal fluid between photoreceptors and RPE
    sub_level: float = 0.45  # reflectivity of the sub-RPE material
    spots: list = field(default_factory=list)  # (col, depth 0 ILM..1 ELM, ry, rx, value)
    lesion: tuple | None = None  # CNV (centre col, half width): mottled, casts a shadow


def _base(rng: Rng, style: ScanStyle, w: int, h: int) -> _Scan:
    """Eye shape of one scan: the patient's curve, jittered; off-fovea scans lose the pit."""
    s = h / REF_HEIGHT
    x = np.arange(w, dtype=np.float32)
    u = (x - w / 2) / (w / 2)
    tilt = style.tilt + rng.normal(0, 0.02)
    line = h * (style.depth + rng.normal(0, 0.03)) + tilt * (x - w / 2) - style.sag * s * u**2
    for k in (1, 2, 3):  # natural waviness of the eye wall, present in every class
        line += rng.uniform(0, 3 * s / k) * em.sin(k * np.pi * u + rng.uniform(0, 2 * np.pi))
    fovea = w / 2 + rng.normal(0, 0.08 * w)
    pit = style.pit * (1.0 if rng.random() < 0.7 else rng.uniform(0.0, 0.5))
    thick = style.thickness * s * (1 - pit * _gauss(x, fovea, style.pit_width * s))
    thick *= 1 + 0.1 * u * rng.normal(0, 1)  # nasal/temporal asymmetry
    zero = np.zeros(w, np.float32)
    return _Scan(x, s, float(fovea), line.astype(np.float32), thick, zero, zero.copy())


def _cyst(rng: Rng, sc: _Scan, cx: float, depth: float, size: float) -> None:
    """Plan a dark fluid space sized to fit the local retina."""
    ry = max(3.0, size * rng.uniform(0.2, 0.42) * sc.thick[int(np.clip(cx, 0, len(sc.x) - 1))])
    sc.spots.append((cx, depth, ry, ry * rng.uniform(0.8, 2.0), 0.0))


def _dme(rng: Rng, sc: _Scan, sev: float) -> None:
    """Thicken around the fovea, 1-8 cystoid spaces in the INL..ONL, maybe hard exudates."""
    sc.thick = sc.thick + sev * rng.uniform(35, 80) * sc.s * _gauss(sc.x, sc.fovea, 80 * sc.s)
    for _ in range(int(rng.integers(2, 4)) if sev < 0.4 else int(rng.integers(3, 10))):
        _cyst(rng, sc, sc.fovea + rng.normal(0, 60 * sc.s), rng.uniform(0.35, 0.85), sev)
    if rng.random() < 0.15:  # a little subretinal fluid under the fovea
        sc.fluid = sev * rng.uniform(4, 10) * sc.s * _gauss(sc.x, sc.fovea, 30 * sc.s)
    for _ in range(int(rng.integers(1, 6)) if rng.random() < 0.5 else 0):  # in the OPL
        r = rng.uniform(1.5, 3.5) * sc.s
        sc.spots.append((sc.fovea + rng.normal(0, 60 * sc.s), 0.58, r, 1.5 * r, 0.85))


def _cnv(rng: Rng, sc: _Scan, sev: float) -> None:
    """A lumpy sub-RPE lesion near the fovea; often subretinal fluid, sometimes a cyst."""
    cx, half = sc.fovea + rng.normal(0, 40 * sc.s), rng.uniform(55, 110) * sc.s
    height = sev * rng.uniform(28, 60) * sc.s
    for _ in range(int(rng.integers(1, 4))):
        off = rng.normal(0, half / 2)
        sc.sub = sc.sub + height * rng.uniform(0.5, 1) * _gauss(sc.x, cx + off, half / 2)
    sc.thick = sc.thick + 0.4 * height * _gauss(sc.x, cx, 1.5 * half)
    if rng.random() < 0.65:
        fx = cx + rng.choice([-1, 1]) * rng.uniform(0, 1.2) * half
        sc.fluid = sev * rng.uniform(6, 22) * sc.s * _gauss(sc.x, fx, rng.uniform(0.6, 1.2) * half)
    sc.sub_level = float(rng.uniform(0.6, 0.85))
    sc.lesion = (float(cx), float(half))
    if rng.random() < 0.3:
        _cyst(rng, sc, cx + rng.normal(0, half), rng.uniform(0.4, 0.8), 0.5 * sev)


def _drusen(rng: Rng, sc: _Scan, sev: float) -> None:
    """Small dome-shaped RPE elevations scattered around the fovea."""
    n = int(rng.integers(3, 6)) if sev < 0.4 else int(rng.integers(5, 13))
    for _ in range(n):
        cx = sc.fovea + rng.normal(0, 0.16 * len(sc.x))
        height = sev * rng.uniform(12, 28) * sc.s
        sc.sub = sc.sub + height * _gauss(sc.x, cx, rng.uniform(7, 16) * sc.s)
    sc.sub_level = float(rng.uniform(0.35, 0.55))


LESIONS = {"CNV": _cnv, "DME": _dme, "DRUSEN": _drusen, "NORMAL": lambda *_: None}


def _lut(rng: Rng, style: ScanStyle, sc: _Scan) -> tuple[np.ndarray, ...]:
    """Reflectivity, and texture strength, per layer coordinate: 0 vitreous, then LUT_RES
    entries each for inner retina, photoreceptors, fluid, RPE, sub-RPE material, choroid."""
    f = np.linspace(0, 1, LUT_RES, endpoint=False)
    inner = np.interp(f, INNER_D, INNER_V)
    inner = 0.25 + style.contrast * (inner - 0.25) * rng.uniform(0.9, 1.1)
    photo = 0.14 + 0.6 * em.exp(-(((f - 0.4) / 0.14) ** 2))  # the IS/OS line
    rpe, sub = 0 * f + rng.uniform(0.85, 1.0), 0 * f + sc.sub_level
    chor = style.choroid * em.exp(-2.5 * f) * (1 - 0.8 * f)
    lut = np.concatenate([[0.0], inner, photo, 0 * f, rpe, sub, chor, [0.0]]) + style.floor
    weight = np.full(lut.shape, 0.06)
    weight[1 + 5 * LUT_RES :] = 0.4  # the choroid's vessels and stroma
    return lut.astype(np.float32), weight.astype(np.float32)


def _layers(sc: _Scan, h: int) -> tuple[np.ndarray, int]:
    """Layer coordinate (in LUT entries, so int() indexes the table) of the tissue rows, and
    the first such row. A boundary only moves within a window of rows; rows below it just add
    a whole layer, which keeps this to a few passes over the band."""
    # Stacked up from Bruch's membrane: sub-RPE material, RPE, fluid, photoreceptors, retina.
    up = np.cumsum(np.broadcast_arrays(sc.sub, 6 * sc.s, sc.fluid, 9 * sc.s, sc.thick), axis=0)
    b = [*(sc.bruch - up[::-1]), sc.bruch, sc.bruch + 170 * sc.s]  # ILM ... choroid end
    top = int(np.clip(np.floor(b[0].min()) - 1, 0, h))
    n = int(np.clip(np.ceil(b[-1].max()) + 1, top, h)) - top
    y = np.arange(top, top + n, dtype=np.float32)[:, None]
    t = np.full((n, len(sc.x)), 0.999, np.float32)
    for lo, hi in itertools.pairwise(b):
        r0 = int(np.clip(np.floor(lo.min()) - top, 0, n))
        r1 = int(np.clip(np.ceil(hi.max()) - top + 1, r0, n))
        if r1 > r0:
            tmp = y[r0:r1] - lo
            tmp *= LUT_RES / np.maximum(hi - lo, 1e-3)
            np.clip(tmp, 0, LUT_RES, out=tmp)
            t[r0:r1] += tmp
        t[r1:] += LUT_RES
    return t, top


def _ellipse(img: np.ndarray, cy: float, cx: float, ry: float, rx: float, value: float) -> None:
    """Blend a soft-edged ellipse of `value` into `img` in place, touching only its box."""
    h, w = img.shape
    y0, y1 = max(0, int(cy - ry) - 1), min(h, int(cy + ry) + 2)
    x0, x1 = max(0, int(cx - rx) - 1), min(w, int(cx + rx) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
    m = np.clip((1 - yy**2 - xx**2) * min(rx, ry) * 0.7, 0, 1)
    box = img[y0:y1, x0:x1]
    box += m * (value - box)


def _spots(img: np.ndarray, sc: _Scan, floor: float) -> None:
    """Draw the planned cysts and exudates at their depth in the (final) inner retina."""
    for cx, depth, ry, rx, value in sc.spots:
        c = int(np.clip(cx, 0, len(sc.x) - 1))
        elm = sc.bruch[c] - sc.sub[c] - 6 * sc.s - sc.fluid[c] - 9 * sc.s
        _ellipse(img, float(elm - (1 - depth) * sc.thick[c]), cx, ry, rx, value + floor)


def _overlays(rng: Rng, img: np.ndarray, sc: _Scan, style: ScanStyle) -> None:
    """Class-free look-alikes: vessel shadows and a faint hyaloid line in the vitreous."""
    h, w = img.shape
    shade = np.ones(w, np.float32)
    for _ in range(int(rng.integers(0, 5))):
        shade *= 1 - rng.uniform(0.2, 0.5) * _gauss(sc.x, rng.uniform(0, w), rng.uniform(2, 5))
    img -= style.floor  # shadows darken tissue, not the background
    img *= shade
    img += style.floor
    if rng.random() < 0.25:
        x0 = int(rng.integers(0, w // 2))
        xs = np.arange(x0, min(w, x0 + int(rng.integers(w // 4, w))))
        lift = rng.uniform(15, 90) * sc.s + rng.uniform(-20, 20) * sc.s * np.sin(xs / w * np.pi)
        rows = (sc.bruch[xs] - sc.thick[xs] - 20 * sc.s - lift).astype(int)
        ok = (rows >= 0) & (rows < h)
        img[rows[ok], xs[ok]] += rng.uniform(0.15, 0.35)


def _wedge(rng: Rng, out: np.ndarray) -> None:
    """A white triangle along the top or bottom edge, left by registration rotation."""
    h, w = out.shape
    edge = rng.uniform(4, 30) * h / REF_HEIGHT * np.linspace(*rng.permutation([0.0, 1.0]), w)
    mask = np.arange(int(edge.max()) + 1)[:, None] < edge[None, :]
    (out if rng.random() < 0.5 else out[::-1])[: len(mask)][mask] = 255


def render_scan(
    rng: Rng, cls: str, style: ScanStyle, width: int, height: int, mild: bool = False
) -> np.ndarray:
    """One grayscale B-scan of class `cls`, height x width uint8. `mild` draws the lesion at a
    third of the patient's severity: like real slices at a lesion's edge, such scans keep a
    classifier from 100%."""
    if cls not in LESIONS:
        raise ValueError(f"unknown OCT class {cls!r}; expected one of {CLASSES}")
    sc = _base(rng, style, width, height)
    sev = style.severity * (rng.uniform(0.4, 0.6) if mild else rng.uniform(0.8, 1.1))
    LESIONS[cls](rng, sc, sev)
    img = _tissue(rng, sc, style, height)
    _spots(img, sc, style.floor)
    _overlays(rng, img, sc, style)
    return _finish(rng, img, style)


def _tissue(rng: Rng, sc: _Scan, style: ScanStyle, h: int) -> np.ndarray:
    """Layer reflectivities with smooth texture: mottled choroid, and a CNV lesion's look."""
    t, top = _layers(sc, h)
    lut, wlut = _lut(rng, style, sc)
    idx = t.astype(np.int32)
    band, amp = np.take(lut, idx), np.take(wlut, idx)
    amp *= _smooth_noise(rng, *band.shape, band.shape[0] // 10, len(sc.x) // 16)
    band *= amp + 1
    if sc.lesion:  # mottled RPE and lesion, and the shadow they cast on the choroid
        cx, half = sc.lesion
        x0, x1 = (int(np.clip(cx + k * 2 * half, 0, len(sc.x))) for k in (-1, 1))
        if x1 > x0:
            tl = t[:, x0:x1]
            mottle = 1 + 0.4 * _smooth_noise(rng, *tl.shape, tl.shape[0] // 6, (x1 - x0) // 6)
            shadow = 1 - 0.5 * sc.sub[x0:x1] / max(float(sc.sub.max()), 1e-3)
            tl = tl / LUT_RES  # in layers: 3-5 RPE and lesion, 5+ choroid
            band[:, x0:x1] *= np.where(tl > 5, shadow, np.where(tl > 3, mottle, 1))
    img = np.full((h, len(sc.x)), lut[0], np.float32)  # vitreous above, dark sclera below
    img[top:] = lut[-1]
    img[top : top + band.shape[0]] = band
    return img


def _finish(rng: Rng, img: np.ndarray, style: ScanStyle) -> np.ndarray:
    """Speckle, depth roll-off and the device's tone curve; in place, then to uint8."""
    amp = img * style.speckle + style.floor_noise
    img += amp * _speckle(rng, *img.shape)
    img *= (255 * (1 - style.rolloff * np.linspace(0, 1, len(img), dtype=np.float32)))[:, None]
    np.clip(img, 0, 255, out=img)
    levels = np.arange(256, dtype=np.float64) / 255
    curve = np.clip(255 * style.gain * em.power(levels, style.gamma), 0, 255).astype(np.uint8)
    out = np.take(curve, img.astype(np.uint8))
    if rng.random() < style.wedge:
        _wedge(rng, out)
    return out


def jpeg_bytes(img: np.ndarray, quality: int = 90) -> bytes:
    """Baseline grayscale JPEG, no EXIF or timestamp, so bytes depend on pixels only."""
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _Planned(NamedTuple):
    """One planned image: its zip member name, patient index, class and mild flag."""

    member: str
    patient: int
    cls: str
    mild: bool


def _plan(
    cfg: OctSyntheticConfig, seed: int
) -> tuple[list[Rng], list[ScanStyle], list[int], list[_Planned]]:
    """Decide every patient, class, look and file name before drawing a pixel. Classes go
    round-robin over shuffled patients (balanced to one patient); each patient has its own
    child seeds, so its pixels do not move when another patient gets more scans."""
    plan_ss, *patient_ss = np.random.SeedSequence(seed).spawn(cfg.patients + 1)
    rng = np.random.default_rng(plan_ss)
    pids = np.sort(rng.choice(9_000_000, cfg.patients, replace=False) + 1_000_000)
    classes = rng.permutation([CLASSES[i % len(CLASSES)] for i in range(cfg.patients)])
    pixel_rngs, styles, widths, scans = [], [], [], []
    for i, ss in enumerate(patient_ss):
        style_ss, pixel_ss = ss.spawn(2)
        prng = np.random.default_rng(style_ss)
        styles.append(ScanStyle.sample(prng))
        widths.append(int(prng.choice(cfg.width_choices)))
        pixel_rngs.append(np.random.default_rng(pixel_ss))
        lo, hi = cfg.images_per_patient
        cls = str(classes[i])
        for k in range(1, int(prng.integers(lo, hi + 1)) + 1):
            mild = cls != "NORMAL" and bool(prng.random() < cfg.mild_fraction)
            scans.append(_Planned(f"{ROOT}/{cls}/{cls}-{pids[i]}-{k}.jpeg", i, cls, mild))
    return pixel_rngs, styles, widths, scans


def _entries(
    cfg: OctSyntheticConfig,
    rngs: list[Rng],
    styles: list[ScanStyle],
    widths: list[int],
    scans: list[_Planned],
) -> Iterator[tuple[str, bytes]]:
    """Folders, then scans rendered and encoded in member order, one at a time."""
    for name in (f"{ROOT}/", *(f"{ROOT}/{c}/" for c in CLASSES)):
        yield name, b""
    for scan in sorted(scans):
        p = scan.patient
        img = render_scan(rngs[p], scan.cls, styles[p], widths[p], cfg.height, scan.mild)
        yield scan.member, jpeg_bytes(img, cfg.jpeg_quality)


def generate(dest: Path, cfg: OctSyntheticConfig, seed: int) -> dict:
    """Write the whole dataset as one zip at `dest`, atomically, and summarise it.

    Images are rendered, encoded and stored one at a time, so memory does not grow with the
    dataset; the same `cfg` and `seed` give a byte-identical file, so DVC sees no change on a
    re-run. Returns {"images", "patients", "per_class", "patients_per_class", "bytes"}.
    """
    rngs, styles, widths, scans = _plan(cfg, seed)
    with atomic_path(dest) as tmp:
        write_zip(tmp, _entries(cfg, rngs, styles, widths, scans))
        size = tmp.stat().st_size
    return {
        "images": len(scans),
        "patients": cfg.patients,
        "per_class": {c: sum(s.cls == c for s in scans) for c in CLASSES},
        "patients_per_class": {c: len({s.patient for s in scans if s.cls == c}) for c in CLASSES},
        "mild_images": sum(s.mild for s in scans),
        "bytes": size,
    }
