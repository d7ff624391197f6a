"""The Chinchilla loss law and what follows from it.

L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D tokens, L in nats per token).
Under C = 6 N D, minimising L at fixed C gives (Hoffmann et al. 2022, eq. 4)
    N_opt(C) = G (C/6)^a,  D_opt(C) = (C/6)^b / G,
    a = beta / (alpha + beta),  b = alpha / (alpha + beta),
    G = (alpha A / (beta B))^(1 / (alpha + beta)).
Approaches 1 and 2 give power laws N_opt = k_N C^a and D_opt = k_D C^b directly.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

from scaleforge.errors import ConfigError

# A budget in FLOPs, or an array of them (the optimum is computed elementwise).
Compute = TypeVar("Compute", float, np.ndarray)


def loss(params: dict, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray | float:
    """L(N, D) of the law with params {E, A, B, alpha, beta} (plain floats)."""
    return (params["E"] + params["A"] / np.power(N, params["alpha"])
            + params["B"] / np.power(D, params["beta"]))


def optimal_exponents(alpha: float, beta: float) -> tuple[float, float]:
    """(a, b) of N_opt ~ C^a and D_opt ~ C^b for the law's exponents."""
    return beta / (alpha + beta), alpha / (alpha + beta)


def law_optimum(params: dict, C: Compute) -> tuple[Compute, Compute]:
    """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = C (FLOPs); elementwise for an
    array of budgets."""
    alpha, beta = params["alpha"], params["beta"]
    a, b = optimal_exponents(alpha, beta)
    G = (alpha * params["A"] / (beta * params["B"])) ** (1 / (alpha + beta))
    return G * (C / 6) ** a, (C / 6) ** b / G


def _value(entry: dict | float) -> float:
    return entry["value"] if isinstance(entry, dict) else float(entry)


def law_params(fit: dict) -> dict:
    """Approach 3's {E, A, B, alpha, beta} as plain floats from a fit.json dict."""
    if "approach3" not in fit:
        raise ConfigError("this fit.json has no approach3 entry; refit with `sf-sweep fit`")
    return {k: _value(v) for k, v in fit["approach3"]["params"].items()}


def predict_loss(fit: dict, N: float, D: float) -> float:
    """Approach 3's predicted loss (nats) of N parameters trained on D tokens."""
    if not (N > 0 and D > 0):
        raise ConfigError(f"N={N} and D={D} must both be positive")
    return float(loss(law_params(fit), N, D))


def optimal_allocation(fit: dict, C: float, approach: str = "approach3") -> tuple[
        float, float, float]:
    """(N_opt, D_opt, predicted loss) for a budget of C FLOPs by `approach`; the loss is
    always approach 3's L at that (N, D)."""
    if not C > 0:
        raise ConfigError(f"C={C} must be a positive number of FLOPs")
    if approach not in fit:
        raise ConfigError(f"approach={approach!r} is not in this fit; it has "
                          f"{', '.join(k for k in fit if k.startswith('approach'))}")
    if approach == "approach3":
        n_opt, d_opt = law_optimum(law_params(fit), C)
    else:
        entry = fit[approach]
        n_opt = math.exp(entry["log_kN"]) * C ** _value(entry["a"])
        d_opt = math.exp(entry["log_kD"]) * C ** _value(entry["b"])
    return n_opt, d_opt, predict_loss(fit, n_opt, d_opt)
