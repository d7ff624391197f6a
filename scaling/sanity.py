"""Sanity checks of a fit: each problem found becomes a flag, written into fit.json,
printed on the console and listed in the report, never left for the reader to spot.

A flag is {"check", "approach" (None when it concerns the data), "message"}. Checks:
- exponent_range: a or b of any approach, or the law's alpha or beta, outside (0, 1);
- a_plus_b: approach 1 or 2 with a + b more than A_PLUS_B_TOLERANCE (0.1) from what the
  budgets' FLOP count implies: C = D f(N) along the optimum gives b + s a = 1, s = d log f /
  d log N (1 under 6ND, so a + b = 1; below 1 when the LM head weighs, so a + b > 1);
- interval_spans_zero: the 95% interval of an exponent contains 0, or E's reaches 0 (below
  1% of its value: the data do not pin the irreducible loss);
- grid_edge: a budget's optimum (approach 1: its lowest-loss run; approach 2: the parabola
  minimum) at its smallest or largest model or beyond: the grid does not bracket it;
- too_few_sizes: a budget with fewer than 3 model sizes (approaches 1 and 2 leave it out);
- no_minimum: a budget whose losses curve downward (approach 2 leaves it out);
- no_isoflop_structure: the runs' compute does not cluster into IsoFLOP budgets (a group
  spans more than 2 x budget_tolerance_dex in log10 C); approaches 1 and 2 are skipped and
  the message names the `budgets=` that would group the runs, when some would;
- approach_skipped: approach 1 or 2 could not be fitted, and why;
- flop_convention: the runs' C fits neither 6 N D nor D (6 N + k N^h);
- E_above_min_loss: the law's irreducible loss E exceeds the smallest observed loss.
"""

from __future__ import annotations

import numpy as np

from scaleforge.scaling.flop_convention import log_slope

A_PLUS_B_TOLERANCE = 0.1
MIN_SIZES = 3
# [(budget in FLOPs, indices of its runs)], as group_budgets returns them
Budgets = list[tuple[float, np.ndarray]]


def flag(check: str, approach: str | None, message: str) -> dict:
    """One flag: {"check", "approach", "message"}."""
    return {"check": check, "approach": approach, "message": message}


def suggest_budgets(C: np.ndarray, N: np.ndarray, tolerance_dex: float) -> list[float]:
    """Budgets (FLOPs, 2 significant digits) that group the runs into IsoFLOP curves: runs
    sorted by C are cut into windows at most 2 x `tolerance_dex` wide in log10 C; windows
    with MIN_SIZES or more model sizes give their geometric-mean C."""
    order = np.argsort(C)
    log_c = np.log10(C[order])
    found, start = [], 0
    for stop in range(1, len(order) + 1):
        if stop == len(order) or log_c[stop] - log_c[start] > 2 * tolerance_dex:
            window = order[start:stop]
            if len(np.unique(N[window])) >= MIN_SIZES:
                found.append(float(f"{10 ** np.mean(log_c[start:stop]):.2g}"))
            start = stop
    return found


def isoflop_structure(C: np.ndarray, N: np.ndarray, grouped: Budgets,
                      tolerance_dex: float) -> dict | None:
    """A no_isoflop_structure flag when a group of runs spans more than 2 x `tolerance_dex`
    in log10 C (runs grouped by gaps in C chain across budgets), else None."""
    spans = [(budget, float(np.ptp(np.log10(C[index])))) for budget, index in grouped]
    wide = [(budget, span) for budget, span in spans if span > 2 * tolerance_dex]
    if not wide:
        return None
    described = ", ".join(f"{len(index)} runs around {budget:.3g} FLOPs"
                          for budget, index in grouped
                          if any(budget == w for w, _ in wide))
    suggested = suggest_budgets(C, N, tolerance_dex)
    remedy = (f"give budgets=[{','.join(f'{b:g}' for b in suggested)}] "
              f"budget_tolerance_dex={tolerance_dex:g} to group them"
              if len(suggested) >= 2 else
              "no clustering of their C into budgets with 3 or more sizes exists")
    return flag("no_isoflop_structure", None,
                f"the runs form no IsoFLOP budgets ({described} span up to "
                f"{max(s for _, s in wide):.2f} dex in log10 C, more than 2 x "
                f"budget_tolerance_dex={tolerance_dex:g}): approaches 1 and 2 are skipped; "
                f"{remedy}")


def budget_flags(grouped: Budgets, N: np.ndarray, names: list[str], fit: dict) -> list[dict]:
    """too_few_sizes, no_minimum and grid_edge flags of each budget of `fit`."""
    flags = []
    minima = {name: {m["C"]: m for m in fit[name]["minima"]}
              for name in ("approach1", "approach2") if name in fit}
    for budget, index in grouped:
        runs = ", ".join(names[i] for i in index)
        sizes = np.unique(N[index])
        if len(sizes) < MIN_SIZES:
            flags.append(flag("too_few_sizes", None,
                              f"budget {budget:.3g} FLOPs has {len(sizes)} model size(s) "
                              f"(runs: {runs}); a parabola needs {MIN_SIZES} or more, so "
                              "approaches 1 and 2 leave it out"))
            continue
        if "approach2" in minima and budget not in minima["approach2"]:
            flags.append(flag("no_minimum", "approach2",
                              f"budget {budget:.3g} FLOPs: the losses of runs {runs} curve "
                              "downward (no minimum); approach 2 leaves it out: add models on "
                              "both sides of its best one"))
        for name, by_budget in minima.items():
            minimum = by_budget.get(budget)
            if minimum and not sizes[0] < minimum["N_opt"] < sizes[-1]:
                flags.append(flag("grid_edge", name,
                                  f"budget {budget:.3g} FLOPs: the {name} optimum "
                                  f"N={minimum['N_opt']:.3g} is not inside the sizes run "
                                  f"({sizes[0]:.3g} to {sizes[-1]:.3g}; runs {runs}): widen "
                                  "the grid (spread) or move its centre (tokens_per_param)"))
    return flags


def _exponents(fit: dict) -> list[tuple[str, str, dict]]:
    """(approach, exponent name, interval) of every exponent in `fit`."""
    found = [(name, key, fit[name][key]) for name in ("approach1", "approach2", "approach3")
             if name in fit for key in ("a", "b")]
    return found + [("approach3", key, fit["approach3"]["params"][key])
                    for key in ("alpha", "beta")]


def law_flags(fit: dict, min_loss: float) -> list[dict]:
    """exponent_range, a_plus_b, interval_spans_zero and E_above_min_loss flags of `fit`;
    `min_loss` is the smallest observed loss."""
    flags = []
    for name, key, entry in _exponents(fit):
        if not 0 < entry["value"] < 1:
            flags.append(flag("exponent_range", name,
                              f"{name}: {key} = {entry['value']:.3f} lies outside (0, 1)"))
        if entry["low"] <= 0 <= entry["high"]:
            flags.append(flag("interval_spans_zero", name,
                              f"{name}: the 95% interval of {key}, [{entry['low']:.3f}, "
                              f"{entry['high']:.3f}], contains 0: the data do not fix its sign"))
    for name in ("approach1", "approach2"):
        if name in fit:
            a, total = fit[name]["a"]["value"], fit[name]["a"]["value"] + fit[name]["b"]["value"]
            typical_n = np.exp(np.mean(np.log([m["N_opt"] for m in fit[name]["minima"]])))
            slope = float(log_slope(fit["flop_convention"], np.array([typical_n]))[0])
            expected = 1 - (slope - 1) * a
            if abs(total - expected) > A_PLUS_B_TOLERANCE:
                flags.append(flag("a_plus_b", name,
                                  f"{name}: a + b = {total:.3f}, more than "
                                  f"{A_PLUS_B_TOLERANCE} from {expected:.3f}, what "
                                  f"{fit['flop_convention']['formula']} implies "
                                  "(N_opt and D_opt do not spend the budgets)"))
    E = fit["approach3"]["params"]["E"]
    if E["high"] - E["low"] <= 1e-6 * max(abs(E["value"]), 1e-12) or E["value"] < 0.01 * min_loss:
        flags.append(flag("E_pinned", "approach3",
                          f"approach3: E = {E['value']:.3g} with the 95% interval "
                          f"[{E['low']:.3g}, {E['high']:.3g}]: the fit sits at E's lower "
                          "bound (near 0), where every resample ends too; that interval is "
                          "the search's edge, not a measurement: the runs do not pin the "
                          "irreducible loss"))
    elif E["low"] < 0.01 * E["value"]:
        flags.append(flag("interval_spans_zero", "approach3",
                          f"approach3: the 95% interval of E, [{E['low']:.3g}, {E['high']:.3g}], "
                          "reaches 0: the runs do not pin the irreducible loss"))
    if E["value"] > min_loss:
        flags.append(flag("E_above_min_loss", "approach3",
                          f"approach3: E = {E['value']:.4g} exceeds the smallest observed loss "
                          f"{min_loss:.4g}; the law cannot reach losses already measured"))
    return flags
