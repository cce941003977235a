"""params.yaml's decision sections: evaluate (thresholds, slices, patient-level), register (the
ranking metric and the model card) and gate (floors, regression, slices).

Split from `medimg.config`, which re-exports every name here: a stage reads
`params.evaluate`, `params.register` and `params.gate` as before.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from medimg.config_base import Frozen, PosInt


class PatientConfig(Frozen):
    """Patient-level diagnosis (medimg.analysis.patient): a patient is called infected when
    the share of their cells called parasitized reaches a threshold chosen on val patients."""

    target_sensitivity: Annotated[float, Field(gt=0, le=1)] = 0.95  # over val patients
    # point: the highest val threshold reaching the target (on the least parasitized infected
    # patient it must catch); midpoint: halfway down to the next lower val parasitemia
    threshold_rule: Literal["point", "midpoint"] = "midpoint"


SliceProperty = Literal["brightness", "contrast", "saturation", "sharpness", "size"]
GateMetric = Literal["accuracy", "sensitivity", "specificity"]


class SliceConfig(Frozen):
    """`evaluate.slices` (medimg.analysis.slices): test metrics per class, patient size, image
    property bin and source. Property bins are quantiles of the *val* images, fixed before
    test is looked at; a slice under `min_images` or `min_patients` is `too_small`, ungated."""

    enabled: bool = True
    properties: list[SliceProperty] = ["brightness", "contrast", "saturation", "sharpness", "size"]
    bins: Annotated[int, Field(ge=2, le=10)] = 3
    min_images: PosInt = 30
    min_patients: PosInt = 5
    # a regex on the image path: group 1 (or the whole match) names the source, e.g.
    # '^[^/]+/([^/]+)/' for a site folder; null: no source slices
    source: str | None = None


class SliceGateConfig(Frozen):
    """`gate.slices`: floors on every gated (not too small) slice, and no slice worse than the
    champion's same slice by more than `max_regression` (null: `gate.max_regression`)."""

    enabled: bool = True
    metrics: list[GateMetric] = ["accuracy", "sensitivity"]  # compared with the champion
    min_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    min_sensitivity: Annotated[float, Field(ge=0, le=1)] | None = None
    min_specificity: Annotated[float, Field(ge=0, le=1)] | None = None
    max_regression: Annotated[float, Field(ge=0, le=1)] | None = None


class EvaluateConfig(Frozen):
    target_sensitivity: Annotated[float, Field(gt=0, le=1)] = 0.95
    # point: the highest val threshold reaching the target; bootstrap_lower: its lower
    # percentile over a patient bootstrap of val, so the target holds on new patients;
    # optimism: the point threshold for the target plus the shortfall a patient bootstrap
    # of val predicts on new patients (bench/threshold_rules.py compares them)
    threshold_rule: Literal["point", "bootstrap_lower", "optimism"] = "bootstrap_lower"
    # bootstrap_lower only: the most val specificity its margin may cost below the point
    # threshold's (null: no cap)
    max_specificity_cost: Annotated[float, Field(ge=0, le=1)] | None = 0.05
    tta: bool = False  # mean over the 8 flips/90° rotations, here, in predict and serving
    temperature_scaling: bool = True  # one temperature fitted on val, applied everywhere
    bootstrap: Annotated[int, Field(ge=0)] = 1000
    ci: Annotated[float, Field(gt=0, lt=1)] = 0.95
    calibration_bins: Annotated[int, Field(ge=2, le=100)] = 10
    gradcam_examples: Annotated[int, Field(ge=0, le=64)] = 8
    tflite_int8: bool = True
    representative_samples: PosInt = 100
    benchmark_images: PosInt = 200
    patient: PatientConfig = PatientConfig()  # binary datasets only
    slices: SliceConfig = SliceConfig()


class SelectionMetric(StrEnum):
    """A headline metric of `reports/eval/<arch>/summary.json` that `register.metric` may rank
    the architectures by, declared with the direction that is better: ranking every metric
    highest-first would make `metric: ece` promote the worst-calibrated model."""

    lower_is_better: bool

    def __new__(cls, value: str, lower_is_better: bool = False) -> SelectionMetric:
        member = str.__new__(cls, value)
        member._value_ = value
        member.lower_is_better = lower_is_better
        return member

    ACCURACY = "accuracy"
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    PRECISION = "precision"
    F1 = "f1"
    ROC_AUC = "roc_auc"
    PR_AUC = "pr_auc"
    MCC = "mcc"
    BRIER = "brier", True
    ECE = "ece", True


class CardConfig(Frozen):
    """`register.card`: the model card's text (medimg.analysis.card); promotion refuses a
    version whose card has an empty required field, so blanking one here stops promotion."""

    intended_use: str = "Decision support: flag blood-smear cell images for expert review."
    out_of_scope: str = "Diagnosis without expert review; other stains, microscopes or sites."
    users: str = "Laboratory staff and researchers evaluating automated malaria screening."
    ethical_considerations: str = "A missed infection delays treatment: re-validate locally."
    small_slice: Annotated[int, Field(ge=1)] = 30  # fewer test images: a limitation
    wide_ci: Annotated[float, Field(gt=0, le=1)] = 0.1  # a wider 95% CI: a limitation


class RegisterConfig(Frozen):
    metric: SelectionMetric = SelectionMetric.ACCURACY
    model_name: str | None = None
    # local: the register stage promotes on a local store outside DVC experiments (one user);
    # never: it only records the decision. A shared server is promoted by `medimg promote`.
    promote: Literal["local", "never"] = "local"
    card: CardConfig = CardConfig()

    def registered_name(self, dataset: str) -> str:
        return self.model_name or f"{dataset}-classifier"


class GateConfig(Frozen):
    min_accuracy: Annotated[float, Field(ge=0, le=1)] = 0.75
    min_sensitivity: Annotated[float, Field(ge=0, le=1)] | None = None
    min_specificity: Annotated[float, Field(ge=0, le=1)] | None = None
    max_regression: Annotated[float, Field(ge=0, le=1)] = 0.01
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    slices: SliceGateConfig = SliceGateConfig()


class ReferenceConfig(Frozen):
    """`monitoring.reference`: what evaluate stores with the served model for `medimg monitor`
    to compare served requests with (medimg.monitoring.profile)."""

    # train images measured (a seeded sample; every val image is measured too): the quantiles
    # settle long before 20k images, and measuring costs a PIL decode + a forward pass each
    images: PosInt = 2000
    # principal components of the penultimate-layer embedding kept (0: no embedding drift)
    embedding_components: Annotated[int, Field(ge=0, le=64)] = 8


class DriftConfig(Frozen):
    """`monitoring.drift`: when `medimg monitor` calls a window drifted (exit 3).

    A column drifts when its KS distance to the reference exceeds `min_statistic` plus the
    window's critical value at `alpha` / (number of tests) (medimg.monitoring.drift). The
    property floor 0.3 is above what new patients' stain and smear spread gives on real cells
    (D up to 0.27, bench/monitor.py)."""

    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01
    min_statistic: Annotated[float, Field(ge=0, lt=1)] = 0.3  # image properties
    embedding_min_statistic: Annotated[float, Field(ge=0, lt=1)] = 0.3
    prediction_min_statistic: Annotated[float, Field(ge=0, lt=1)] = 0.3
    ood_tolerance: Annotated[float, Field(ge=0)] = 0.1  # widening of the 0.1-99.9% range
    max_ood_share: Annotated[float, Field(ge=0, le=1)] = 0.1
    min_requests: PosInt = 25  # a smaller window is reported, never called drifted


class MonitoringConfig(Frozen):
    """params.yaml `monitoring:`: the reference evaluate stores with the model, whether the
    served model keeps the pixels it scored (for relabeling), and `medimg monitor`'s window
    and thresholds."""

    reference: ReferenceConfig = ReferenceConfig()
    keep_images: bool = False  # the served model writes each scored image (PNG) to its log
    window: PosInt = 500  # `medimg monitor` default: the last N logged requests
    drift: DriftConfig = DriftConfig()
