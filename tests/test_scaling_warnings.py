"""No numpy warnings from fits of ill-conditioned sweeps (issue 31): a bootstrap resample of a
noisy 3-size sweep fits laws with an exponent <= 0 or a diverging coefficient; their inf/NaN
optima and losses are dropped from the intervals and bands, silently."""

from __future__ import annotations

import math
import warnings

import numpy as np

from scaleforge.scaling.fit import fit_table
from scaleforge.scaling.intervals import allocation_intervals, loss_interval
from scaleforge.scaling.law import law_optimum
from test_scaling_noise import seeded_rows


def test_a_law_without_an_optimum_gives_nan_not_a_complex_number():
    law = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": -0.28}
    with np.errstate(all="raise"):
        try:
            law_optimum(law, 1e15)
        except FloatingPointError:
            pass  # numpy's invalid power, not a complex result or a ZeroDivisionError
        else:
            raise AssertionError("the negative base's power raised no floating-point error")
    with np.errstate(invalid="ignore"):
        n_opt, d_opt = law_optimum(law, 1e15)
    assert math.isnan(n_opt) and math.isnan(d_opt)


def test_fit_of_an_ill_conditioned_sweep_warns_nothing_and_drops_the_bad_resamples():
    """10% noise on 3 sizes per budget (seed 3): before, the resamples gave 'overflow in exp',
    'divide by zero' in the law's optimum and then a ZeroDivisionError."""
    rows = seeded_rows(0.1, seeds=1, sizes=3, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit = fit_table(rows, bootstrap=20)
        samples = np.array(fit["approach3"]["samples"])  # E, A, B, alpha, beta
        out_of_range = ~np.isfinite(samples).all(axis=1) | (samples[:, 3:] <= 0).any(axis=1)
        assert out_of_range.any()  # the sweep does give laws outside the range
        for band in fit["approach3"]["band"]["N"].values():
            assert band and not np.isnan(band).any()
        allocation = allocation_intervals(fit, 3e20)
        predicted = loss_interval(fit, 1e7, 1e9)
    for entry in (*allocation.values(), predicted):
        assert all(math.isfinite(entry[key]) for key in ("value", "low", "high")), entry
