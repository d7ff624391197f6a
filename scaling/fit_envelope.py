"""Approach 1 on final losses: the lower envelope of loss against compute.

Hoffmann et al. (2022, section 3.1) take, at each FLOP count, the lowest loss any run
reached (over whole training curves) and fit power laws to the N and D that reached it. A
table of final losses carries one point per run, so here the envelope is taken per
IsoFLOP budget: the run of lowest loss at each budget gives N_opt(C) and D_opt(C).
"""

from __future__ import annotations

import numpy as np

from scaleforge.errors import ConfigError
from scaleforge.scaling.power_law import fit_power_law


def fit_approach1(budgets: list[tuple[float, np.ndarray]], N: np.ndarray, D: np.ndarray,
                  L: np.ndarray, names: list[str]) -> dict:
    """{a, log_kN, b, log_kD, minima}: power laws through each budget's lowest-loss run.
    Raises ConfigError with fewer than 2 budgets."""
    if len(budgets) < 2:
        raise ConfigError(f"approach 1 needs runs at 2 or more compute budgets; the table has "
                          f"{len(budgets)}: add a budget")
    minima = []
    for budget, index in budgets:
        best = index[np.argmin(L[index])]
        minima.append({"C": budget, "N_opt": float(N[best]), "D_opt": float(D[best]),
                       "loss": float(L[best]), "run": names[best]})
    C = np.array([m["C"] for m in minima])
    a, log_kn = fit_power_law(C, np.array([m["N_opt"] for m in minima]))
    b, log_kd = fit_power_law(C, np.array([m["D_opt"] for m in minima]))
    return {"a": a, "log_kN": log_kn, "b": b, "log_kD": log_kd, "minima": minima}
