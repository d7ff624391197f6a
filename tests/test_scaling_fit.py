"""Scaling-law fits: recovery of known laws from noisy synthetic sweeps, the published
Chinchilla data, predictions and bad input."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from scaleforge.errors import ConfigError
from scaleforge.scaling.collect import SweepWarning
from scaleforge.scaling.fit import fit_table, read_fit, write_fit
from scaleforge.scaling.fit_parametric import fit_law
from scaleforge.scaling.law import law_optimum, optimal_allocation, predict_loss
from scaleforge.scaling.table import read_table

CHINCHILLA = Path(__file__).parent / "data" / "chinchilla_epoch_2024.csv"
HOFFMANN_BUDGETS = [6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21]
TRUE = {"E": 1.8, "A": 450.0, "B": 1800.0, "alpha": 0.34, "beta": 0.37}


def synthetic_rows(noise: float = 0.005, sizes: int = 9, seed: int = 0) -> list[dict]:
    """An IsoFLOP sweep over 5 budgets drawn from TRUE, with log-normal loss noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in np.geomspace(1e18, 1e22, 5):
        n_star, _ = law_optimum(TRUE, budget)
        for N in n_star * np.geomspace(1 / 8, 8, sizes):
            D = budget / (6 * N)
            clean = TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]
            rows.append({"run": f"C{budget:.0e}_N{N:.2e}", "N": N, "D": D, "C": budget,
                         "budget": budget, "loss": clean * math.exp(rng.normal(0, noise))})
    return rows


@pytest.fixture(scope="module")
def synthetic_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SweepWarning)
        return fit_table(synthetic_rows(), bootstrap=8)


def test_approach3_recovers_the_law_from_noisy_synthetic_runs(synthetic_fit):
    params = {k: v["value"] for k, v in synthetic_fit["approach3"]["params"].items()}
    assert params["alpha"] == pytest.approx(TRUE["alpha"], abs=0.03)
    assert params["beta"] == pytest.approx(TRUE["beta"], abs=0.03)
    assert params["E"] == pytest.approx(TRUE["E"], abs=0.05)
    for name, entry in synthetic_fit["approach3"]["params"].items():
        assert entry["low"] <= entry["value"] <= entry["high"], name


def test_approach2_recovers_the_optimal_exponents(synthetic_fit):
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert synthetic_fit["approach2"]["a"]["value"] == pytest.approx(a_true, abs=0.03)
    assert synthetic_fit["approach2"]["b"]["value"] == pytest.approx(1 - a_true, abs=0.03)
    assert len(synthetic_fit["approach2"]["minima"]) == 5


def test_approach1_envelope_follows_the_optimum_within_grid_resolution(synthetic_fit):
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    # the envelope picks grid points (spaced 1.68x in N), so it is coarser than approach 2
    assert synthetic_fit["approach1"]["a"]["value"] == pytest.approx(a_true, abs=0.06)


def test_fit_json_round_trips_and_predicts(tmp_path, synthetic_fit):
    fit = read_fit(write_fit(synthetic_fit, tmp_path))
    assert predict_loss(fit, 1e9, 2e10) == pytest.approx(
        TRUE["E"] + TRUE["A"] / 1e9 ** TRUE["alpha"] + TRUE["B"] / 2e10 ** TRUE["beta"],
        rel=0.01)
    n3, d3, _ = optimal_allocation(fit, 1e21, "approach3")
    n2, d2, _ = optimal_allocation(fit, 1e21, "approach2")
    assert n3 * d3 * 6 == pytest.approx(1e21, rel=1e-6)
    assert n2 == pytest.approx(n3, rel=0.3) and d2 == pytest.approx(d3, rel=0.3)


@pytest.fixture(scope="module")
def chinchilla_rows():
    return [row for row in read_table(CHINCHILLA) if row["excluded_by_epoch"] == 0]


def test_approach3_on_published_chinchilla_runs_matches_the_epoch_refit(chinchilla_rows):
    assert len(chinchilla_rows) == 240
    N, D, L = (np.array([row[c] for row in chinchilla_rows]) for c in ("N", "D", "loss"))
    law = fit_law(N, D, L, starts=8)
    # Besiroglu et al. 2024: E 1.82, A 482, B 2085, alpha 0.348, beta 0.366
    assert law["E"] == pytest.approx(1.82, abs=0.03)
    assert law["alpha"] == pytest.approx(0.348, abs=0.01)
    assert law["beta"] == pytest.approx(0.366, abs=0.01)
    assert law["A"] == pytest.approx(482, rel=0.1) and law["B"] == pytest.approx(2085, rel=0.15)
    n_opt, d_opt = law_optimum(law, 5.76e23)
    assert 15 < d_opt / n_opt < 25  # Chinchilla itself: 1.4T tokens / 70B parameters = 20


def test_isoflop_approaches_on_chinchilla_runs_give_equal_scaling(chinchilla_rows):
    fit = fit_table(chinchilla_rows, bootstrap=0, budgets=HOFFMANN_BUDGETS,
                    budget_tolerance_dex=0.05)
    # Hoffmann et al. table 2: a = 0.50 (approach 1), 0.49 (approach 2)
    assert fit["approach2"]["a"]["value"] == pytest.approx(0.49, abs=0.05)
    assert fit["approach1"]["a"]["value"] == pytest.approx(0.50, abs=0.05)
    assert len(fit["approach2"]["minima"]) == 9


def test_nan_losses_are_dropped_with_a_warning_naming_the_run():
    rows = synthetic_rows(sizes=5)
    rows[3]["loss"] = math.nan
    with pytest.warns(SweepWarning, match=re.escape(rows[3]["run"])):
        fit = fit_table(rows, bootstrap=0)
    assert fit["n_runs"] == len(rows) - 1


def test_a_budget_with_fewer_than_three_sizes_is_named_and_left_out():
    rows = synthetic_rows(sizes=5)
    lonely = [r for r in rows if r["budget"] == rows[0]["budget"]][:2]
    rows = [r for r in rows if r["budget"] != rows[0]["budget"]] + lonely
    with pytest.warns(SweepWarning, match=re.escape(lonely[0]["run"])):
        fit = fit_table(rows, bootstrap=0)
    assert len(fit["approach2"]["minima"]) == 4
    assert [f["check"] for f in fit["flags"]] == ["too_few_sizes"]


def test_too_few_usable_runs_is_an_error():
    rows = synthetic_rows(sizes=3)[:4]
    with pytest.raises(ConfigError, match="usable runs"):
        fit_table(rows, bootstrap=0)
