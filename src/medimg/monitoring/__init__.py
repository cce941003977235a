"""Monitoring, first slice: drift of served images' *properties* against a training reference.

What exists (pure functions, numpy + scipy + the data layer's `medimg.data.properties`; no
TensorFlow, no MLflow, nothing runs at import time):

- `reference.build_reference`: the per-image properties of the training images, stored as a
  small JSON-serialisable dict (per property: n, mean, std and fixed quantiles), so the
  reference can travel with a model without shipping its images.
- `drift.property_drift` / `drift.window_drift`: a KS test per property of a window of
  requests against that reference, plus a per-request out-of-distribution flag (a property
  outside the reference's extreme quantiles) and its share in the window.

- `request_log.RequestLog`: the served model's log of what it scored (properties, hash,
  probabilities, decision; no pixels) as Parquet parts in `MEDIMG_REQUEST_LOG`, written off
  the request path; off when that variable is unset.

What does not exist yet: no `medimg monitor` command reading that log, no MLflow run for a
monitoring window, no reference written by the pipeline (no DVC stage or model artifact
carries one), no alerting, and no drift of the model's *outputs* (confidence, predicted-class
share) — only of its inputs.
"""
