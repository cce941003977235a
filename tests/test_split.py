from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medimg.config import SplitConfig, parse_params
from medimg.errors import DataError
from medimg.split import assign_splits, check_disjoint, label_frame, tie_groups


def manifest(n_patients: int = 40, per_patient: int = 10, seed: int = 0) -> pd.DataFrame:
    """NIH-like: 3/4 of patients infected (both classes), 1/4 healthy (Uninfected only)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        healthy = p % 4 == 0
        for k in range(per_patient):
            cls = "Uninfected" if healthy or rng.random() < 0.5 else "Parasitized"
            rows.append(
                {
                    "path": f"cell_images/{cls}/C{p}P{p}thinF_IMG_x_cell_{k}.png",
                    "class": cls,
                    "patient": f"C{p}",
                    "sha256": f"{p:04d}{k:04d}",
                    "status": "ok",
                    "split_folder": None,
                }
            )
    return pd.DataFrame(rows)


def split(frame: pd.DataFrame, **cfg) -> pd.DataFrame:
    frame = label_frame(frame, ["Uninfected", "Parasitized"])
    frame["split"] = assign_splits(frame, SplitConfig(**cfg), seed=7).to_numpy()
    return frame


def test_patient_split_has_no_patient_in_two_splits():
    frame = split(manifest())
    assert frame.groupby("patient")["split"].nunique().max() == 1
    check_disjoint(frame, "patient")
    assert set(frame["split"]) == {"train", "val", "test"}


def test_patient_split_fractions_and_strata_are_close():
    frame = split(manifest(n_patients=80))
    share = frame["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.08)
    assert share["test"] == pytest.approx(0.2, abs=0.08)
    pos = frame.groupby("split")["label"].mean()
    assert pos.max() - pos.min() < 0.15


def test_identical_images_stay_in_one_split_even_across_patients():
    frame = manifest()
    frame.loc[frame["patient"] == "C3", "sha256"] = "dup"
    frame.loc[frame.index[-1], "sha256"] = "dup"  # same bytes under another patient
    out = split(frame)
    assert out.loc[out["sha256"] == "dup", "split"].nunique() == 1
    check_disjoint(out, "sha256")


def test_image_strategy_mixes_patients_like_the_seeds():
    frame = split(manifest(), strategy="image")
    assert frame.groupby("patient")["split"].nunique().max() > 1
    with pytest.raises(DataError, match="patient value"):
        check_disjoint(frame, "patient")


def test_split_is_deterministic_for_a_seed():
    a = split(manifest())["split"]
    b = split(manifest())["split"]
    assert a.equals(b)


def test_predefined_folders_are_honoured_and_val_carved_by_patient():
    frame = manifest()
    frame["split_folder"] = np.where(frame["patient"].str[1:].astype(int) < 30, "train", "test")
    out = split(frame, strategy="predefined")
    assert (out.loc[out["split_folder"] == "test", "split"] == "test").all()
    assert set(out.loc[out["split_folder"] == "train", "split"]) == {"train", "val"}
    check_disjoint(out, "patient")


def test_predefined_without_test_folder_is_an_error():
    frame = manifest()
    frame["split_folder"] = "train"
    with pytest.raises(DataError, match="test"):
        split(frame, strategy="predefined")


def test_tie_groups_merges_keys_sharing_an_image():
    groups = tie_groups(pd.Series(["a", "b", "c"]), pd.Series(["x", "x", "y"]))
    assert groups[0] == groups[1] != groups[2]


def test_out_of_range_fraction_names_the_key():
    from medimg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"split\.fractions\.test"):
        parse_params({"split": {"fractions": {"train": 0.5, "val": 0.1, "test": 1.4}}})
    with pytest.raises(ConfigError, match=r"split\.fractions: .*must be 1"):
        parse_params({"split": {"fractions": {"train": 0.5, "val": 0.1, "test": 0.1}}})


REAL = {
    "malaria/cell_images_dev.zip": ({}, 6000, 140),
    "malaria/cell_images_fullres.zip": ({"min_per_class": 50}, 200, 7),
    "oct/OCT2017_sample.tar.gz": (
        {
            "classes": ["CNV", "DME", "DRUSEN", "NORMAL"],
            "modes": ["L"],
            "formats": ["JPEG"],
            "min_per_class": 8,
        },
        32,
        None,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("archive", sorted(REAL))
def test_real_archive_goes_through_download_validate_split(archive, tmp_path):
    from medimg.download import run as download
    from medimg.io import read_json
    from medimg.split import run as split_run
    from medimg.validate import run as validate
    from tests.conftest import shared_file, tiny_params

    path = shared_file(archive)
    overrides, n_images, n_patients = REAL[archive]
    params = tiny_params(
        tmp_path,
        dataset={
            "source": "local",
            "path": str(path),
            "name": "oct2017" if "oct" in archive else "malaria",
        },
        validate=overrides,
    )
    download(params, progress=False)
    summary = validate(params)
    assert summary["valid"] == n_images
    if n_patients:
        assert summary["patients"] == n_patients
    split_run(params)
    frame = pd.read_parquet(params.paths.split_manifest)
    assert len(frame) == n_images
    assert frame.groupby("patient")["split"].nunique().max() == 1  # no patient in two splits
    info = read_json(params.paths.classes_json)
    assert sum(info["images"].values()) == n_images
    assert info["classes"] == list(params.validate_cfg.classes)
