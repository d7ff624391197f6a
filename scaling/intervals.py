"""Bootstrap intervals for what a fit predicts: the loss of (N, D), and a budget's
compute-optimal N, D and loss.

Each interval is the 2.5 and 97.5 percentiles over the fit's bootstrap resamples
(fit.json `samples`). Losses get predictive intervals: every resample's prediction is
multiplied by every observed run's departure from the point fit (exp of its log residual),
so the interval covers where one new run would land, run-to-run noise included, not only
where the law's mean lies. N_opt and D_opt are properties of the law, not of one run, so
theirs are confidence intervals. A fit without resamples (bootstrap=0) gives NaN bounds.
"""

from __future__ import annotations

import math

import numpy as np

from scaleforge.errors import ConfigError
from scaleforge.scaling.fit import LAW_PARAMS
from scaleforge.scaling.law import law_optimum, law_params, loss, out_of_range


def interval(value: float, samples: np.ndarray) -> dict:
    """{value, low, high}: `value` and the 2.5 and 97.5 percentiles of the finite
    `samples` (NaN bounds with fewer than 2)."""
    finite = samples[np.isfinite(samples)]
    if len(finite) < 2:
        return {"value": float(value), "low": math.nan, "high": math.nan}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"value": float(value), "low": float(low), "high": float(high)}


def predictive(value: float, samples: np.ndarray, log_residuals: list[float]) -> dict:
    """The predictive interval of a loss: `samples` (one per resample) times exp of every
    log residual."""
    spread = np.outer(samples, np.exp(np.asarray(log_residuals))).ravel()
    return interval(value, spread)


def _law_samples(fit: dict) -> list[dict]:
    return [dict(zip(LAW_PARAMS, row, strict=True)) for row in fit["approach3"]["samples"]]


def loss_interval(fit: dict, N: float, D: float) -> dict:
    """Approach 3's loss (nats) of N parameters trained on D tokens, with its 95%
    predictive interval: {value, low, high}."""
    if not (N > 0 and D > 0):
        raise ConfigError(f"N={N} and D={D} must both be positive")
    with out_of_range():  # a resample's non-finite loss is dropped
        samples = np.array([loss(params, N, D) for params in _law_samples(fit)])
    return predictive(float(loss(law_params(fit), N, D)), samples,
                      fit["approach3"]["log_residuals"])


def allocation_intervals(fit: dict, C: float, approach: str = "approach3") -> dict:
    """N_opt, D_opt (95% confidence) and loss (95% predictive) of a budget of C FLOPs by
    `approach`, each {value, low, high}. Approach 3 solves each resample's optimum under
    the fit's FLOP convention and predicts the loss there; approaches 1 and 2 take N_opt
    and D_opt from their power laws and the loss from their law of the budgets' best loss
    (`loss_law`)."""
    if not C > 0:
        raise ConfigError(f"C={C} must be a positive number of FLOPs")
    if approach not in fit:
        raise ConfigError(f"approach={approach!r} is not in this fit; it has "
                          f"{', '.join(k for k in fit if k.startswith('approach'))}")
    entry = fit[approach]
    if approach == "approach3":
        law = law_params(fit)
        if not (law["alpha"] > 0 and law["beta"] > 0):
            raise ConfigError(
                f"approach 3's law has alpha={law['alpha']:.3g} and beta={law['beta']:.3g}: "
                "with either <= 0 its loss does not fall with N (or D), so it has no "
                "compute-optimal size (the optimum runs to the search's edge); read the "
                "fit's flags, fix the sweep (its grid, learning rate or steps per run) and "
                "refit, or use approach=approach1")
        convention = fit.get("flop_convention")
        n_opt, d_opt = law_optimum(law, C, convention)
        with out_of_range():  # resamples without a finite optimum are dropped
            optima = [law_optimum(params, C, convention) for params in _law_samples(fit)]
            losses = np.array([loss(params, n, d) for params, (n, d)
                               in zip(_law_samples(fit), optima, strict=True)])
        return {"N_opt": interval(n_opt, np.array([n for n, _ in optima])),
                "D_opt": interval(d_opt, np.array([d for _, d in optima])),
                "loss": predictive(float(loss(law_params(fit), n_opt, d_opt)), losses,
                                   entry["log_residuals"])}
    samples = np.array(entry["samples"]).reshape(-1, 6)
    a, log_kn, b, log_kd, g, log_kl = samples.T
    best = math.exp(entry["loss_law"]["log_kL"]) * C ** entry["loss_law"]["g"]["value"]
    return {"N_opt": interval(math.exp(entry["log_kN"]) * C ** entry["a"]["value"],
                              np.exp(log_kn) * C ** a),
            "D_opt": interval(math.exp(entry["log_kD"]) * C ** entry["b"]["value"],
                              np.exp(log_kd) * C ** b),
            "loss": predictive(best, np.exp(log_kl) * C ** g, entry["loss_log_residuals"])}
