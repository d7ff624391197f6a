"""The Chinchilla loss law and what follows from it.

L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D tokens, L in nats per token).
Under C = 6 N D, minimising L at fixed C gives (Hoffmann et al. 2022, eq. 4)
    N_opt(C) = G (C/6)^a,  D_opt(C) = (C/6)^b / G,
    a = beta / (alpha + beta),  b = alpha / (alpha + beta),
    G = (alpha A / (beta B))^(1 / (alpha + beta)).
Approaches 1 and 2 give power laws N_opt = k_N C^a and D_opt = k_D C^b directly.

When the budgets count FLOPs another way (a fitted C = D f(N), `flop_convention.py`), the
optimum at C solves dL/dlog N = 0 along D = C / f(N):
    alpha A N^-alpha = beta B D^-beta (d log f / d log N),
found by bisection in log N (the left side falls and the right side rises with N).
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

from scaleforge.errors import ConfigError
from scaleforge.scaling.flop_convention import flops_per_token, log_slope

# A budget in FLOPs, or an array of them (the optimum is computed elementwise).
Compute = TypeVar("Compute", float, np.ndarray)
BISECTION_STEPS = 80


def out_of_range() -> np.errstate:
    """numpy's errstate for evaluating a bootstrap resample's law, whose parameters may lie
    outside the law's range (an exponent <= 0, or so large a power overflows): its inf/NaN
    results are expected and dropped by the intervals (finite samples only), not warned
    about."""
    return np.errstate(over="ignore", divide="ignore", invalid="ignore")


def loss(params: dict, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray | float:
    """L(N, D) of the law with params {E, A, B, alpha, beta} (plain floats)."""
    return (params["E"] + params["A"] / np.power(N, params["alpha"])
            + params["B"] / np.power(D, params["beta"]))


def optimal_exponents(alpha: float, beta: float) -> tuple[float, float]:
    """(a, b) of N_opt ~ C^a and D_opt ~ C^b for the law's exponents."""
    return beta / (alpha + beta), alpha / (alpha + beta)


def law_optimum(params: dict, C: Compute, convention: dict | None = None) -> tuple[
        Compute, Compute]:
    """(N_opt, D_opt) minimising L(N, D) subject to C FLOPs under `convention` (None or
    "6ND": 6 N D = C, in closed form; "fitted": D f(N) = C, by bisection); elementwise for
    an array of budgets. A law without an optimum (alpha or beta <= 0, as a bootstrap
    resample of a flat sweep can give) yields NaN or inf under 6ND (numpy floats: not a
    complex number or a ZeroDivisionError) and the search's edge under "fitted"; callers
    evaluating resamples hold numpy's warnings (`out_of_range`) and drop non-finite values."""
    alpha, beta = np.float64(params["alpha"]), np.float64(params["beta"])
    if convention is None or convention["kind"] == "6ND":
        a, b = optimal_exponents(alpha, beta)
        G = (alpha * params["A"] / (beta * params["B"])) ** (1 / (alpha + beta))
        return G * (C / 6) ** a, (C / 6) ** b / G
    budget = np.asarray(C, dtype=float)
    # f(N) >= 6 N, so at N = C / 6 the run would have at most one token
    low, high = np.zeros_like(budget), np.log(budget / 6)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        N = np.exp(middle)
        D = budget / flops_per_token(convention, N)
        rising = (beta * params["B"] * D ** -beta * log_slope(convention, N)
                  > alpha * params["A"] * N ** -alpha)
        low, high = np.where(rising, low, middle), np.where(rising, middle, high)
    n_opt = np.exp((low + high) / 2)
    d_opt = budget / flops_per_token(convention, n_opt)
    if isinstance(C, np.ndarray):
        return n_opt, d_opt
    return float(n_opt), float(d_opt)


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
    always approach 3's L at that (N, D). Approach 3 solves its optimum under the fit's
    `flop_convention` (the budgets' FLOP count)."""
    if not C > 0:
        raise ConfigError(f"C={C} must be a positive number of FLOPs")
    if approach not in fit:
        raise ConfigError(f"approach={approach!r} is not in this fit; it has "
                          f"{', '.join(k for k in fit if k.startswith('approach'))}")
    if approach == "approach3":
        n_opt, d_opt = law_optimum(law_params(fit), C, fit.get("flop_convention"))
    else:
        entry = fit[approach]
        n_opt = math.exp(entry["log_kN"]) * C ** _value(entry["a"])
        d_opt = math.exp(entry["log_kD"]) * C ** _value(entry["b"])
    return n_opt, d_opt, predict_loss(fit, n_opt, d_opt)
