"""Power laws y = k C^a fitted by least squares in log-log space."""

from __future__ import annotations

import numpy as np


def fit_power_law(C: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, log k) of y = k C^a; C and y positive 1-D arrays of at least 2 points."""
    a, log_k = np.polyfit(np.log(C), np.log(y), 1)
    return float(a), float(log_k)
