"""The FLOP count C(N, D) of a fit's budgets, so approach 3's optimum is solved in the
budgets' own units.

Published tables count C = 6 N D. Sweeps planned by sf-sweep count exact training FLOPs
(`core/flops.py`: the LM head and attention included), which for small models is 1.5 to 4
times 6 N D (N non-embedding). The convention is read off the runs: when every run's C is
within SIX_ND_TOLERANCE (2%) of 6 N D, or the table has no C, it is "6ND"; otherwise it is
"fitted": C = D f(N) with f(N) = 6 N + k N^h FLOPs per token, k and h fitted by least
squares of log(C / D - 6 N) on log N. The excess over 6 N is the LM head and attention,
which under the shape rule grow more slowly than N, so f tends to 6 N for large models.
Runs whose C falls below 6 N D by more than the tolerance fit neither form: the fit then
stays on 6ND and says so (`fallback`).
"""

from __future__ import annotations

import numpy as np

SIX_ND_TOLERANCE = 0.02
SIX_ND = {"kind": "6ND", "formula": "C = 6 N D"}


def fit_convention(N: np.ndarray, D: np.ndarray, C: np.ndarray) -> dict:
    """The FLOP convention of runs with N parameters, D tokens and C FLOPs (1-D arrays):
    {"kind": "6ND", "formula"} or {"kind": "fitted", "formula", "k", "h", "max_rel_error"}
    (the largest |f(N) D / C - 1| over the runs); "6ND" with a "fallback" reason when C
    is neither 6 N D nor above it."""
    ratio = C / (6 * N * D)
    if np.all(np.abs(ratio - 1) <= SIX_ND_TOLERANCE):
        return dict(SIX_ND)
    excess = C / D - 6 * N
    if np.any(excess <= 0):
        return {**SIX_ND, "fallback": f"C / 6ND spans {ratio.min():.3g} to {ratio.max():.3g}; "
                "runs below 6ND fit no C = D (6 N + k N^h), so 6ND is used"}
    h, log_k = np.polyfit(np.log(N), np.log(excess), 1)
    fitted = {"kind": "fitted", "k": float(np.exp(log_k)), "h": float(h)}
    error = np.abs(flops_per_token(fitted, N) * D / C - 1)
    return {**fitted, "formula": f"C = D (6 N + {fitted['k']:.4g} N^{h:.3f})",
            "max_rel_error": float(error.max()), "C_over_6ND": [float(ratio.min()),
                                                                  float(ratio.max())]}


def flops_per_token(convention: dict | None, N: np.ndarray | float) -> np.ndarray | float:
    """f(N), training FLOPs per token of an N-parameter model under `convention` (None or
    "6ND": 6 N)."""
    if convention is None or convention["kind"] == "6ND":
        return 6 * N
    return 6 * N + convention["k"] * np.power(N, convention["h"])


def log_slope(convention: dict, N: np.ndarray) -> np.ndarray:
    """d log f / d log N at N (1 under 6ND)."""
    if convention["kind"] == "6ND":
        return np.ones_like(N)
    extra = convention["k"] * np.power(N, convention["h"])
    return (6 * N + convention["h"] * extra) / (6 * N + extra)
