"""Group the runs of a table into IsoFLOP budgets.

A table from `sf-sweep collect` carries each run's planned `budget`; runs group by it.
Other tables (published data) have only C (or N and D, then C = 6 N D): runs are sorted by
C and a new budget starts wherever consecutive runs are more than `gap_dex` apart in
log10 C, since runs meant for one budget land within a few percent of it. When the
budgets are known (`budgets`), each run joins the nearest one in log C if within
`gap_dex`; runs near none are left out of the IsoFLOP approaches.
"""

from __future__ import annotations

import numpy as np


def compute(rows: list[dict]) -> np.ndarray:
    """C (FLOPs) of every row: its C column, else 6 N D."""
    if all(isinstance(row.get("C"), float) for row in rows):
        return np.array([row["C"] for row in rows])
    return np.array([6.0 * row["N"] * row["D"] for row in rows])


def group_budgets(rows: list[dict], gap_dex: float = 0.1,
                  budgets: list[float] | None = None) -> list[tuple[float, np.ndarray]]:
    """[(budget in FLOPs, indices of its rows)] in increasing budget. The budget is the
    planned one when rows carry `budget`, the nearest of `budgets` when given, else the
    geometric mean of the group's C."""
    if budgets:
        log_c = np.log10(compute(rows))
        known = np.log10(np.sort(np.asarray(budgets, dtype=float)))
        nearest = np.argmin(np.abs(log_c[:, None] - known[None, :]), axis=1)
        close = np.abs(log_c - known[nearest]) <= gap_dex
        return [(float(10 ** k), np.flatnonzero(close & (nearest == j)))
                for j, k in enumerate(known) if np.any(close & (nearest == j))]
    if all(isinstance(row.get("budget"), float) for row in rows):
        planned = np.array([row["budget"] for row in rows])
        return [(float(b), np.flatnonzero(planned == b)) for b in np.unique(planned)]
    flops = compute(rows)
    order = np.argsort(flops)
    log_c = np.log10(flops[order])
    breaks = np.flatnonzero(np.diff(log_c) > gap_dex) + 1
    groups = np.split(order, breaks)
    return [(float(10 ** np.mean(np.log10(flops[g]))), g) for g in groups]
