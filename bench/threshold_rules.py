"""Which `evaluate.threshold_rule` keeps the sensitivity target on patients it never saw, and
at what cost in specificity: one compact_cnn trained on real cells, every rule judged the same
way.

    python bench/threshold_rules.py [--zip ../shared/data/malaria/cell_images_dev.zip]
                                    [--work /tmp/medimg-real/repo] [--splits 200]
                                    [--predictions /tmp/medimg-real] [--no-repro]

The dev zip (6,000 NIH cells, 140 patients) goes through the real stages (`dvc repro` in a
copy of this repo at WORK: dataset.source=local, train.architectures=[compact_cnn],
evaluate.tflite_int8=false); `--no-repro` reuses a WORK that already has them. The trained
model then scores val and test here with the served scoring (`medimg.scoring`, the
temperature evaluate fitted on val); the per-image probabilities go to
PREDICTIONS/predictions_{val,test}.csv (path, patient, label 1 = Parasitized, p).

Per rule, the threshold is chosen on the whole of val and applied to test (one new set of
~28 patients), and, to see past that one draw, on `--splits` random halves of the val
patients: chosen on one half, measured on the other. A rule that over-promises shows a mean
sensitivity below the target; one that gives specificity away shows a low mean specificity
and a share of splits above the target near 1. Missing dev zip: prints why, exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scale import git_clone

REPO = Path(__file__).resolve().parents[1]
DEV_ZIP = Path("/work/shared/data/malaria/cell_images_dev.zip")
ARCH = "compact_cnn"
# name: (threshold_rule, ci) — ci is the percentile for bootstrap_lower: (1 - ci) / 2
RULES: dict[str, tuple[str, float]] = {
    "point": ("point", 0.95),
    "bootstrap_lower (2.5th pct)": ("bootstrap_lower", 0.95),
    "bootstrap_lower, ci 0.8 (10th pct)": ("bootstrap_lower", 0.8),
    "bootstrap_lower, ci 0.6 (20th pct)": ("bootstrap_lower", 0.6),
    "optimism": ("optimism", 0.95),
}


def real_params(params: dict, zip_path: Path) -> dict:
    """params.yaml for the real dev set: the `-S` edits, nothing else changed."""
    params["dataset"] |= {"source": "local", "path": str(zip_path)}
    params["train"] |= {"architectures": [ARCH]}
    params["evaluate"] |= {"tflite_int8": False}
    return params


def repro(work: Path, zip_path: Path) -> None:
    """The real stages in `work` (a fresh clone of the committed repo, as the other real-data
    benches run), importing the clone's own code."""
    if work.exists():
        shutil.rmtree(work)
    git_clone(work)
    params_file = work / "params.yaml"
    params = real_params(yaml.safe_load(params_file.read_text()), zip_path)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(work / "src"),
    }
    subprocess.run(["dvc", "repro"], cwd=work, env=env, check=True)


def score_splits(work: Path) -> dict[str, dict[str, Any]]:
    """Val and test as the served model scores them (its temperature from the evaluate
    stage's summary.json): labels, patients, paths and P(Parasitized)."""
    from medimg.data.shards import stream_split
    from medimg.io import read_json
    from medimg.models.loading import load_model
    from medimg.scoring import probabilities

    size = int(read_json(work / "models" / ARCH / "run.json")["image_size"])
    summary = read_json(work / "reports" / "eval" / ARCH / "summary.json")
    temperature = float(summary.get("temperature", 1.0))
    model = load_model(work / "models" / ARCH / "model.keras")
    score = lambda x: probabilities(model, x, temperature=temperature)  # noqa: E731
    out = {}
    for split in ("val", "test"):
        y, patients, paths, probs = stream_split(work / "data" / "split", split, size, {"p": score})
        out[split] = {"y": y, "groups": patients, "paths": paths, "p": probs["p"]}
    return out


def write_predictions(scored: dict[str, dict[str, Any]], dest: Path) -> None:
    import pandas as pd

    dest.mkdir(parents=True, exist_ok=True)
    for split, s in scored.items():
        frame = pd.DataFrame(
            {"path": s["paths"], "patient": s["groups"], "label": s["y"], "p": s["p"]}
        )
        frame.to_csv(dest / f"predictions_{split}.csv", index=False)


def rates(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    """(sensitivity, specificity) of `p >= t`; NaN where a class is absent."""
    pos, neg = y == 1, y == 0
    sens = float(np.mean(p[pos] >= t)) if pos.any() else float("nan")
    spec = float(np.mean(p[neg] < t)) if neg.any() else float("nan")
    return sens, spec


def half_splits(groups: list[str], n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` random halves of the patients: (rows to choose on, rows to measure on)."""
    keys = np.asarray(groups)
    patients = np.unique(keys)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        chosen = rng.permutation(patients)[: len(patients) // 2]
        mask = np.isin(keys, chosen)
        out.append((np.flatnonzero(mask), np.flatnonzero(~mask)))
    return out


def judge(
    cfg: Any, val: dict[str, Any], test: dict[str, Any], splits: list, boot_cfg: Any, seed: int
) -> dict[str, Any]:
    """One rule: its threshold on val and test rates, then the repeated-split transfer."""
    from medimg.analysis.operating import operating_threshold

    t, _ = operating_threshold(val["y"], val["p"], val["groups"], cfg, seed)
    test_sens, test_spec = rates(test["y"], test["p"], t)
    sens, spec, ts = [], [], []
    groups = np.asarray(val["groups"])
    for i, (a, b) in enumerate(splits):
        ta, _ = operating_threshold(val["y"][a], val["p"][a], list(groups[a]), boot_cfg, seed + i)
        s, c = rates(val["y"][b], val["p"][b], ta)
        if not np.isnan(s):
            sens.append(s)
        spec.append(c)
        ts.append(ta)
    target = cfg.target_sensitivity
    return {
        "threshold": t,
        "test_sensitivity": test_sens,
        "test_specificity": test_spec,
        "split_mean_sensitivity": float(np.mean(sens)),
        "split_share_at_target": float(np.mean(np.asarray(sens) >= target - 1e-12)),
        "split_mean_specificity": float(np.nanmean(spec)),
        "split_median_threshold": float(np.median(ts)),
        "splits_with_positives": len(sens),
    }


def table(results: dict[str, dict[str, Any]], target: float, n_splits: int) -> str:
    head = (
        "| rule | threshold on val | test sens | test spec | repeated-split mean sens "
        f"| share of splits with sens >= {target} | repeated-split mean spec |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['threshold']:.4f} | {r['test_sensitivity']:.4f} "
            f"| {r['test_specificity']:.4f} | {r['split_mean_sensitivity']:.4f} "
            f"| {r['split_share_at_target']:.2f} | {r['split_mean_specificity']:.4f} |"
        )
    return "\n".join(lines) + f"\n\n({n_splits} random patient halves of val)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zip", type=Path, default=DEV_ZIP)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medimg-real/repo"))
    ap.add_argument("--predictions", type=Path, default=Path("/tmp/medimg-real"))
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--split-bootstrap", type=int, default=200, help="resamples per half")
    ap.add_argument("--no-repro", action="store_true", help="WORK already ran the stages")
    args = ap.parse_args(argv)
    if not args.zip.exists():
        print(f"skipped: {args.zip} is absent (the real dev set is not on this machine)")
        return 0
    from medimg.config import EvaluateConfig, parse_params

    t0 = time.time()
    if not args.no_repro:
        repro(args.work, args.zip.resolve())
    scored = score_splits(args.work)
    write_predictions(scored, args.predictions)
    base = parse_params(yaml.safe_load((args.work / "params.yaml").read_text()))
    seed = base.seed
    val, test = scored["val"], scored["test"]
    splits = half_splits(val["groups"], args.splits, seed)
    results = {}
    for name, (rule, ci) in RULES.items():
        update = {"threshold_rule": rule, "ci": ci}
        cfg = base.evaluate.model_copy(update=update)
        boot = EvaluateConfig(**{**cfg.model_dump(), "bootstrap": args.split_bootstrap})
        results[name] = judge(cfg, val, test, splits, boot, seed)
    print(
        f"val: {len(val['y'])} cells, {len(set(val['groups']))} patients; "
        f"test: {len(test['y'])} cells, {len(set(test['groups']))} patients; "
        f"target sensitivity {base.evaluate.target_sensitivity}; {time.time() - t0:.0f} s"
    )
    print(table(results, base.evaluate.target_sensitivity, args.splits))
    (args.predictions / "threshold_rules.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
