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
`medimg.monitoring.drift.check_window` with params.yaml's default thresholds; the table gives the
share flagged, and per shift the smallest window size where >= 95% of windows are flagged.
Clean windows' flagged share is the false-alarm rate. Skips (exit 0) when the data is absent.

With `--model M.keras --split S/split.parquet` (a model trained on the dev zip by the pipeline,
and its split), the bench watches *that* model as `medimg monitor` does: the reference is the
one evaluate stores (`medimg.monitoring.reference.with_model_outputs`: properties and the
penultimate-layer embedding's principal components over the model's train sample + val
cells, served probabilities over val), windows come from its *test* patients only (never
seen in training or threshold choice), and `medimg.monitoring.drift.check_window` judges
all three groups with params.yaml's default thresholds; the table then says which group
caught each shift.

    python bench/monitor.py --model /path/repo/models/compact_cnn/model.keras \
                            --split /path/repo/data/split/split.parquet
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

from medimg.config import NIH_PATIENT_REGEX, DriftConfig, ReferenceConfig
from medimg.data.properties import properties_table
from medimg.monitoring.drift import check_window
from medimg.monitoring.reference import (
    probability_columns,
    project,
    reference_from_table,
    with_model_outputs,
)

SIZES = (25, 50, 100, 200, 500)
SHARED = Path("/work/shared/data")


def read_cells(path: Path, names: list[str] | None = None) -> tuple[list[Image.Image], list[str]]:
    """Every PNG cell of the NIH zip, decoded to RGB, with its patient id (and, when `names`
    is a list, each cell's path in the zip appended to it)."""
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
            if names is not None:
                names.append(name)
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


def hue_rotation(degrees: float) -> Callable[[Image.Image], Image.Image]:
    """Hue rotated by `degrees`: another stain batch or white balance."""
    step = round(degrees * 256 / 360)

    def shift(img: Image.Image) -> Image.Image:
        h, s, v = img.convert("HSV").split()
        h = h.point(lambda x: (x + step) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    return shift


hue_shift = hue_rotation(20)


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
    "hue +40°": hue_rotation(40),
    "JPEG q=30": jpeg30,
    "grayscale as RGB": grayscale,
}


# ------------------------------------------------------------------- watching a real model


class Watched:
    """A trained model as the served one runs it: resize as serving does, one forward pass
    for probabilities and embedding (`medimg.scoring.probabilities` on the two-output model)."""

    def __init__(self, path: Path) -> None:
        from medimg.models.loading import load_model, with_embedding
        from medimg.scoring import model_size

        model = load_model(path)
        self.size = model_size(model)
        self.feature_model = with_embedding(model)
        self.classes = ["Uninfected", "Parasitized"]

    def outputs(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        from medimg.data.images import resize_batch
        from medimg.scoring import probabilities

        probs, feats = [], []
        for i in range(0, len(images), 256):
            x = resize_batch([np.asarray(im) for im in images[i : i + 256]], self.size)
            sink: list[np.ndarray] = []
            probs.append(probabilities(self.feature_model, x, embeddings=sink))
            feats.append(np.concatenate(sink))
        return np.concatenate(probs), np.concatenate(feats)


def model_reference(
    watched: Watched, images: list[Image.Image], splits: list[str], seed: int
) -> dict:
    """What evaluate stores: properties + embedding PCA over a train sample and all of val,
    predictions over val (at 0.5: the decided-class share is not what is judged here)."""
    cfg = ReferenceConfig()
    rng = np.random.default_rng(seed)
    train = [i for i, s in enumerate(splits) if s == "train"]
    val = [i for i, s in enumerate(splits) if s == "val"]
    picks = sorted(rng.choice(train, size=min(cfg.images, len(train)), replace=False).tolist())
    chosen = [images[i] for i in picks + val]
    probs, feats = watched.outputs(chosen)
    p_val = probs[len(picks) :]
    decided = [watched.classes[int(p >= 0.5)] for p in p_val]
    return with_model_outputs(
        reference_from_table(properties_table(chosen)),
        features=feats,
        components=cfg.embedding_components,
        probs=p_val,
        decisions=decided,
        classes=watched.classes,
        seed=seed,
    )


def model_table(watched: Watched, reference: dict, images: list[Image.Image]) -> dict:
    """Every column a served request logs: properties, emb_i, p_<class>."""
    probs, feats = watched.outputs(images)
    table = dict(properties_table(images))
    table |= project(reference["embedding"], feats)
    return table | probability_columns(probs, watched.classes)


def check_rate(
    reference: dict, table: dict[str, np.ndarray], size: int, windows: int, rng
) -> tuple[float, dict[str, int]]:
    """Share of `windows` random windows of `size` requests that `check_window` flags (all
    groups the reference has, params' default thresholds), and how often each group (or
    'OOD', the out-of-distribution share) was named."""
    cfg = DriftConfig()
    floors = {
        "properties": cfg.min_statistic,
        "embedding": cfg.embedding_min_statistic,
        "predictions": cfg.prediction_min_statistic,
    }
    n = len(next(iter(table.values())))
    flagged, named = 0, {}
    for _ in range(windows):
        idx = rng.choice(n, size=size, replace=size > n)
        result = check_window(
            reference,
            {k: v[idx] for k, v in table.items()},
            alpha=cfg.alpha,
            min_statistic=floors,
            tolerance=cfg.ood_tolerance,
            max_ood_share=cfg.max_ood_share,
            min_requests=cfg.min_requests,
        )
        flagged += result["drifted"]
        hits = {r.split("/")[0] if "/" in r.split(":")[0] else "OOD" for r in result["reasons"]}
        for name in hits:
            named[name] = named.get(name, 0) + 1
    return flagged / windows, named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=SHARED / "malaria/cell_images_dev.zip")
    parser.add_argument("--oct", type=Path, default=SHARED / "oct/OCT2017_sample.tar.gz")
    parser.add_argument("--reference-patients", type=int, default=100)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="a .keras model to watch")
    parser.add_argument("--split", type=Path, default=None, help="its split.parquet")
    args = parser.parse_args(argv)
    if not args.zip.exists():
        print(f"skip: {args.zip} not found")
        return 0
    if (args.model is None) != (args.split is None):
        parser.error("--model and --split go together")
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    names: list[str] = []
    images, patients = read_cells(args.zip, names)
    unique = sorted(set(patients))
    if args.model is not None:
        import pandas as pd

        split_of = dict(pd.read_parquet(args.split, columns=["path", "split"]).values)
        splits = [split_of.get(n, "") for n in names]
        watched = Watched(args.model)
        reference = model_reference(watched, images, splits, args.seed)
        unseen = [img for img, s in zip(images, splits, strict=True) if s == "test"]
        labels = np.array(
            [int("/Parasitized/" in n) for n, s in zip(names, splits, strict=True) if s == "test"]
        )
        table_of = lambda imgs: model_table(watched, reference, imgs)  # noqa: E731
        n_ref = reference["n"]
        ref_desc = f"the model's train sample + val ({n_ref} cells)"
        test_patients = {p for p, s in zip(patients, splits, strict=True) if s == "test"}
        unseen_desc = f"its test split, {len(test_patients)} patients"
    else:
        labels = None
        ref_patients = set(
            rng.choice(unique, size=min(args.reference_patients, len(unique) - 1), replace=False)
        )
        ref_idx = [i for i, p in enumerate(patients) if p in ref_patients]
        unseen = [images[i] for i, p in enumerate(patients) if p not in ref_patients]
        reference = reference_from_table(properties_table(images[i] for i in ref_idx))
        table_of = properties_table
        ref_desc = f"{len(ref_idx)} cells of {len(ref_patients)} patients"
        unseen_desc = f"{len(unique) - len(ref_patients)} patients"
    print(
        f"{len(images)} cells, {len(unique)} patients: reference {ref_desc}; "
        f"unseen {len(unseen)} cells of {unseen_desc}"
    )
    tables = {"clean (false alarms)": table_of(unseen)}
    for name, shift in SHIFTS.items():
        tables[name] = table_of([shift(img) for img in unseen])
    if args.oct.exists():
        tables["OCT tiles"] = table_of(read_oct_tiles(args.oct, 500, rng))
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
        + (" model's accuracy / sensitivity at 0.5 |" if labels is not None else "")
    )
    print("|---|" + "---|" * (len(SIZES) + 2 + (labels is not None)))
    for name, table in tables.items():
        rates, named = [], {}
        for size in SIZES:
            rate, counts = check_rate(reference, table, size, args.windows, rng)
            rates.append(rate)
            for key, count in counts.items():
                named[key] = named.get(key, 0) + count
        tops = sorted(named, key=lambda k: -named[k])[:3]
        smallest = next((str(s) for s, r in zip(SIZES, rates, strict=True) if r >= 0.95), "—")
        if name.startswith("clean"):
            smallest = "n/a"
        cells = " | ".join(f"{r:.0%}" for r in rates)
        harm = ""
        if labels is not None:  # what the shift does to the watched model (OCT: no labels)
            harm = " — |"
            if len(table["p_Parasitized"]) == len(labels):
                pred = (table["p_Parasitized"] >= 0.5).astype(int)
                harm = f" {(pred == labels).mean():.3f} / {pred[labels == 1].mean():.3f} |"
        print(f"| {name} | {cells} | {smallest} | {', '.join(tops) or '—'} |{harm}")
    if args.model is not None:  # how far each group moved, on every unseen cell at once
        from medimg.monitoring.drift import property_drift, reference_group

        groups = ("properties", "embedding", "predictions")
        print(
            "\n| condition (all cells) | " + " | ".join(f"largest KS: {g}" for g in groups) + " |"
        )
        print("|---|" + "---|" * len(groups))
        for name, table in tables.items():
            cells = []
            for group in groups:
                ref = reference_group(reference, group)
                rows = property_drift(ref, {k: table[k] for k in ref["properties"] if k in table})
                top = max(rows, key=lambda k: rows[k]["statistic"])
                cells.append(f"{rows[top]['statistic']:.3f} ({top})")
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{args.windows} windows per cell; {time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
