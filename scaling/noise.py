"""Seed-to-seed noise of a sweep: how far one run's loss moves when only its seeds change.

A sweep planned with `seeds_per_point` > 1 (scaling/plan.py) trains each (N, D) point
several times, with the weights' and the data order's seeds moved together. Runs with the
same N and D are one point's replicates; each point with 2 or more gives a sample standard
deviation of its loss relative to its mean, and the sweep's noise is their pooled value
(the root of the replicate-weighted mean of the relative variances, ddof 1 per point).

What it is for: a run's measured loss is itself one draw with this spread around what the
law could at best predict, so a prediction error within `NOISE_MULTIPLE` times the noise
(about 95% of one run's draws for a normal spread) cannot be told from a perfect law:
`below_noise` says so, and the fit, the backtest and `sf-sweep check` report it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

NOISE_MULTIPLE = 2.0  # an error within 2 sigma of one run's noise is "below the noise"


def seed_noise(N: np.ndarray, D: np.ndarray, L: np.ndarray) -> dict | None:
    """The pooled relative seed-to-seed standard deviation of the losses `L` of runs at
    parameters `N` and tokens `D` (replicates: equal N and D), with its points:
    {"rel_std", "points", "runs", "per_point": [{N, D, runs, mean, rel_std}]}; None when no
    point has two runs."""
    groups: dict[tuple[float, float], list[float]] = defaultdict(list)
    for n, d, loss in zip(N, D, L, strict=True):
        groups[(float(n), float(d))].append(float(loss))
    per_point, weighted, dof = [], 0.0, 0
    for (n, d), losses in sorted(groups.items()):
        if len(losses) < 2:
            continue
        mean = float(np.mean(losses))
        rel_std = float(np.std(losses, ddof=1)) / mean
        per_point.append({"N": n, "D": d, "runs": len(losses), "mean": mean,
                          "rel_std": rel_std})
        weighted += (len(losses) - 1) * rel_std**2
        dof += len(losses) - 1
    if not per_point:
        return None
    return {"rel_std": math.sqrt(weighted / dof), "points": len(per_point),
            "runs": sum(p["runs"] for p in per_point), "per_point": per_point}


def below_noise(rel_error: float, noise: dict | None) -> bool | None:
    """Whether a prediction's relative error is within NOISE_MULTIPLE x the sweep's noise
    (as good as one run can show); None when the sweep measured no noise."""
    if noise is None:
        return None
    return abs(rel_error) <= NOISE_MULTIPLE * noise["rel_std"]


def noise_sentence(rel_error: float, noise: dict | None) -> str:
    """How `rel_error` compares with the noise, in words, for a report line."""
    if noise is None:
        return "seed-to-seed noise not measured (seeds_per_point=1)"
    sigma = noise["rel_std"]
    verdict = ("below the noise: as good as one run can show" if below_noise(rel_error, noise)
               else "above the noise")
    return (f"seed-to-seed noise {sigma:.2%} ({noise['points']} points x 2+ seeds): error "
            f"{abs(rel_error) / sigma:.1f} sigma, {verdict}" if sigma > 0 else
            f"seed-to-seed noise 0 ({noise['points']} points): {verdict}")
