"""`sf-sweep`'s subcommands over finished runs: collect them into a table, fit scaling laws
to it, predict from a fit, backtest a fit on held-out runs, and report it (launch/sweep.py
dispatches them; scaling/ does the work)."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaleforge.errors import ConfigError
from scaleforge.launch.key_value import required


@dataclass
class CollectSettings:
    """Settings of `collect`: one sweep directory, or several as [DIR,DIR,...]."""

    # The directory sf-sweep plan wrote, or several as [DIR,DIR,...].
    sweep_dir: Any = required("DIR (the directory sf-sweep plan wrote, or [DIR,DIR,...])")
    out: str | None = None  # the table's path; null: runs.csv in the (first) sweep directory


@dataclass(kw_only=True)
class FitInputs:
    """What a fit reads and how it fits it (scaling/fit.py), shared by `fit` and `backtest`."""

    table: str = required("PATH.csv (sf-sweep collect's table)")  # the runs: N, D, losses
    bootstrap: int = 200  # bootstrap resamples behind the intervals
    # The column fitted; null: the one `sf-sweep run` fitted, from the plan.json of the sweep
    # the table sits in, else loss.
    loss_column: str | None = None
    seed: int = 0  # the bootstrap's seed
    # FLOP budgets the runs are grouped under (the nearest one); []: the runs' own budgets
    budgets: list[float] = field(default_factory=list)
    budget_tolerance_dex: float = 0.1  # runs farther than this (log10) from every budget: left out
    # Rows whose column is non-zero are left out (e.g. excluded_by_epoch); null: none.
    exclude_column: str | None = None

    def column(self) -> str:
        """The loss column: `loss_column`, else the sweep's (see its comment); the first call
        prints which and why."""
        if self.loss_column is None:
            from scaleforge.scaling.sweep_files import read_plan

            plan = read_plan(Path(self.table).parent)
            planned = (plan or {}).get("settings", {}).get("loss_column")
            self.loss_column = planned or "loss"
            source = (f"the sweep's, from {Path(self.table).parent / 'plan.json'}" if planned
                      else "the default: no sweep plan.json beside the table")
            print(f"fitting the {self.loss_column} column ({source}; loss_column= to choose)")
        return self.loss_column

    def rows(self) -> list[dict]:
        """The table's runs (N, D and the loss column read) less those whose
        `exclude_column` is non-zero (e.g. excluded_by_epoch)."""
        from scaleforge.scaling.table import read_table

        rows = read_table(Path(self.table), ("N", "D", self.column()))
        if not self.exclude_column:
            return rows
        if self.exclude_column not in rows[0]:
            raise ConfigError(f"exclude_column={self.exclude_column} is not a column of "
                              f"{self.table}")
        return [row for row in rows if not row[self.exclude_column]]


@dataclass(kw_only=True)
class FitSettings(FitInputs):
    """Settings of `fit` (see scaling/fit.py)."""

    out: str = required("DIR")  # where fit.json, the plots and the text go


@dataclass
class PredictSettings:
    """Settings of `predict`: N and D for a loss, or C for a compute-optimal allocation."""

    fit: str = required("DIR/fit.json (sf-sweep fit's result)")  # the fitted law
    N: float | None = None  # non-embedding parameters (with D: the predicted loss)
    D: float | None = None  # training tokens (with N: the predicted loss)
    C: float | None = None  # a compute budget in FLOPs: the compute-optimal N and D
    approach: str = "approach3"  # which fit answers: approach1, approach2 or approach3


@dataclass(kw_only=True)
class BacktestSettings(FitInputs):
    """Settings of `backtest` (see scaling/backtest.py): `cutoff` (FLOPs) or
    `holdout_budgets` (the k largest budgets) picks the held-out runs."""

    out: str | None = None  # where backtest.json and its text go; null: printed only
    cutoff: float | None = None  # runs above this many FLOPs are held out
    holdout_budgets: int | None = None  # the k largest budgets are held out


@dataclass
class ReportSettings:
    """Settings of `report` (see scaling/report.py)."""

    fit: str = required("DIR/fit.json (sf-sweep fit's result)")  # the fitted law
    out: str = required("DIR")  # where the report (markdown, HTML, plots) goes
    # The runs to plot; null: the table the fit read (recorded in fit.json's `inputs`).
    table: str | None = None
    # Compute budgets to predict the optimum for (empty: the report's defaults).
    budgets: list[float] = field(default_factory=list)
    # The loss column; null: the fit's.
    loss_column: str | None = None
    # Rows whose column is non-zero are left out; null: the fit's exclude_column.
    exclude_column: str | None = None
    wandb: str = "auto"  # the report in W&B: auto, online, offline or disabled
    wandb_project: str = "scaleforge-scaling"  # the W&B project of the report


def collect(settings: CollectSettings) -> Path:
    """Gather the finished runs into `<sweep_dir>/runs.csv` (or `out`); return its path.
    `sweep_dir=[a,b]` gathers several sweeps into one table (then `out` is required)."""
    from scaleforge.scaling.collect import collect as collect_runs
    from scaleforge.scaling.table import write_table

    given = settings.sweep_dir
    sweep_dirs = [str(d) for d in given] if isinstance(given, list) else [str(given)]
    if len(sweep_dirs) > 1 and not settings.out:
        raise ConfigError(f"sweep_dir=[{','.join(sweep_dirs)}] names several sweeps; "
                          "give out=PATH.csv")
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for sweep_dir in sweep_dirs:
            rows += collect_runs(Path(sweep_dir))
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    out = Path(settings.out) if settings.out else Path(sweep_dirs[0]) / "runs.csv"
    for path in write_table(rows, out):
        print(f"{len(rows)} finished runs -> {path}")
    return out


def fit(settings: FitSettings) -> Path:
    """Fit approaches 1, 2 and 3 to `table`; write and return `out/fit.json`."""
    from scaleforge.scaling.fit import fit_table, write_fit

    rows = settings.rows()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_table(rows, loss_column=settings.column(),
                           bootstrap=settings.bootstrap, seed=settings.seed,
                           budgets=settings.budgets or None,
                           budget_tolerance_dex=settings.budget_tolerance_dex)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    # What the fit read, so `report` (and a reader) reproduces it without the flags.
    result["inputs"] = {"table": settings.table, "loss_column": settings.column(),
                        "exclude_column": settings.exclude_column, "bootstrap": settings.bootstrap,
                        "seed": settings.seed, "budgets": settings.budgets,
                        "budget_tolerance_dex": settings.budget_tolerance_dex,
                        "rows": len(rows)}
    path = write_fit(result, Path(settings.out))
    law = result["approach3"]["params"]
    print(f"approach 3: L(N, D) = {law['E']['value']:.3f} + {law['A']['value']:.4g} / "
          f"N^{law['alpha']['value']:.3f} + {law['B']['value']:.4g} / D^{law['beta']['value']:.3f}")
    for name in ("approach1", "approach2", "approach3"):
        if name in result:
            a, b = result[name]["a"], result[name]["b"]
            print(f"{name}: N_opt ~ C^{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}], "
                  f"D_opt ~ C^{b['value']:.3f} [{b['low']:.3f}, {b['high']:.3f}]")
    print(f"approach 3's optimum under {result['flop_convention']['formula']}")
    print(f"{len(result['flags'])} sanity flag(s) (above as warnings; in fit.json `flags`)")
    noise = result["noise"]
    print(f"seed-to-seed noise: {noise['rel_std']:.2%} of the loss ({noise['points']} points, "
          f"{noise['runs']} runs)" if noise else
          "seed-to-seed noise: not measured (no point has 2 seeds; seeds_per_point=2 or more)")
    print(f"fit -> {path}")
    return path


def with_interval(entry: dict, fmt: str) -> str:
    """`value [low, high]` of a fit result's entry, each formatted with `fmt`."""
    return f"{entry['value']:{fmt}} [{entry['low']:{fmt}}, {entry['high']:{fmt}}]"


def predict(settings: PredictSettings) -> None:
    """Print the loss of (N, D), or the compute-optimal N, D and loss of budget C, each with
    its 95% bootstrap interval (predictive for losses; see scaling/intervals.py)."""
    from scaleforge.scaling.fit import read_fit
    from scaleforge.scaling.intervals import allocation_intervals, loss_interval

    result = read_fit(Path(settings.fit))
    if settings.N is not None and settings.D is not None:
        print(f"loss={with_interval(loss_interval(result, settings.N, settings.D), '.6f')}")
        return
    if settings.C is not None:
        best = allocation_intervals(result, settings.C, settings.approach)
        n_opt, d_opt = best["N_opt"]["value"], best["D_opt"]["value"]
        units = (result["flop_convention"]["formula"] if settings.approach == "approach3"
                 else "the budgets' FLOPs")
        print(f"C={settings.C:.4g} ({units}): N_opt={with_interval(best['N_opt'], '.4g')} "
              f"D_opt={with_interval(best['D_opt'], '.4g')} tokens/param={d_opt / n_opt:.1f} "
              f"loss={with_interval(best['loss'], '.4f')}")
        return
    raise ConfigError("predict needs N=... and D=... (a loss), or C=... (a compute-optimal "
                      "allocation)")


def backtest(settings: BacktestSettings) -> Path | None:
    """Fit on the runs up to a cutoff, score the predictions of the others, print them and
    write `out/backtest.json` and `out/backtest.png`; return the json's path (None without
    `out`)."""
    from scaleforge.scaling.backtest import backtest as run_backtest
    from scaleforge.scaling.backtest import summary_lines, write_backtest

    rows = settings.rows()
    result = run_backtest(rows, settings.column(), settings.cutoff,
                          settings.holdout_budgets, settings.bootstrap, settings.seed,
                          settings.budgets or None, settings.budget_tolerance_dex)
    for raised in result["flags"]:
        print(f"warning: fit up to the cutoff: {raised['message']}", file=sys.stderr)
    print("\n".join(summary_lines(result)))
    if not settings.out:
        return None
    paths = write_backtest(result, Path(settings.out))
    for path in paths:
        print(f"backtest -> {path}")
    return paths[0]


def report(settings: ReportSettings) -> None:
    """Write the plots, the markdown/HTML summary and the W&B report of a fit."""
    from scaleforge.scaling.fit import read_fit
    from scaleforge.scaling.report import write_report

    result = read_fit(Path(settings.fit))
    inputs = result.get("inputs", {})
    table = settings.table or inputs.get("table")
    if not table:
        raise ConfigError(f"report needs table=PATH.csv ({settings.fit} records no table)")
    loss_column = settings.loss_column or inputs.get("loss_column") or "loss"
    exclude_column = settings.exclude_column or inputs.get("exclude_column")
    rows = FitInputs(table=table, loss_column=loss_column, exclude_column=exclude_column).rows()
    paths = write_report(result, rows, Path(settings.out), settings.budgets,
                         loss_column=loss_column, wandb=settings.wandb,
                         wandb_project=settings.wandb_project)
    for path in paths:
        print(f"report -> {path}")
