"""The report figures and the backtest figure as PNG files (matplotlib, Agg backend: no
display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaleforge.scaling.flop_convention import flops_per_token  # noqa: E402
from scaleforge.scaling.law import law_optimum, law_params, loss  # noqa: E402

APPROACH_COLORS = {"approach1": "tab:green", "approach2": "tab:blue", "approach3": "tab:red"}


def _save(fig: Any, ax: Any, path: Path) -> None:
    """Save the figure, its legend's labels in the PNG's Description (tests read them
    against the fit's text)."""
    labels = ax.get_legend_handles_labels()[1]
    fig.savefig(path, dpi=120, metadata={"Description": "\n".join(labels)})


def legend_labels(path: Path) -> list[str]:
    """The legend labels a plot of this module saved in its PNG."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("Description", "")
    return text.splitlines() if text else []


def budget_minimum(fit: dict, budget: float) -> dict | None:
    """Approach 2's parabola minimum of the budget nearest `budget` (within 0.05 dex: a
    budget regrouped from a table is its runs' mean, not the fit's nominal value), or None
    when that budget had none (the fit text counts the same minima)."""
    minima = fit.get("approach2", {}).get("minima", [])
    distances = [abs(np.log10(m["C"]) - np.log10(budget)) for m in minima]
    if not distances or min(distances) > 0.05:
        return None
    return minima[int(np.argmin(distances))]


def plot_isoflops(fit: dict, curves: list[tuple[float, np.ndarray, np.ndarray]],
                  path: Path) -> Path:
    """Loss against N per IsoFLOP budget, `curves` = [(budget, N, loss)], with approach 2's
    parabola and minimum where the budget has one."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(curves))))
    for color, (budget, N, L) in zip(colors, curves, strict=False):
        minimum = budget_minimum(fit, budget)
        label = f"C = {budget:.2g}" + ("" if minimum else " (no parabola minimum)")
        ax.scatter(N, L, color=color, s=18, label=label)
        if minimum is None:
            ax.plot(np.sort(N), L[np.argsort(N)], color=color, lw=0.6, ls=":")
            continue
        x = np.linspace(np.log(N.min()) - 0.2, np.log(N.max()) + 0.2, 100)
        x = np.linspace(min(x[0], np.log(minimum["N_opt"])), max(x[-1], np.log(minimum["N_opt"])),
                        100)
        ax.plot(np.exp(x), np.polyval(minimum["coef_logN"], x), color=color, lw=1)
        ax.scatter([minimum["N_opt"]], [minimum["loss"]], color=color, marker="*", s=90,
                   edgecolor="black", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss (nats/token)")
    ax.set_title("IsoFLOP curves, approach 2 parabolas (stars: minima)")
    if curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, ax, path)
    plt.close(fig)
    return path


def plot_optimal(fit: dict, budgets: list[float], path: Path) -> Path:
    """N_opt(C) and D_opt(C) of every approach with their 95% bootstrap bands, over the
    fitted budgets and the report `budgets`."""
    fitted = fit.get("budgets", [])
    low = min(fitted + budgets) / 3
    high = max(fitted + budgets) * 3
    C = np.geomspace(low, high, 100)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for column, (ax, key) in enumerate(zip(axes, ("N", "D"), strict=True)):
        for name, color in APPROACH_COLORS.items():
            if name not in fit:
                continue
            entry = fit[name]
            if name == "approach3":
                curve = law_optimum(law_params(fit), C, fit.get("flop_convention"))[column]
            else:
                exponent = entry["a" if key == "N" else "b"]["value"]
                curve = np.exp(entry[f"log_k{key}"]) * C ** exponent
            exponent = entry["a" if key == "N" else "b"]
            ax.plot(C, curve, color=color,
                    label=f"{name}: {key}_opt ~ C^{exponent['value']:.3f}")
            band = entry.get("band", {})
            if band and band[key]["low"]:
                grid = np.array(band["C"])
                inside = (grid >= low) & (grid <= high)
                ax.fill_between(grid[inside], np.array(band[key]["low"])[inside],
                                np.array(band[key]["high"])[inside], color=color, alpha=0.15)
            if "minima" in entry:
                ax.scatter([m["C"] for m in entry["minima"]],
                           [m[f"{key}_opt"] for m in entry["minima"]], color=color, s=15)
        for budget in budgets:
            ax.axvline(budget, color="grey", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, high)
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel("optimal parameters N" if key == "N" else "optimal tokens D")
        ax.legend(fontsize=7)
    fig.suptitle("Compute-optimal allocation with 95% bootstrap bands")
    fig.tight_layout()
    _save(fig, ax, path)
    plt.close(fig)
    return path


def plot_contours(fit: dict, N: np.ndarray, D: np.ndarray, L: np.ndarray, path: Path) -> Path:
    """Contours of approach 3's L(N, D) with the runs overlaid (coloured by their loss) and
    the compute-optimal frontier."""
    params = law_params(fit)
    n_grid = np.geomspace(N.min() / 3, N.max() * 3, 200)
    d_grid = np.geomspace(D.min() / 3, D.max() * 3, 200)
    nn, dd = np.meshgrid(n_grid, d_grid)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    levels = np.quantile(loss(params, nn, dd), np.linspace(0.02, 0.98, 14))
    contours = ax.contour(nn, dd, loss(params, nn, dd), levels=np.unique(levels),
                          cmap="viridis", linewidths=0.8)
    ax.clabel(contours, fontsize=6, fmt="%.2f")
    scatter = ax.scatter(N, D, c=L, cmap="viridis", edgecolor="black", s=22, zorder=3,
                         vmin=min(contours.levels), vmax=max(contours.levels))
    convention = fit.get("flop_convention")
    C = np.geomspace(flops_per_token(convention, N.min()) * D.min(),
                     flops_per_token(convention, N.max()) * D.max(), 50)
    frontier_n, frontier_d = law_optimum(params, C, convention)
    inside = ((frontier_n >= n_grid[0]) & (frontier_n <= n_grid[-1]) & (frontier_d >= d_grid[0])
              & (frontier_d <= d_grid[-1]))
    if inside.any():  # named in the legend only where it is drawn
        ax.plot(frontier_n, frontier_d, color="tab:red", lw=1.5, label="compute-optimal frontier")
    else:
        ax.plot([], [], " ", label="compute-optimal frontier: outside the runs' range")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n_grid[0], n_grid[-1])
    ax.set_ylim(d_grid[0], d_grid[-1])
    ax.set_xlabel("parameters N")
    ax.set_ylabel("tokens D")
    ax.set_title("Approach 3: L(N, D) contours, runs overlaid")
    fig.colorbar(scatter, label="run loss")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, ax, path)
    plt.close(fig)
    return path


def plot_backtest(result: dict, path: Path) -> Path:
    """Predicted against measured loss of a backtest (backtest.py): approach 3's fitted runs
    (grey) and held-out runs with their 95% predictive intervals, and approaches 1 and 2's
    predicted best loss of each held-out budget."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    fitted = np.array(result["approach3"]["fitted"])
    ax.scatter(fitted[:, 0], fitted[:, 1], color="lightgrey", s=12, label="fitted runs")
    shown = [fitted.ravel()]
    for name, marker in (("approach3", "o"), ("approach2", "s"), ("approach1", "^")):
        predictions = result[name].get("predictions", [])
        if not predictions:
            continue
        measured = np.array([p["measured"] for p in predictions])
        predicted = np.array([p["predicted"] for p in predictions])
        bounds = np.array([[p["predicted"] - p["low"], p["high"] - p["predicted"]]
                           for p in predictions]).T
        ax.errorbar(measured, predicted, yerr=np.nan_to_num(bounds), fmt=marker, ms=5,
                    color=APPROACH_COLORS[name], capsize=2,
                    label=f"{name} held out: mean error {result[name]['mean_rel_error']:.1%}")
        shown.append(np.concatenate([measured, predicted]))
    values = np.concatenate(shown)
    line = np.array([values.min(), values.max()])
    ax.plot(line, line, color="black", lw=0.7, ls="--", label="predicted = measured")
    ax.set_xlabel("measured loss (nats/token)")
    ax.set_ylabel("predicted loss (nats/token)")
    ax.set_title(f"Backtest: fitted up to {result['cutoff']:.3g} FLOPs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, ax, path)
    plt.close(fig)
    return path
