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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scaleforge.errors import ConfigError, exit_on_config_error
from scaleforge.launch.key_value import Handlers, preset, run_subcommand
from scaleforge.launch.sweep_analysis import (
    BacktestSettings,
    CollectSettings,
    FitSettings,
    PredictSettings,
    ReportSettings,
    backtest,
    collect,
    fit,
    predict,
    report,
    with_interval,
)


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
          f"{with_interval(predicted, '.4f')}; training")
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
          f"predicted {with_interval(predicted, '.4f')}, error {error:+.2%} "
          f"({'inside' if result['inside'] else 'outside'} the interval; "
          f"{noise_sentence(error, noise)}) -> {path}")
    return path


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
