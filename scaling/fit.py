"""Fit approaches 1, 2 and 3 to a table of runs, with bootstrap confidence intervals.

The bootstrap resamples runs with replacement (within each budget for approaches 1 and 2,
so every budget keeps its size) `bootstrap` times and refits; intervals are the 2.5 and
97.5 percentiles. Approach 3's resamples start L-BFGS from the full-data optimum (the grid
search is run once, on all the data). Every resample's parameters are kept in fit.json
(`samples`), with the point fit's log residuals, so predictions get predictive intervals
(intervals.py). Approaches 1 and 2 also fit the loss of their budget minima as a power law
of C (`loss_law`), which is what they predict a budget's best loss to be. Approach 3's
optimum is solved under the budgets' own FLOP count (flop_convention.py). Rows with a
missing, NaN or non-positive N, D or loss are dropped with a warning naming the run; the
fit's sanity flags (sanity.py) are kept in `flags` and raised as SweepWarnings. Runs with
equal N and D are one point's seeds (`seeds_per_point`): their spread is `noise`
(scaling/noise.py); every run, each seed included, is fitted.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scaleforge.core.metrics import from_json, to_json
from scaleforge.errors import ConfigError
from scaleforge.scaling.budgets import compute, group_budgets
from scaleforge.scaling.collect import SweepWarning
from scaleforge.scaling.fit_envelope import fit_approach1
from scaleforge.scaling.fit_isoflop import fit_approach2
from scaleforge.scaling.fit_parametric import fit_law
from scaleforge.scaling.flop_convention import fit_convention
from scaleforge.scaling.law import law_optimum, loss, optimal_exponents, out_of_range
from scaleforge.scaling.noise import seed_noise
from scaleforge.scaling.power_law import fit_power_law
from scaleforge.scaling.sanity import budget_flags, flag, isoflop_structure, law_flags
from scaleforge.scaling.table import is_finite_row

LAW_PARAMS = ("E", "A", "B", "alpha", "beta")
# the columns of an IsoFLOP approach's bootstrap `samples`: N_opt = e^log_kN C^a, D_opt =
# e^log_kD C^b, the budget's best loss = e^log_kL C^g
ISOFLOP_SAMPLE_COLUMNS = ("a", "log_kN", "b", "log_kD", "g", "log_kL")
BAND_BUDGETS = np.geomspace(1e9, 1e27, 73)  # where the N_opt, D_opt bands are tabulated
# [(budget in FLOPs, indices of its runs)], as group_budgets returns them
Budgets = list[tuple[float, np.ndarray]]


class IsoflopFitter(Protocol):
    """Approach 1 or 2: budgets, N, D, loss and run names -> {a, log_kN, b, log_kD, minima}."""

    def __call__(self, budgets: Budgets, N: np.ndarray, D: np.ndarray, L: np.ndarray,
                 names: list[str]) -> dict: ...


def clean_rows(rows: list[dict], loss_column: str) -> list[dict]:
    """The rows whose N, D and loss are finite and positive; the others are dropped with a
    SweepWarning naming them (by `run` when the table has it, else by line)."""
    kept, dropped = [], []
    for line, row in enumerate(rows, start=2):
        columns = ("N", "D", loss_column)
        if is_finite_row(row, columns) and all(row[c] > 0 for c in columns):
            kept.append(row)
        else:
            dropped.append(f"{row.get('run', f'line {line}')} ({loss_column}={row[loss_column]})")
    if dropped:
        warnings.warn(f"dropping runs with a NaN, missing or non-positive N, D or "
                      f"{loss_column}: {', '.join(dropped)}", SweepWarning, stacklevel=2)
    if len(kept) < 5:
        raise ConfigError(f"only {len(kept)} usable runs; a fit of L(N, D) (5 parameters) needs "
                          "more: finish more runs or fix their losses")
    return kept


def _interval(samples: list[float], value: float) -> dict:
    finite = np.array([s for s in samples if math.isfinite(s)])
    if len(finite) < 2:
        return {"value": value, "low": math.nan, "high": math.nan}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"value": value, "low": float(low), "high": float(high)}


def _band(curves: list[np.ndarray]) -> dict:
    """2.5 and 97.5 percentiles of the resamples' curves; a curve with a NaN (a resample's
    law without an optimum) is dropped (an inf, an overflowing valid law, is a band edge)."""
    curves = [curve for curve in curves if not np.isnan(curve).any()]
    if len(curves) < 2:
        return {"low": [], "high": []}
    # percentile interpolates between neighbours, inf - inf is NaN: take inf as the largest
    # float there and give it back as inf
    largest = np.finfo(float).max
    low, high = np.percentile(np.minimum(np.array(curves), largest), [2.5, 97.5], axis=0)
    low, high = (np.where(edge >= largest, np.inf, edge) for edge in (low, high))
    return {"low": low.tolist(), "high": high.tolist()}


def _resample_within(budgets: Budgets, rng: np.random.Generator) -> tuple[np.ndarray, Budgets]:
    """Bootstrap indices drawn within each budget, and the budgets over the new indices."""
    picks, regrouped, start = [], [], 0
    for budget, index in budgets:
        chosen = rng.choice(index, size=len(index), replace=True)
        picks.append(chosen)
        regrouped.append((budget, np.arange(start, start + len(chosen))))
        start += len(chosen)
    return np.concatenate(picks), regrouped


def _with_loss_law(fitted: dict) -> dict:
    """`fitted` with g, log_kL of the power law through its minima's losses and that law's
    log residuals (observed - fitted)."""
    C = np.array([m["C"] for m in fitted["minima"]])
    best = np.array([m["loss"] for m in fitted["minima"]])
    g, log_kl = fit_power_law(C, best)
    residuals = np.log(best) - (log_kl + g * np.log(C))
    return {**fitted, "g": g, "log_kL": log_kl, "loss_log_residuals": residuals.tolist()}


def _isoflop_approach(fitter: IsoflopFitter, budgets: Budgets, N: np.ndarray, D: np.ndarray,
                      L: np.ndarray, names: list[str], bootstrap: int,
                      rng: np.random.Generator) -> dict:
    """Fit approach 1 or 2 (`fitter`), then its bootstrap: intervals on a, b and g, bands
    and samples."""
    point = _with_loss_law(fitter(budgets, N, D, L, names))
    samples = []
    bands: dict[str, list[np.ndarray]] = {"N": [], "D": []}
    for _ in range(bootstrap):
        pick, regrouped = _resample_within(budgets, rng)
        try:
            fitted = _with_loss_law(fitter(regrouped, N[pick], D[pick], L[pick],
                                           [names[i] for i in pick]))
        except (ConfigError, np.linalg.LinAlgError):
            continue  # a resample whose budgets all lack a minimum says nothing
        samples.append([fitted[key] for key in ISOFLOP_SAMPLE_COLUMNS])
        # A resample of a flat valley can give a wild exponent whose band overflows to inf:
        # an honest band edge (percentiles take it), not a warning worth printing.
        with np.errstate(over="ignore"):
            bands["N"].append(np.exp(fitted["log_kN"]) * BAND_BUDGETS ** fitted["a"])
            bands["D"].append(np.exp(fitted["log_kD"]) * BAND_BUDGETS ** fitted["b"])
    column = {key: [row[i] for row in samples] for i, key in enumerate(ISOFLOP_SAMPLE_COLUMNS)}
    return {
        "a": _interval(column["a"], point["a"]), "b": _interval(column["b"], point["b"]),
        "log_kN": point["log_kN"], "log_kD": point["log_kD"], "minima": point["minima"],
        "loss_law": {"g": _interval(column["g"], point["g"]), "log_kL": point["log_kL"]},
        "loss_log_residuals": point["loss_log_residuals"],
        "bootstrap": len(samples), "samples": samples,
        "band": {"C": BAND_BUDGETS.tolist(), "N": _band(bands["N"]), "D": _band(bands["D"])},
    }


def _approach3(N: np.ndarray, D: np.ndarray, L: np.ndarray, bootstrap: int,
               rng: np.random.Generator, convention: dict) -> dict:
    point = fit_law(N, D, L)
    values: dict[str, list[float]] = {name: [] for name in (*LAW_PARAMS, "a", "b")}
    bands: dict[str, list[np.ndarray]] = {"N": [], "D": []}
    start = np.array([point["theta"]])
    for _ in range(bootstrap):
        pick = rng.integers(0, len(N), len(N))
        fitted = fit_law(N[pick], D[pick], L[pick], starts=0, extra_starts=start)
        for name in LAW_PARAMS:
            values[name].append(fitted[name])
        # a resample of a flat sweep can fit an exponent <= 0: no optimum, NaN or inf
        # values that the intervals and bands drop, not warnings
        with out_of_range():
            a, b = optimal_exponents(np.float64(fitted["alpha"]), np.float64(fitted["beta"]))
            n_opt, d_opt = law_optimum(fitted, BAND_BUDGETS, convention)
        values["a"].append(a)
        values["b"].append(b)
        bands["N"].append(n_opt)
        bands["D"].append(d_opt)
    a, b = optimal_exponents(point["alpha"], point["beta"])
    return {
        "params": {name: _interval(values[name], point[name]) for name in LAW_PARAMS},
        "a": _interval(values["a"], a), "b": _interval(values["b"], b),
        "huber_objective": point["objective"], "bootstrap": bootstrap,
        "samples": [[values[name][i] for name in LAW_PARAMS] for i in range(bootstrap)],
        "log_residuals": (np.log(L) - np.log(loss(point, N, D))).tolist(),
        "band": {"C": BAND_BUDGETS.tolist(), "N": _band(bands["N"]), "D": _band(bands["D"])},
    }


def fit_table(rows: list[dict], loss_column: str = "loss", bootstrap: int = 200,
              seed: int = 0, budgets: list[float] | None = None,
              budget_tolerance_dex: float = 0.1) -> dict:
    """All three approaches on `rows` (dicts with N, D, `loss_column`, optionally C and
    budget). `budgets` (FLOPs), when given, are the IsoFLOP budgets runs snap to (within
    `budget_tolerance_dex` in log10 C). Returns the fit.json dict. Approaches 1 and 2 are
    left out, with a flag, when the runs do not form 2 or more IsoFLOP budgets with 3 or
    more sizes each; every flag is also raised as a SweepWarning."""
    rows = clean_rows(rows, loss_column)
    N = np.array([row["N"] for row in rows])
    D = np.array([row["D"] for row in rows])
    L = np.array([row[loss_column] for row in rows])
    C = compute(rows)
    names = [str(row.get("run", f"row {i}")) for i, row in enumerate(rows)]
    grouped = group_budgets(rows, budget_tolerance_dex, budgets)
    convention = fit_convention(N, D, C)
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {
        "n_runs": len(rows), "loss_column": loss_column,
        "budgets": [budget for budget, _ in grouped], "budgets_given": budgets,
        "budget_tolerance_dex": budget_tolerance_dex, "flop_convention": convention,
        "law": "L(N, D) = E + A / N^alpha + B / D^beta; approach 3's compute-optimal "
               f"allocation under {convention['formula']}",
        # runs with equal N and D are one point's seeds (scaling/noise.py); None: no repeats
        "noise": seed_noise(N, D, L),
    }
    flags = []
    if "fallback" in convention:
        flags.append(flag("flop_convention", "approach3", convention["fallback"]))
    structure = isoflop_structure(C, N, grouped, budget_tolerance_dex)
    fitters: tuple[tuple[str, IsoflopFitter], ...] = (
        ("approach1", fit_approach1), ("approach2", fit_approach2)
    )
    if structure is not None:
        flags.append(structure)
        fitters = ()
    for name, fitter in fitters:
        try:
            result[name] = _isoflop_approach(fitter, grouped, N, D, L, names, bootstrap, rng)
        except ConfigError as error:
            flags.append(flag("approach_skipped", name, f"{name} skipped: {error}"))
    result["approach3"] = _approach3(N, D, L, bootstrap, rng, convention)
    if structure is None:
        flags += budget_flags(grouped, N, names, result)
    result["flags"] = flags + law_flags(result, float(L.min()))
    for raised in result["flags"]:
        warnings.warn(raised["message"], SweepWarning, stacklevel=2)
    return result


def write_fit(result: dict, out: Path) -> Path:
    """Write `result` to `out/fit.json` (NaN as the string "nan", see `to_json`); return
    the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.json"
    path.write_text(to_json(result, indent=1) + "\n")
    return path


def read_fit(path: Path) -> dict:
    """The fit.json at `path`; raises ConfigError when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"fit={path} does not exist; write it with `sf-sweep fit table=... "
                          "out=DIR` (then fit=DIR/fit.json)")
    return from_json(path.read_text())
