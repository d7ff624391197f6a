"""Backtests: fit the law on the runs up to a compute cutoff, predict the bigger runs held
out, and measure how far off the predictions were.

The split: `cutoff` (FLOPs) trains on the runs with C <= cutoff and holds out the rest;
`holdout_budgets=k` sets the cutoff just below the smallest run of the k largest budgets,
so their runs, and any run above them, are held out. Per approach:
- loss: approach 3 predicts every held-out run's loss at its (N, D); approaches 1 and 2
  predict each held-out budget's best loss (their power law of the budgets' best losses,
  fit.py `loss_law`), compared with that budget's measured best (approach 1: its
  lowest-loss run; approach 2: its parabola minimum). `mean_rel_error` and `max_rel_error`
  are of |predicted / measured - 1|; `coverage` is the fraction of measured losses inside
  their 95% predictive interval (intervals.py); `n_test` counts those predictions (runs
  for approach 3, budgets for 1 and 2) and `n_train` the runs fitted.
- optimum: at each held-out budget with 3 or more sizes whose losses give a parabola
  minimum, the predicted N_opt and D_opt against that minimum: relative errors, and
  whether the minimum lies inside the predicted 95% interval (for a law without an
  optimum, alpha or beta <= 0, one entry with `skipped` saying so instead).
Held-out groups are used for budget-level comparisons only when they are IsoFLOP budgets
(compute within 2 x budget_tolerance_dex); the fit's own sanity flags come along in `flags`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from scaleforge.core.metrics import to_json
from scaleforge.errors import ConfigError
from scaleforge.scaling.budgets import compute, group_budgets
from scaleforge.scaling.fit import clean_rows, fit_table
from scaleforge.scaling.fit_isoflop import isoflop_minima
from scaleforge.scaling.intervals import allocation_intervals, loss_interval
from scaleforge.scaling.law import law_params, loss
from scaleforge.scaling.noise import noise_sentence
from scaleforge.scaling.plots import plot_backtest

APPROACHES = ("approach1", "approach2", "approach3")


def held_out(C: np.ndarray, grouped: list[tuple[float, np.ndarray]], cutoff: float | None,
             holdout_budgets: int | None) -> tuple[np.ndarray, float]:
    """(mask of the held-out runs, the cutoff in FLOPs: the largest C trained on)."""
    if (cutoff is None) == (holdout_budgets is None):
        raise ConfigError("a backtest needs cutoff=FLOPs (train on runs up to it) or "
                          "holdout_budgets=k (hold out the k largest budgets), one of them")
    if holdout_budgets is not None:
        if not 0 < holdout_budgets < len(grouped):
            raise ConfigError(f"holdout_budgets={holdout_budgets}: the runs form "
                              f"{len(grouped)} budget(s); hold out 1 to {len(grouped) - 1}")
        # runs between or beyond the held-out budgets are held out too
        cutoff = float(np.nextafter(min(C[index].min() for _, index
                                        in grouped[-holdout_budgets:]), 0))
    test = C > cutoff
    if not test.any() or (~test).sum() < 5:
        raise ConfigError(f"the split leaves {(~test).sum()} runs to fit and {test.sum()} to "
                          f"predict (C from {C.min():.3g} to {C.max():.3g} FLOPs); move cutoff= "
                          "so that 5 or more runs lie at or below it and 1 or more above")
    return test, float(C[~test].max())


def _scores(predictions: list[dict], n_train: int) -> dict:
    errors = np.array([abs(p["predicted"] / p["measured"] - 1) for p in predictions])
    inside = [p["inside"] for p in predictions]
    return {"mean_rel_error": float(errors.mean()) if len(errors) else math.nan,
            "max_rel_error": float(errors.max()) if len(errors) else math.nan,
            "n_train": n_train, "n_test": len(predictions),
            "coverage": float(np.mean(inside)) if inside else math.nan,
            "predictions": predictions}


def _scored(measured: float, predicted: dict, **where: float | str) -> dict:
    return {**where, "measured": measured, "predicted": predicted["value"],
            "low": predicted["low"], "high": predicted["high"],
            "inside": bool(predicted["low"] <= measured <= predicted["high"])}


def _test_budgets(rows: list[dict], loss_column: str, budgets: list[float] | None,
                  tolerance: float) -> list[dict]:
    """Held-out IsoFLOP budgets: {C, best (lowest loss), minimum (parabola, or None)}."""
    C = compute(rows)
    N, D, L = (np.array([row[c] for row in rows]) for c in ("N", "D", loss_column))
    names = [str(row.get("run", f"row {i}")) for i, row in enumerate(rows)]
    out = []
    for budget, index in group_budgets(rows, tolerance, budgets):
        if np.ptp(np.log10(C[index])) > 2 * tolerance or len(np.unique(N[index])) < 3:
            continue
        minima = isoflop_minima([(budget, index)], N, D, L, names)
        out.append({"C": budget, "best": float(L[index].min()),
                    "minimum": minima[0] if minima else None})
    return out


def _optimum_errors(fit: dict, name: str, budgets: list[dict]) -> list[dict]:
    out = []
    for budget in budgets:
        if budget["minimum"] is None:
            continue
        try:
            predicted = allocation_intervals(fit, budget["C"], name)
        except ConfigError as error:  # approach 3's law without an optimum (an exponent <= 0)
            out.append({"C": budget["C"], "quantity": "N_opt, D_opt", "skipped": str(error)})
            continue
        for key in ("N_opt", "D_opt"):
            out.append({"C": budget["C"], "quantity": key,
                        "rel_error": predicted[key]["value"] / budget["minimum"][key] - 1,
                        **_scored(budget["minimum"][key], predicted[key])})
    return out


def backtest(rows: list[dict], loss_column: str = "loss", cutoff: float | None = None,
             holdout_budgets: int | None = None, bootstrap: int = 200, seed: int = 0,
             budgets: list[float] | None = None, budget_tolerance_dex: float = 0.1) -> dict:
    """Fit on the runs up to `cutoff` FLOPs (or all but the `holdout_budgets` largest
    budgets) and score the predictions of the others; returns the backtest.json dict."""
    rows = clean_rows(rows, loss_column)
    C = compute(rows)
    grouped = group_budgets(rows, budget_tolerance_dex, budgets)
    test, trained_to = held_out(C, grouped, cutoff, holdout_budgets)
    train_rows = [row for row, out in zip(rows, test, strict=True) if not out]
    test_rows = [row for row, out in zip(rows, test, strict=True) if out]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags are kept in the result
        fit = fit_table(train_rows, loss_column, bootstrap, seed, budgets, budget_tolerance_dex)
    test_budgets = _test_budgets(test_rows, loss_column, budgets, budget_tolerance_dex)
    result: dict = {"cutoff": trained_to, "loss_column": loss_column,
                    "train_budgets": fit["budgets"], "test_budgets": [b["C"] for b in
                                                                      test_budgets],
                    "flop_convention": fit["flop_convention"], "flags": fit["flags"],
                    "noise": fit["noise"]}
    for name in APPROACHES:
        if name not in fit:
            skipped = [f["message"] for f in fit["flags"] if f["approach"] in (name, None)
                       and f["check"] in ("approach_skipped", "no_isoflop_structure")]
            result[name] = {"skipped": "; ".join(skipped), "n_train": len(train_rows),
                            "n_test": 0}
            continue
        if name == "approach3":
            predictions = [_scored(row[loss_column], loss_interval(fit, row["N"], row["D"]),
                                   run=str(row.get("run", "")), N=row["N"], D=row["D"],
                                   C=float(c))
                           for row, c in zip(test_rows, compute(test_rows), strict=True)]
        else:
            predictions = [
                _scored(budget["best"] if name == "approach1" else budget["minimum"]["loss"],
                        allocation_intervals(fit, budget["C"], name)["loss"], C=budget["C"])
                for budget in test_budgets if name == "approach1" or budget["minimum"]]
        result[name] = {**_scores(predictions, len(train_rows)),
                        "optimum": _optimum_errors(fit, name, test_budgets)}
    params = law_params(fit)
    result["approach3"]["fitted"] = [[row[loss_column], float(loss(params, row["N"], row["D"]))]
                                     for row in train_rows]
    return result


def write_backtest(result: dict, out: Path) -> list[Path]:
    """Write `out/backtest.json` and `out/backtest.png` (predicted against measured loss);
    return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "backtest.json"
    path.write_text(to_json(result, indent=1) + "\n")
    return [path, plot_backtest(result, out / "backtest.png")]


def summary_lines(result: dict) -> list[str]:
    """One line per approach: errors, coverage and the optimum's error."""
    lines = [f"backtest: fitted on runs up to {result['cutoff']:.3g} FLOPs, predicting "
             f"{result['approach3']['n_test']} held-out runs"]
    for name in APPROACHES:
        entry = result[name]
        if "skipped" in entry:
            lines.append(f"{name}: not backtested ({entry['skipped'] or 'not fitted'})")
            continue
        unit = "runs" if name == "approach3" else "held-out budget(s)' best loss"
        text = (f"{name}: {entry['n_test']} {unit}, loss error mean "
                f"{entry['mean_rel_error']:.2%} max {entry['max_rel_error']:.2%}, "
                f"{entry['coverage']:.0%} inside the 95% predictive interval")
        if name == "approach3":
            text += f" ({noise_sentence(entry['mean_rel_error'], result.get('noise'))})"
        for point in entry["optimum"]:
            if "skipped" in point:
                text += f"; no optimum at {point['C']:.3g} (the law's exponents)"
                continue
            text += (f"; {point['quantity']} at {point['C']:.3g}: {point['rel_error']:+.1%}"
                     f"{' (inside)' if point['inside'] else ' (outside)'} its interval")
        lines.append(text)
    return lines
