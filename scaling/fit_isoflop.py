"""Approach 2: a parabola of loss in log N (and in log D) per IsoFLOP budget; its minimum
is that budget's optimal N (and D); power laws through the minima give N_opt ~ C^a and
D_opt ~ C^b (Hoffmann et al. 2022, section 3.2)."""

from __future__ import annotations

import numpy as np

from scaleforge.errors import ConfigError
from scaleforge.scaling.power_law import fit_power_law


def parabola_minimum(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(coefficients [c2, c1, c0] of loss = c2 x^2 + c1 x + c0, the minimising x), or None
    when the parabola opens downward (no minimum)."""
    coef = np.polyfit(x, loss, 2)
    if coef[0] <= 0:
        return None
    return coef, float(-coef[1] / (2 * coef[0]))


def isoflop_minima(budgets: list[tuple[float, np.ndarray]], N: np.ndarray, D: np.ndarray,
                   L: np.ndarray, names: list[str]) -> list[dict]:
    """Per budget with at least 3 distinct model sizes whose losses curve upward, the
    parabola minima N_opt, D_opt and the parabola's loss there. Other budgets are left out
    silently; the fit's sanity flags (sanity.py) name them."""
    out = []
    for budget, index in budgets:
        if len(np.unique(N[index])) < 3:
            continue
        by_n = parabola_minimum(np.log(N[index]), L[index])
        by_d = parabola_minimum(np.log(D[index]), L[index])
        if by_n is None or by_d is None:
            continue
        (coef_n, x_n), (coef_d, x_d) = by_n, by_d
        out.append({"C": budget, "N_opt": float(np.exp(x_n)), "D_opt": float(np.exp(x_d)),
                    "loss": float(np.polyval(coef_n, x_n)), "coef_logN": coef_n.tolist(),
                    "coef_logD": coef_d.tolist(), "runs": [names[i] for i in index]})
    return out


def fit_approach2(budgets: list[tuple[float, np.ndarray]], N: np.ndarray, D: np.ndarray,
                  L: np.ndarray, names: list[str]) -> dict:
    """Approach 2's minima and power laws: {a, log_kN, b, log_kD, minima}. Raises
    ConfigError when fewer than 2 budgets give a minimum."""
    minima = isoflop_minima(budgets, N, D, L, names)
    if len(minima) < 2:
        raise ConfigError(
            f"approach 2 needs parabola minima at 2 or more budgets; {len(minima)} of "
            f"{len(budgets)} budgets gave one: run 3 or more model sizes per budget at 2 or "
            "more budgets"
        )
    C = np.array([m["C"] for m in minima])
    a, log_kn = fit_power_law(C, np.array([m["N_opt"] for m in minima]))
    b, log_kd = fit_power_law(C, np.array([m["D_opt"] for m in minima]))
    return {"a": a, "log_kN": log_kn, "b": b, "log_kD": log_kd, "minima": minima}
