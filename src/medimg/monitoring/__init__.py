"""Watching the served model: what it is asked, against what it was built on.

Nothing here imports a stage, a command, MLflow or TensorFlow at import time; the served model
(`medimg.pyfunc_classifier`) imports `request_log`, evaluate imports `profile`, and `medimg
monitor` (`medimg.commands.monitor`, with `medimg.tracking.monitoring` for MLflow) the rest.

- `reference`: the reference profile's format: per column n, mean, std and 103 quantiles;
  image properties at the top level, the penultimate-layer embedding's PCA and its components
  under `embedding`, val's served probabilities and class shares under `predictions`.
- `profile`: evaluate's side: measures a train sample + val through the split's shards and
  the model's two-output copy, and builds the reference stored with the served model.
- `request_log`: the served model's log, one row per scored image (properties, embedding
  components, answer, hashes; pixels only with keep_images), written off the request path
  as Parquet parts in a folder, or to PostgreSQL (`pg_log`) for a URL.
- `log_store`: reads a window of that log back (last N, or by time, for one model) and the
  writers' health counters.
- `drift`: the KS test of a window against the reference per column, the out-of-distribution
  flag per request, the verdict (`check_window`) and its metrics.
- `report`: the HTML report of a verdict, with a plot per column.
"""
