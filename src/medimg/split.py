"""The `split` stage: train/val/test by patient, written as TFRecord shards.

A model tested on cells of patients it was trained on looks better than it is: cells of one
patient share stain, illumination and parasite stage. So the default split is by patient
(a stratified *group* split), and identical images are tied together too, so a duplicate can
never sit on both sides. `strategy: image` reproduces the seeds' cell-level split for
comparison; `strategy: predefined` honours folders such as OCT2017's `train/` and `test/`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from medimg.config import Params, SplitConfig
from medimg.data.archive import open_zip
from medimg.errors import DataError
from medimg.io import atomic_dir, write_json

SPLITS = ("train", "val", "test")


def tie_groups(keys: pd.Series, sha256: pd.Series) -> np.ndarray:
    """Merge groups that share an identical image (union-find over key and sha256).

    Returns one integer group id per row: rows of the same key, or with the same image
    bytes as a row of another key, end up in one group and so in one split.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for key, digest in zip(keys.astype(str), sha256.astype(str), strict=True):
        ra, rb = find("k:" + key), find("s:" + digest)
        if ra != rb:
            parent[ra] = rb
    roots = [find("k:" + k) for k in keys.astype(str)]
    return pd.factorize(pd.Series(roots))[0]


def _one_fold(
    labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split off ~`fraction` of the rows as whole groups, keeping class ratios close."""
    n_groups = len(np.unique(groups))
    smallest_class = np.bincount(labels).min(initial=len(labels), where=np.bincount(labels) > 0)
    # Tiny sets (e.g. 8 images a class) cannot have more folds than a class has members: the
    # held-out share then rounds up (1/6 instead of 1/8), never a patient split in two.
    n_splits = max(2, min(round(1.0 / fraction), n_groups, smallest_class))
    if n_groups < 2:
        raise DataError(f"cannot split {len(labels)} images of a single patient/group")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = next(folds.split(np.zeros(len(labels)), labels, groups))
    return rest, held


def assign_splits(frame: pd.DataFrame, cfg: SplitConfig, seed: int) -> pd.Series:
    """Pure: one of train/val/test per row of a manifest with `label`, `patient`, `sha256`."""
    if cfg.strategy == "predefined":
        return _predefined(frame, cfg, seed)
    key = frame["patient"] if cfg.strategy == "patient" else frame["path"]
    groups = tie_groups(key, frame["sha256"])
    return _group_split(frame["label"].to_numpy(), groups, cfg, seed)


def _group_split(labels: np.ndarray, groups: np.ndarray, cfg: SplitConfig, seed: int) -> pd.Series:
    fr = cfg.fractions
    out = np.array(["train"] * len(labels), dtype=object)
    rest, test = _one_fold(labels, groups, fr.test, seed)
    out[test] = "test"
    if fr.val > 0:
        val_share = fr.val / (fr.train + fr.val)
        _, sub_val = _one_fold(labels[rest], groups[rest], val_share, seed + 1)
        out[rest[sub_val]] = "val"
    return pd.Series(out)


def _predefined(frame: pd.DataFrame, cfg: SplitConfig, seed: int) -> pd.Series:
    """Folders named in `split.predefined_folders`; a missing val is carved out of train."""
    folder_to_split = {folder: split for split, folder in cfg.predefined_folders.items()}
    out = frame["split_folder"].map(folder_to_split)
    if out.isna().any():
        bad = frame.loc[out.isna(), "path"].iloc[0]
        raise DataError(
            f"split.strategy predefined: {bad} is in no folder of split.predefined_folders"
        )
    missing = {"train", "test"} - set(out)
    if missing:
        raise DataError(f"split.strategy predefined: no images in the {sorted(missing)} folder(s)")
    if "val" not in set(out) and cfg.fractions.val > 0:
        train = np.flatnonzero(out == "train")
        sub = frame.iloc[train]
        groups = tie_groups(sub["patient"], sub["sha256"])
        share = cfg.fractions.val / (cfg.fractions.train + cfg.fractions.val)
        _, val = _one_fold(sub["label"].to_numpy(), groups, share, seed)
        out.iloc[train[val]] = "val"
    return out.reset_index(drop=True)


def check_disjoint(frame: pd.DataFrame, column: str) -> None:
    """Raise if any value of `column` (patient or sha256) appears in two splits."""
    per_value = frame.groupby(column)["split"].nunique()
    leaked = per_value[per_value > 1]
    if len(leaked):
        raise DataError(
            f"split leak: {len(leaked)} {column} value(s) in more than one split, "
            f"e.g. {leaked.index[0]!r}"
        )


def label_frame(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Keep the valid rows and add the integer label (position in `validate.classes`)."""
    ok = manifest[manifest["status"] == "ok"].copy()
    unknown = sorted(set(ok["class"]) - set(classes))
    if unknown:
        raise DataError(f"manifest has classes {unknown} not in validate.classes")
    ok["label"] = ok["class"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    ok["patient"] = ok["patient"].fillna(ok["path"])
    return ok.sort_values("path").reset_index(drop=True)


def fingerprint(frame: pd.DataFrame) -> str:
    """A short id of exactly which images went where; MLflow runs are tagged with it."""
    rows = frame[["path", "sha256", "split"]].sort_values("path").to_csv(index=False)
    return hashlib.sha256(rows.encode()).hexdigest()[:16]


def summarise(frame: pd.DataFrame, classes: list[str], fp: str) -> dict:
    counts = {
        s: {c: int(((frame["split"] == s) & (frame["class"] == c)).sum()) for c in classes}
        for s in SPLITS
    }
    patients = {s: int(frame.loc[frame["split"] == s, "patient"].nunique()) for s in SPLITS}
    return {
        "classes": classes,
        "num_classes": len(classes),
        "positive_class": classes[-1] if len(classes) == 2 else None,
        "counts": counts,
        "patients": patients,
        "images": {s: int((frame["split"] == s).sum()) for s in SPLITS},
        "fingerprint": fp,
    }


def run(params: Params) -> dict:
    """Split the validated manifest and write split.parquet, classes.json and the shards."""
    from medimg.data.shards import write_shards  # TensorFlow is imported only where shards are made

    paths = params.paths
    manifest_path = paths.manifest
    if not manifest_path.exists():
        raise DataError(f"{manifest_path}: no manifest; run the validate stage first")
    classes = list(params.validate_cfg.classes)
    frame = label_frame(pd.read_parquet(manifest_path), classes)
    frame["split"] = assign_splits(frame, params.split, params.seed).to_numpy()
    check_disjoint(frame, "sha256")
    if params.split.strategy != "image":
        check_disjoint(frame, "patient")
    summary = summarise(frame, classes, fingerprint(frame))
    # The raw archive is always a checked zip (the download stage re-packs tars and folders):
    # read at random, one image at a time, memory stays flat however large the dataset.
    limits = params.dataset.limits
    with open_zip(paths.raw_archive, limits) as images, atomic_dir(paths.split) as out:
        frame.to_parquet(out / paths.split_manifest.name, index=False)
        write_shards(frame, images, out, params.split.shard_mb, params.seed)
        write_json(out / paths.classes_json.name, summary)
    print(
        "split: "
        + ", ".join(
            f"{s} {summary['images'][s]} ({summary['patients'][s]} patients)" for s in SPLITS
        )
        + f" [{params.split.strategy}]"
    )
    return summary
