"""`sf-sweep`: plan, run, collect, fit, predict and report Chinchilla scaling sweeps.

    sf-sweep plan budgets=[1e12,3e12,1e13] points_per_budget=5 out=sweeps/demo
    sf-sweep run plan=chinchilla_cpu out=sweeps/cpu      # plan + train + collect + fit + report
    sf-sweep check plan=chinchilla_cpu_check out=sweeps/check  # sweep, fit, then a 10x run
    sf-sweep collect sweep_dir=sweeps/demo               # -> sweeps/demo/runs.csv
    sf-sweep fit table=sweeps/demo/runs.csv out=sweeps/demo/fit
    sf-sweep predict fit=sweeps/demo/fit/fit.json N=1e6 D=2e7
    sf-sweep backtest table=sweeps/demo/runs.csv holdout_budgets=1 out=sweeps/demo/backtest
    sf-sweep report fit=sweeps/demo/fit/fit.json table=sweeps/demo/runs.csv out=sweeps/demo/report

Arguments are key=value (read by launch/key_value.py); lists as [a,b,c]. `plan=NAME` loads
the settings of configs/sweep_plan/NAME.yaml first; key=value arguments override them.
`overrides=[...]` passes sf-train overrides to every run. Errors print one `error:` line
and exit with 2.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scaleforge.errors import ConfigError, exit_on_config_error
from scaleforge.launch.key_value import Handlers, preset, required, run_subcommand


@dataclass
class PlanSettings:
    """Settings of `plan` and `run`: an IsoFLOP grid of model sizes per compute budget
    (scaling/plan.py), trained with an experiment's settings."""

    # A preset of configs/sweep_plan/ whose settings come first (the others override it).
    plan: str | None = preset("sweep_plan")
    # The experiment (configs/experiment/) every run trains with.
    experiment: str = "chinchilla_cpu"
    budgets: list[float] = field(default_factory=list)  # compute budgets in FLOPs, [a,b,...]
    points_per_budget: int = 5  # model sizes per budget (3 or more: a parabola's points)
    # The grid spans N*/spread to N* x spread non-embedding parameters around each budget's
    # N* = sqrt(C / (6 x tokens_per_param)).
    spread: float = 4.0
    # The preferred d_model / n_layers of the planned shapes, inside the shape rule's range
    # [20, 200] (scaling/shape.py: Kaplan et al. 2020's flat region).
    aspect_ratio: float = 64.0
    warmup_fraction: float = 0.1  # each run's warmup as a fraction of its steps
    # Fewest optimizer steps a run may have; a budget too small for it is an error.
    min_steps: int = 20
    evals_per_run: int = 5  # validation evaluations over each run
    tokens_per_param: float = 20.0  # D / N at the grid's centre (Hoffmann's 20)
    # Runs per grid point, each with the weights' and data order's seeds moved by one
    # (trainer.seed and data.seed + seed + r); 2 or more measure the seed-to-seed noise the
    # fit and the check report (scaling/noise.py).
    seeds_per_point: int = 1
    seed: int = 0  # moves every run's seeds: a second sweep of the same plan with seed=10
    launcher: str = "local"  # local (one run after another) or slurm (submitit)
    out: str = "sweeps/sweep"  # the sweep directory: plan, Hydra configs, runs, fit
    overrides: list[str] = field(default_factory=list)  # sf-train overrides for every run
    # Budgets `run` predicts the compute-optimal model for after the fit ([]: its defaults).
    report_budgets: list[float] = field(default_factory=list)
    bootstrap: int = 200  # bootstrap resamples behind the fit's intervals
    loss_column: str = "loss"  # the column `run` fits (loss or val_loss)
    wandb: str = "auto"  # the sweep report in W&B: auto, online, offline or disabled
    # > 0: after the fit, `run` trains one run at check_multiple x the largest budget at
    # approach 3's compute-optimal size and compares its loss with the prediction (`check`)
    check_multiple: float = 0.0


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


def plan(settings: PlanSettings) -> list[str]:
    """Write the sweep directory; print the plan and the multirun command; return its argv."""
    from scaleforge.core.config import compose, to_config
    from scaleforge.scaling.plan import plan_sweep
    from scaleforge.scaling.sweep_files import as_shell, multirun_command, write_sweep

    if settings.launcher not in ("local", "slurm"):
        raise ConfigError(f"launcher={settings.launcher!r} is not local or slurm")
    base = to_config(compose([f"+experiment={settings.experiment}", *settings.overrides]))
    runs = plan_sweep(settings.budgets, settings.points_per_budget, base,
                      spread=settings.spread, aspect_ratio=settings.aspect_ratio,
                      warmup_fraction=settings.warmup_fraction, min_steps=settings.min_steps,
                      evals_per_run=settings.evals_per_run,
                      tokens_per_param=settings.tokens_per_param,
                      seeds_per_point=settings.seeds_per_point, seed=settings.seed)
    out = Path(settings.out)
    write_sweep(out, runs, base.model, asdict(settings))
    _print_shapes(runs)
    argv = multirun_command(out, runs, settings.experiment, settings.overrides,
                            settings.launcher)
    print(f"\nplanned {len(runs)} runs in {out}; train them all with:\n{as_shell(argv)}")
    return argv


def _print_shapes(runs: list[Any]) -> None:
    """One line per planned run (`scaling.plan.PlannedRun`): its shape with its aspect ratio
    (d_model / n_layers), N, D, C and steps."""
    print(f"{'run':<12} {'layers':>6} {'d_model':>7} {'heads':>5} {'aspect':>6} {'N':>10} "
          f"{'N_total':>10} {'D':>11} {'C':>9} {'steps':>6}")
    for run in runs:
        print(f"{run.name:<12} {run.n_layers:>6} {run.d_model:>7} {run.n_heads:>5} "
              f"{run.aspect:>6.1f} {run.N:>10,} {run.N_total:>10,} {run.D:>11,} {run.C:>9.3g} "
              f"{run.max_steps:>6}")


def run(settings: PlanSettings) -> None:
    """Plan, train every run (local multirun, or SLURM and wait), collect, fit and report;
    then, with `check_multiple` > 0, the 10x check (`check`)."""
    sweep(settings)
    if settings.check_multiple > 0:
        check(settings)


def sweep(settings: PlanSettings) -> Path:
    """Plan, train every run, collect, fit and report; return out/fit/fit.json."""
    argv = plan(settings)
    argv[0] = str(Path(sys.executable).parent / "sf-train")
    print("training ...", flush=True)
    returncode, stopped_by = _run_forwarding_signals(argv)
    out = Path(settings.out)
    if stopped_by is not None:
        print(f"sf-sweep run: stopped by {stopped_by} after the current job's checkpoint; "
              f"rerun the same command to continue the sweep in {out}", file=sys.stderr)
        raise SystemExit(0)
    if returncode != 0:
        print(f"warning: sf-train --multirun exited with {returncode}; fitting the "
              "runs that finished", file=sys.stderr)
    table = collect(CollectSettings(sweep_dir=str(out)))
    fit(FitSettings(table=str(table), out=str(out / "fit"), bootstrap=settings.bootstrap,
                    loss_column=settings.loss_column))
    report(ReportSettings(fit=str(out / "fit" / "fit.json"), table=str(table),
                          out=str(out / "report"), budgets=settings.report_budgets,
                          loss_column=settings.loss_column, wandb=settings.wandb))
    return out / "fit" / "fit.json"


def _run_forwarding_signals(argv: list[str]) -> tuple[int, str | None]:
    """Run `argv` (the multirun), passing SIGTERM and SIGINT on to it: its running job saves
    a checkpoint and the multirun stops. Returns (exit status, the signal's name or None)."""
    import signal

    child = subprocess.Popen(argv)
    received: list[str] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, received[0] if received else None


def check(settings: PlanSettings) -> Path:
    """The 10x check: sweep and fit (unless out/fit/fit.json exists: then that fit), predict
    the loss of one run at `check_multiple` x the largest budget, at approach 3's
    compute-optimal N for it, with the law's 95% predictive interval; train it, and compare.
    Writes and returns out/check/check.json: `predicted`, `interval` [low, high], `measured`,
    `error` (predicted / measured - 1), `noise` (the sweep's seed-to-seed relative standard
    deviation, null without seeds_per_point > 1), `below_noise`, `inside`, the run, the
    law's optimum and `plan` (these settings)."""
    from scaleforge.core.config import compose, to_config
    from scaleforge.core.metrics import to_json
    from scaleforge.scaling.collect import collect as collect_runs
    from scaleforge.scaling.fit import read_fit
    from scaleforge.scaling.intervals import allocation_intervals, loss_interval
    from scaleforge.scaling.noise import below_noise, noise_sentence
    from scaleforge.scaling.plan import plan_run, run_name
    from scaleforge.scaling.sweep_files import multirun_command, write_sweep

    if not (settings.check_multiple > 0 and settings.budgets):
        raise ConfigError(f"check_multiple={settings.check_multiple} with budgets="
                          f"{settings.budgets}: give check_multiple > 0 (e.g. 10) and the "
                          "sweep's budgets (or plan=NAME)")
    out = Path(settings.out)
    fit_path = out / "fit" / "fit.json"
    if fit_path.is_file():
        print(f"check: using the sweep's fit {fit_path}")
    else:
        sweep(settings)
    fitted = read_fit(fit_path)
    budget = settings.check_multiple * max(settings.budgets)
    optimum = allocation_intervals(fitted, budget)
    base = to_config(compose([f"+experiment={settings.experiment}", *settings.overrides]))
    planned = plan_run(run_name(budget, 0, settings.seed), budget, optimum["N_opt"]["value"],
                       base, aspect_ratio=settings.aspect_ratio,
                       warmup_fraction=settings.warmup_fraction, min_steps=settings.min_steps,
                       evals_per_run=settings.evals_per_run, seed=settings.seed)
    check_dir = out / "check"
    write_sweep(check_dir, [planned], base.model, asdict(settings))
    argv = multirun_command(check_dir, [planned], settings.experiment, settings.overrides,
                            settings.launcher)
    argv[0] = str(Path(sys.executable).parent / "sf-train")
    predicted = loss_interval(fitted, planned.N, planned.D)
    print(f"check: {settings.loss_column} at {budget:.3g} FLOPs predicted "
          f"{_with_interval(predicted, '.4f')}; training")
    _print_shapes([planned])
    subprocess.run(argv, check=False)
    (row,) = collect_runs(check_dir)
    measured = row[settings.loss_column]
    error = predicted["value"] / measured - 1
    noise = fitted.get("noise")
    result = {"predicted": predicted["value"], "interval": [predicted["low"], predicted["high"]],
              "measured": measured, "error": error,
              "noise": noise["rel_std"] if noise else None,
              "below_noise": below_noise(error, noise),
              "inside": predicted["low"] <= measured <= predicted["high"],
              "loss_column": settings.loss_column, "budget": budget,
              "multiple": settings.check_multiple, "run": row, "law_optimum": optimum,
              "noise_detail": noise, "plan": asdict(settings)}
    path = check_dir / "check.json"
    path.write_text(to_json(result, indent=1) + "\n")
    print(f"check at {budget:.3g} FLOPs: {settings.loss_column} measured {measured:.4f}, "
          f"predicted {_with_interval(predicted, '.4f')}, error {error:+.2%} "
          f"({'inside' if result['inside'] else 'outside'} the interval; "
          f"{noise_sentence(error, noise)}) -> {path}")
    return path


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


def _with_interval(entry: dict, fmt: str) -> str:
    return f"{entry['value']:{fmt}} [{entry['low']:{fmt}}, {entry['high']:{fmt}}]"


def predict(settings: PredictSettings) -> None:
    """Print the loss of (N, D), or the compute-optimal N, D and loss of budget C, each with
    its 95% bootstrap interval (predictive for losses; see scaling/intervals.py)."""
    from scaleforge.scaling.fit import read_fit
    from scaleforge.scaling.intervals import allocation_intervals, loss_interval

    result = read_fit(Path(settings.fit))
    if settings.N is not None and settings.D is not None:
        print(f"loss={_with_interval(loss_interval(result, settings.N, settings.D), '.6f')}")
        return
    if settings.C is not None:
        best = allocation_intervals(result, settings.C, settings.approach)
        n_opt, d_opt = best["N_opt"]["value"], best["D_opt"]["value"]
        units = (result["flop_convention"]["formula"] if settings.approach == "approach3"
                 else "the budgets' FLOPs")
        print(f"C={settings.C:.4g} ({units}): N_opt={_with_interval(best['N_opt'], '.4g')} "
              f"D_opt={_with_interval(best['D_opt'], '.4g')} tokens/param={d_opt / n_opt:.1f} "
              f"loss={_with_interval(best['loss'], '.4f')}")
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


_HANDLERS: Handlers = {
    "plan": (PlanSettings, plan), "run": (PlanSettings, run), "check": (PlanSettings, check),
    "collect": (CollectSettings, collect), "fit": (FitSettings, fit),
    "predict": (PredictSettings, predict), "report": (ReportSettings, report),
    "backtest": (BacktestSettings, backtest),
}


def dispatch(argv: list[str]) -> None:
    """Run the subcommand `argv[0]` with the key=value settings `argv[1:]`."""
    run_subcommand("sf-sweep", _HANDLERS, argv, __doc__ or "")


def main() -> None:
    exit_on_config_error(dispatch, sys.argv[1:])


if __name__ == "__main__":
    main()
