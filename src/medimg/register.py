"""The `register` stage: compare the architectures and run the promotion gate on the best.

It always writes `reports/compare.md` and the gate's decision against the current champion
(`reports/promotion.json`, `reports/gate.json`). It promotes only where
`medimg.promotion.promotion_allowed` says so (a local store, not an experiment); on a shared
server the decision says "would pass / would fail" and `medimg promote` (CI) acts on it.
"""

from __future__ import annotations

from typing import Any

from medimg.config import Params
from medimg.promotion import (
    gate_decision,
    load_reports,
    promote,
    promotion_allowed,
    rank,
    reason_paragraph,
    write_comparison,
    write_decision,
)


def run(params: Params) -> dict[str, Any]:
    """`reports/compare.md` for every architecture, then the gate for the best one."""
    reports = load_reports(params)
    order = rank(reports, params.register_cfg.metric)
    record = gate_decision(params, reports, order)
    allowed, why = promotion_allowed(params)
    record = promote(params, record, reports) if allowed else record
    record["not_promoted_because"] = None if allowed else why
    write_comparison(params, reports, order, params.register_cfg.metric, reason_paragraph(record))
    write_decision(params, record)
    print(reason_paragraph(record))
    return record
