"""params.yaml as a typed, frozen tree.

Every knob of the pipeline lives in params.yaml; this module is the only place that reads it.
Models are frozen and `extra="forbid"` so a typo (`split.fraction`) fails at load, with the
dotted key in a one-line `ConfigError` (exit code 2), before any stage touches data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from medimg.config_base import (  # noqa: F401  (re-exported)
    QUANTIZE_MODES,
    Fraction,
    Frozen,
    Optimizer,
    PosInt,
    Quantize,
    Schedule,
)
from medimg.config_decision import (  # noqa: F401  (re-exported)
    CardConfig,
    DriftConfig,
    EvaluateConfig,
    GateConfig,
    MonitoringConfig,
    PatientConfig,
    ReferenceConfig,
    RegisterConfig,
    SelectionMetric,
    SliceConfig,
    SliceGateConfig,
)
from medimg.errors import ConfigError

NIH_PATIENT_REGEX = r"^(C\d+)"  # C33P1thinF_, but also C37BP2_, C1ThinF_, C5thin_ in the real set
OCT_PATIENT_REGEX = r"^[A-Z]+-(\d+)-\d+"
NIH_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
NIH_SHA256 = "0a949556b2414159b5100192609805376654c4266d8d187be9b1922fad43c668"
NIH_SIZE = 353_452_851


class SyntheticConfig(Frozen):
    """Size and difficulty of the offline NIH-like generator."""

    patients: PosInt = 80
    cells_per_patient: tuple[PosInt, PosInt] = (12, 24)
    healthy_patient_fraction: Fraction = 0.25
    infected_cell_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6
    size_range: tuple[PosInt, PosInt] = (96, 150)
    confuser_fraction: Fraction = 0.3

    @model_validator(mode="after")
    def _ordered(self) -> SyntheticConfig:
        for name in ("cells_per_patient", "size_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} is above high {hi}")
        return self


class OctSyntheticConfig(Frozen):
    """Size and difficulty of the offline OCT2017-like generator (medimg.data.synthetic_oct)."""

    patients: Annotated[int, Field(ge=4)] = 240  # >= 4 so every class has a patient
    images_per_patient: tuple[PosInt, PosInt] = (8, 12)
    mild_fraction: Fraction = 0.1  # diseased scans drawn with faint lesions
    width_choices: Annotated[
        tuple[Annotated[int, Field(ge=64, le=1024)], ...], Field(min_length=1)
    ] = (512, 768)
    height: Annotated[int, Field(ge=64, le=1024)] = 496
    jpeg_quality: Annotated[int, Field(ge=50, le=95)] = 90

    @model_validator(mode="after")
    def _ordered(self) -> OctSyntheticConfig:
        lo, hi = self.images_per_patient
        if lo > hi:
            raise ValueError(f"images_per_patient: low {lo} is above high {hi}")
        return self


class ArchiveLimits(Frozen):
    """Bounds that keep a hostile or broken archive from filling disk or memory."""

    max_total_bytes: PosInt = 20_000_000_000  # OCT2017 is 5.8 GB; synthetic OCT 100k ~10 GB
    max_entries: PosInt = 500_000
    max_image_pixels: PosInt = 4_000_000


class DatasetConfig(Frozen):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")] = "malaria"
    source: Literal["synthetic", "url", "local"] = "synthetic"
    path: str | None = None
    url: str = NIH_URL
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = NIH_SHA256
    size_bytes: PosInt = NIH_SIZE
    retries: Annotated[int, Field(ge=0, le=20)] = 5
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    synthetic: SyntheticConfig = SyntheticConfig()
    synthetic_oct: OctSyntheticConfig = OctSyntheticConfig()
    limits: ArchiveLimits = ArchiveLimits()

    @model_validator(mode="after")
    def _local_needs_path(self) -> DatasetConfig:
        if self.source == "local" and not self.path:
            raise ValueError("source 'local' needs dataset.path")
        return self


class ValidateConfig(Frozen):
    """Expectations on the manifest; see medimg.validate for the policy."""

    # Order is the label order: index i = classes[i]. With two classes the second is the
    # positive class (the sigmoid unit predicts it; sensitivity is measured on it).
    classes: Annotated[list[str], Field(min_length=2)] = ["Uninfected", "Parasitized"]
    min_per_class: PosInt = 20
    width: tuple[PosInt, PosInt] = (16, 1024)
    height: tuple[PosInt, PosInt] = (16, 1024)
    modes: list[str] = ["RGB"]
    formats: list[str] = ["PNG"]
    patient_regex: str | None = None
    max_corrupt_fraction: Fraction = 0.001
    max_class_imbalance: Annotated[float, Field(ge=1.0)] = 1.5
    junk_names: list[str] = ["Thumbs.db", ".DS_Store", "desktop.ini"]
    workers: Annotated[int, Field(ge=0)] = 0

    def patient_pattern(self, dataset: str) -> str:
        """NIH names by default, OCT2017's `CLASS-PATIENT-N` for an `oct*` dataset."""
        if self.patient_regex:
            return self.patient_regex
        return OCT_PATIENT_REGEX if dataset.startswith("oct") else NIH_PATIENT_REGEX


class SplitFractions(Frozen):
    train: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.65
    val: Fraction = 0.15
    test: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class SplitConfig(Frozen):
    strategy: Literal["patient", "image", "predefined"] = "patient"
    fractions: SplitFractions = SplitFractions()
    shard_mb: Annotated[float, Field(gt=0, le=4096)] = 100.0  # per TFRecord file
    predefined_folders: dict[str, str] = {"train": "train", "val": "val", "test": "test"}


class ColorJitterConfig(Frozen):
    """Stain/illumination jitter (`medimg.models.augment.RandomColor`); 0 = off."""

    brightness: Fraction = 0.0
    contrast: Fraction = 0.0
    saturation: Fraction = 0.0
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0  # x 180 degrees


class AugmentConfig(Frozen):
    """The seeds' ImageDataGenerator settings, as Keras preprocessing layers."""

    rotation_deg: Annotated[float, Field(ge=0, le=180)] = 20.0
    zoom: Fraction = 0.05
    shift: Fraction = 0.05
    shear: Fraction = 0.05
    horizontal_flip: bool = True
    vertical_flip: bool = True
    color: ColorJitterConfig = ColorJitterConfig()


class TrainOverride(Frozen):
    """Per-architecture values that win over `train:` and the model's own recipe."""

    epochs: PosInt | None = None
    batch_size: PosInt | None = None
    image_size: PosInt | None = None
    optimizer: Optimizer | None = None
    learning_rate: Annotated[float, Field(gt=0)] | None = None
    schedule: Schedule | None = None
    weights: str | None = None
    augmentation: bool | None = None  # train with `train.augment`; null: the model's recipe
    model: dict[str, Any] = {}


class TrainConfig(Frozen):
    architectures: Annotated[list[str], Field(min_length=1)] = ["compact_cnn", "simple_cnn"]
    epochs: PosInt = 15
    batch_size: PosInt = 32
    image_size: PosInt | None = None
    optimizer: Optimizer | None = None
    learning_rate: Annotated[float, Field(gt=0)] | None = None
    schedule: Schedule | None = None
    weights: str = "none"
    monitor: Literal["val_accuracy", "val_loss", "val_auc"] = "val_accuracy"
    early_stopping_patience: Annotated[int, Field(ge=0)] = 0
    class_weights: bool = False
    augment: AugmentConfig = AugmentConfig()
    shuffle_buffer: PosInt = 2048
    # auto: uint8 images in memory while train+val fit in cache_max_memory_mb, else on disk
    cache: Literal["auto", "memory", "disk", "none"] = "auto"
    cache_max_memory_mb: PosInt = 1024
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    xla: bool = False
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    overrides: dict[str, TrainOverride] = {}


class PathsConfig(Frozen):
    """Where each stage writes; dvc.yaml templates these, code reads them from here."""

    raw: str = "data/raw"
    validated: str = "data/validated"
    split: str = "data/split"
    models: str = "models"
    reports: str = "reports"
    gx: str = "gx"
    mlruns: str = "mlruns"

    @property
    def raw_archive(self) -> Path:
        """The one file the download stage leaves: every source is normalised to a zip."""
        return Path(self.raw) / "images.zip"

    @property
    def manifest(self) -> Path:
        return Path(self.validated) / "manifest.parquet"

    @property
    def validation_report(self) -> Path:
        return Path(self.reports) / "validation.json"

    @property
    def data_docs(self) -> Path:
        return Path(self.reports) / "data_docs"

    @property
    def split_manifest(self) -> Path:
        return Path(self.split) / "split.parquet"

    @property
    def classes_json(self) -> Path:
        return Path(self.split) / "classes.json"

    def model_file(self, arch: str) -> Path:
        return Path(self.models) / arch / "model.keras"

    def train_run(self, arch: str) -> Path:
        """MLflow run id and model URI of `arch`: evaluate and register log into that run."""
        return Path(self.models) / arch / "run.json"

    def backup_dir(self, arch: str) -> Path:
        """BackupAndRestore state; outside every DVC output so a killed run can resume."""
        return Path(self.models) / ".backup" / arch

    def cache_dir(self, arch: str) -> Path:
        """tf.data's on-disk image cache (train.cache: disk); removed when training ends."""
        return Path(self.models) / ".cache" / arch

    def train_reports(self, arch: str) -> Path:
        return Path(self.reports) / "train" / arch

    def eval_reports(self, arch: str) -> Path:
        """Plots, predictions and the int8 model of `arch`'s evaluation."""
        return Path(self.reports) / "eval" / arch

    def eval_metrics(self, arch: str) -> Path:
        """The DVC metrics file of `arch`: `reports/eval/<arch>.json`."""
        return Path(self.reports) / "eval" / f"{arch}.json"

    def eval_predictions(self, arch: str) -> Path:
        """Per-image test predictions: `dvc plots` confusion matrix and the gate's McNemar."""
        return Path(self.reports) / "eval" / f"{arch}.predictions.csv"

    def eval_roc(self, arch: str) -> Path:
        return Path(self.reports) / "eval" / f"{arch}.roc.csv"

    @property
    def promotion(self) -> Path:
        return Path(self.reports) / "promotion.json"


class MlflowConfig(Frozen):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"
    experiment: str | None = None

    def experiment_name(self, dataset: str) -> str:
        return self.experiment or f"medimg-{dataset}"


class Params(Frozen):
    seed: Annotated[int, Field(ge=0)] = 42
    dataset: DatasetConfig = DatasetConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    gate: GateConfig = GateConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    paths: PathsConfig = PathsConfig()
    mlflow: MlflowConfig = MlflowConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate_cfg(self) -> ValidateConfig:
        """`validate` and `register` clash with BaseModel attributes, hence the aliases."""
        return self.validate_

    @property
    def register_cfg(self) -> RegisterConfig:
        return self.register_


# What each DVC stage reads, as dotted keys of params.yaml (a key covers everything below it).
# dvc.yaml's `params:` of the stage lists exactly these, so changing a knob re-runs every stage
# whose outputs it changes. tests/test_dvc_yaml.py compares the two, and the end-to-end test
# records every key each stage reads on its real run under `dvc repro` and fails on a key
# outside its list, its templated dvc.yaml entries (`${paths.split}`) and UNTRACKED_PARAMS.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "download": ("seed", "dataset"),
    "validate": ("dataset.name", "dataset.limits", "validate", "split.predefined_folders"),
    # split re-reads the archive: through the reader's bounds
    "split": ("seed", "dataset.limits", "split", "validate.classes"),
    "train": (
        "seed",
        "dataset.name",  # the MLflow experiment its run goes to
        "train.epochs",
        "train.batch_size",
        "train.image_size",
        "train.optimizer",
        "train.learning_rate",
        "train.schedule",
        "train.weights",
        "train.monitor",
        "train.early_stopping_patience",
        "train.class_weights",
        "train.augment",
        "train.shuffle_buffer",
        "train.cache",
        "train.cache_max_memory_mb",
        "train.mixed_precision",
        "train.xla",
        "train.label_smoothing",
        "train.overrides",
    ),
    # the served model it logs keeps the decoder's pixel bound
    "evaluate": (
        "seed",
        "dataset.name",
        "dataset.limits.max_image_pixels",
        "evaluate",
        "monitoring.reference",  # the drift reference stored with the served model
        "monitoring.keep_images",  # the served model's request-log setting
    ),
    "register": ("dataset.name", "train.architectures", "register", "gate"),
}
# Read by stages but in no stage's params: `mlflow` says where runs are recorded, not what
# they compute (and MLFLOW_TRACKING_URI overrides it); a stage re-run because the tracking
# store moved would only log the same results again.
UNTRACKED_PARAMS: tuple[str, ...] = ("mlflow",)


def _first_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    loc = loc.replace("validate_", "validate").replace("register_", "register")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(err.errors()) - 1
    tail = f" (+{more} more)" if more else ""
    return f"{source}: {loc}: {msg}{tail}"


def parse_params(data: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; any problem becomes a one-line ConfigError."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_first_error(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return parse_params(data, source=str(path))
