"""The `register` stage: compare the architectures, register the best, run the promotion gate."""

from __future__ import annotations

from typing import Any

from medimg.config import Params
from medimg.promotion import load_reports, rank, register_best, write_comparison


def run(params: Params) -> dict[str, Any]:
    """`reports/compare.md` for every architecture, then the gate for the best one."""
    reports = load_reports(params)
    order = rank(reports, params.register_cfg.metric)
    write_comparison(params, reports, order, params.register_cfg.metric)
    return register_best(params, reports, order)
