"""How many requests does property drift need to notice a shift, and how often does it cry wolf?

    python bench/monitor.py [--zip /work/shared/data/malaria/cell_images_dev.zip]
                            [--oct /work/shared/data/oct/OCT2017_sample.tar.gz]
                            [--reference-patients 100] [--windows 20] [--seed 0]

Real NIH cells, split by patient (the patient from the file name, `C33P1thinF_...` → C33):
the reference (`medimg.monitoring.reference`) is built from the cells of
`--reference-patients` random patients; windows of requests are drawn from the *other*
patients' cells (uniformly over cells), either clean or shifted (gamma-darker, Gaussian blur,
hue rotation, JPEG quality 30, grayscale as RGB) or replaced by OCT B-scans cut into
cell-sized tiles (so size does not give them away: only colour and texture can). For each
condition and window size, `--windows` random windows go through
`medimg.monitoring.drift.window_drift` with its default thresholds; the table gives the
share flagged, and per shift the smallest window size where >= 95% of windows are flagged.
Clean windows' flagged share is the false-alarm rate. Skips (exit 0) when the data is absent.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from medimg.config import NIH_PATIENT_REGEX
from medimg.data.properties import PROPERTIES, properties_table
from medimg.monitoring.drift import window_drift
from medimg.monitoring.reference import reference_from_table

SIZES = (25, 50, 100, 200, 500)
SHARED = Path("/work/shared/data")


def read_cells(path: Path) -> tuple[list[Image.Image], list[str]]:
    """Every PNG cell of the NIH zip, decoded to RGB, with its patient id."""
    pattern = re.compile(NIH_PATIENT_REGEX)
    images, patients = [], []
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not name.lower().endswith(".png"):
                continue
            match = pattern.search(Path(name).name)
            if match is None:
                continue
            with Image.open(io.BytesIO(z.read(name))) as img:
                images.append(img.convert("RGB"))
            patients.append(match.group(1))
    return images, patients


def read_oct_tiles(path: Path, n_tiles: int, rng: np.random.Generator) -> list[Image.Image]:
    """`n_tiles` random cell-sized crops (100..160 px) of the OCT scans, as RGB (a client
    sending a grey scan to the colour model: PIL decodes JPEG grey and we convert)."""
    scans = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.lower().endswith((".jpeg", ".jpg", ".png")):
                f = tar.extractfile(member)
                if f is not None:
                    with Image.open(io.BytesIO(f.read())) as img:
                        scans.append(img.convert("RGB"))
    tiles = []
    for _ in range(n_tiles):
        scan = scans[int(rng.integers(len(scans)))]
        side = int(rng.integers(100, 161))
        x = int(rng.integers(0, scan.width - side + 1))
        y = int(rng.integers(0, scan.height - side + 1))
        tiles.append(scan.crop((x, y, x + side, y + side)))
    return tiles


def gamma_darker(img: Image.Image) -> Image.Image:
    """Gamma 1.5: an under-exposed smear (midtones darker, black stays black)."""
    lut = [round(255 * (i / 255) ** 1.5) for i in range(256)] * 3
    return img.point(lut)


def blur(img: Image.Image) -> Image.Image:
    """Gaussian blur, radius 1.5 px: a defocused microscope."""
    return img.filter(ImageFilter.GaussianBlur(1.5))


def hue_shift(img: Image.Image) -> Image.Image:
    """Hue rotated by 20 degrees: another stain batch or white balance."""
    h, s, v = img.convert("HSV").split()
    h = h.point(lambda x: (x + 14) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def jpeg30(img: Image.Image) -> Image.Image:
    """JPEG recompression at quality 30: a phone app or PACS export."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=30)
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        return out.convert("RGB")


def grayscale(img: Image.Image) -> Image.Image:
    """Grayscale sent as RGB: a monochrome camera."""
    return img.convert("L").convert("RGB")


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "gamma 1.5 (darker)": gamma_darker,
    "blur (Gaussian r=1.5)": blur,
    "hue +20°": hue_shift,
    "JPEG q=30": jpeg30,
    "grayscale as RGB": grayscale,
}


def subset(table: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {name: table[name][idx] for name in PROPERTIES}


def flag_rate(
    reference: dict, table: dict[str, np.ndarray], size: int, windows: int, rng
) -> tuple[float, dict[str, int]]:
    """Share of `windows` random windows of `size` requests flagged, and how often each
    property (or 'OOD', the out-of-distribution share) was named."""
    n = len(table[PROPERTIES[0]])
    flagged, named = 0, {}
    for _ in range(windows):
        idx = rng.choice(n, size=size, replace=size > n)
        result = window_drift(reference, subset(table, idx))
        flagged += result["drifted"]
        for name in result["drifted_properties"] + (["OOD"] if result["ood_flagged"] else []):
            named[name] = named.get(name, 0) + 1
    return flagged / windows, named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=SHARED / "malaria/cell_images_dev.zip")
    parser.add_argument("--oct", type=Path, default=SHARED / "oct/OCT2017_sample.tar.gz")
    parser.add_argument("--reference-patients", type=int, default=100)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.zip.exists():
        print(f"skip: {args.zip} not found")
        return 0
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    images, patients = read_cells(args.zip)
    unique = sorted(set(patients))
    ref_patients = set(
        rng.choice(unique, size=min(args.reference_patients, len(unique) - 1), replace=False)
    )
    ref_idx = [i for i, p in enumerate(patients) if p in ref_patients]
    unseen = [images[i] for i, p in enumerate(patients) if p not in ref_patients]
    reference = reference_from_table(properties_table(images[i] for i in ref_idx))
    print(
        f"{len(images)} cells, {len(unique)} patients: reference {len(ref_idx)} cells of "
        f"{len(ref_patients)} patients; unseen {len(unseen)} cells of "
        f"{len(unique) - len(ref_patients)} patients"
    )
    tables = {"clean (false alarms)": properties_table(unseen)}
    for name, shift in SHIFTS.items():
        tables[name] = properties_table(shift(img) for img in unseen)
    if args.oct.exists():
        tables["OCT tiles"] = properties_table(read_oct_tiles(args.oct, 500, rng))
    else:
        print(f"no OCT sample at {args.oct}: OCT row skipped")
    print(
        f"properties of {sum(len(t['size']) for t in tables.values())} images: "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print(
        "| condition | "
        + " | ".join(f"n={s}" for s in SIZES)
        + " | smallest n with >= 95% flagged | flagged by |"
    )
    print("|---|" + "---|" * (len(SIZES) + 2))
    for name, table in tables.items():
        rates, named = [], {}
        for size in SIZES:
            rate, counts = flag_rate(reference, table, size, args.windows, rng)
            rates.append(rate)
            for key, count in counts.items():
                named[key] = named.get(key, 0) + count
        tops = sorted(named, key=lambda k: -named[k])[:3]
        smallest = next((str(s) for s, r in zip(SIZES, rates, strict=True) if r >= 0.95), "—")
        if name.startswith("clean"):
            smallest = "n/a"
        cells = " | ".join(f"{r:.0%}" for r in rates)
        print(f"| {name} | {cells} | {smallest} | {', '.join(tops) or '—'} |")
    print(f"\n{args.windows} windows per cell; {time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
