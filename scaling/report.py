"""The report of a fit: PNG plots, a markdown and an HTML summary, and a W&B run holding
the same tables and images (offline when no credentials exist).

Every report lists the fit's sanity flags (sanity.py), names the FLOP count approach 3's
optimum is solved under, and backtests the runs it was given: the law refitted without the
largest budget predicts that budget's runs (backtest.py, written beside the report as
backtest.json and backtest.png), so the report says how well its law extrapolated one
budget, or why it could not be backtested.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Literal

import numpy as np

from scaleforge.core.metrics import wandb_mode
from scaleforge.errors import ConfigError
from scaleforge.scaling.backtest import backtest, summary_lines, write_backtest
from scaleforge.scaling.budgets import group_budgets
from scaleforge.scaling.fit import LAW_PARAMS, clean_rows
from scaleforge.scaling.law import optimal_allocation
from scaleforge.scaling.plots import plot_contours, plot_isoflops, plot_optimal

DEFAULT_BUDGETS = [1e19, 1e21, 5.76e23, 1e25]


def _ci(entry: dict, fmt: str) -> str:
    if not (math.isfinite(entry["low"]) and math.isfinite(entry["high"])):  # no bootstrap
        return f"{entry['value']:{fmt}}"
    return f"{entry['value']:{fmt}} [{entry['low']:{fmt}}, {entry['high']:{fmt}}]"


def summary_tables(fit: dict, budgets: list[float]) -> dict[str, tuple[list[str], list[list]]]:
    """The report's tables as (columns, rows): the law's parameters, the exponents of each
    approach and the compute-optimal allocation at `budgets`."""
    law = fit["approach3"]["params"]
    params = (["parameter", "value [95% CI]"],
              [[name, _ci(law[name], ".4g")] for name in LAW_PARAMS])
    exponents = (["approach", "a (N_opt ~ C^a) [95% CI]", "b (D_opt ~ C^b) [95% CI]",
                  "bootstrap samples"],
                 [[name, _ci(fit[name]["a"], ".3f"), _ci(fit[name]["b"], ".3f"),
                   fit[name]["bootstrap"]]
                  for name in ("approach1", "approach2", "approach3") if name in fit])
    optimal_rows = []
    for budget in budgets:
        n3, d3, loss3 = optimal_allocation(fit, budget, "approach3")
        row = [f"{budget:.3g}", f"{n3:.3g}", f"{d3:.3g}", f"{d3 / n3:.1f}", f"{loss3:.4f}"]
        for name in ("approach1", "approach2"):
            row.append(f"{optimal_allocation(fit, budget, name)[0]:.3g}" if name in fit else "-")
        optimal_rows.append(row)
    optimal = (["C (FLOPs)", "N_opt", "D_opt", "D/N", "loss (approach 3)", "N_opt approach 1",
                "N_opt approach 2"], optimal_rows)
    return {"law": params, "exponents": exponents, "compute_optimal": optimal}


def _html_line(line: str) -> str:
    """One markdown line of the checks section as HTML (a heading, an image, a paragraph)."""
    if line.startswith("## "):
        return f"<h2>{html.escape(line[3:])}</h2>"
    if line.startswith("!["):
        name = line[line.index("(") + 1:-1]
        return f"<p><img src='{html.escape(name)}' alt='backtest'></p>"
    return f"<p>{html.escape(line)}</p>"


def _markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(columns: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


TITLES = {"law": "Approach 3: L(N, D) = E + A / N^alpha + B / D^beta",
          "exponents": "Compute-optimal exponents", "compute_optimal":
          "Compute-optimal allocation (N, D from approach 3 under the budgets' FLOP count)"}


def checks_section(fit: dict, rows: list[dict], loss_column: str, out: Path) -> tuple[
        list[str], list[Path]]:
    """The report's text on how far to trust the law (markdown lines: FLOP convention,
    sanity flags, leave-largest-budget-out backtest) and the backtest files written."""
    convention = fit["flop_convention"]
    lines = ["## How far to trust this law", "",
             f"Approach 3's optimum is solved under {convention['formula']}"
             + (f" (fitted to the runs' C; largest error {convention['max_rel_error']:.1%})"
                if convention["kind"] == "fitted" else "") + ".", "",
             f"Sanity flags ({len(fit['flags'])}):", ""]
    lines += [f"- {raised['message']}" for raised in fit["flags"]] or ["- none"]
    lines += ["", "Backtest, largest budget held out:", ""]
    try:
        result = backtest(rows, loss_column, holdout_budgets=1,
                          bootstrap=fit["approach3"]["bootstrap"], budgets=fit["budgets_given"],
                          budget_tolerance_dex=fit["budget_tolerance_dex"])
    except ConfigError as error:
        return lines + [f"- not possible: {error}", ""], []
    written = write_backtest(result, out)
    return lines + [f"- {line}" for line in summary_lines(result)] + [
        "", f"![backtest]({written[1].name})", ""], written


def write_report(fit: dict, rows: list[dict], out: Path, budgets: list[float],
                 loss_column: str = "loss", wandb: str = "auto",
                 wandb_project: str = "scaleforge-scaling") -> list[Path]:
    """Write plots, report.md and report.html into `out` and log them to W&B (mode
    `wandb`: auto, online, offline or disabled). Returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = budgets or DEFAULT_BUDGETS
    rows = clean_rows(rows, loss_column)
    N, D, L = (np.array([row[c] for row in rows]) for c in ("N", "D", loss_column))
    groups = group_budgets(rows, fit.get("budget_tolerance_dex", 0.1), fit["budgets"])
    plots = [
        plot_isoflops(fit, [(budget, N[index], L[index]) for budget, index in groups],
                      out / "isoflop_curves.png"),
        plot_optimal(fit, budgets, out / "optimal_allocation.png"),
        plot_contours(fit, N, D, L, out / "loss_contours.png"),
    ]
    tables = summary_tables(fit, budgets)
    intro = (f"{fit['n_runs']} runs, fitted on `{loss_column}`; budgets "
             f"{', '.join(f'{b:.3g}' for b in fit['budgets'])} FLOPs.")
    markdown = ["# Scaling-law report", "", intro, ""]
    page = [f"<html><head><meta charset='utf-8'><title>Scaling-law report</title></head><body>"
            f"<h1>Scaling-law report</h1><p>{html.escape(intro)}</p>"]
    for key, (columns, table_rows) in tables.items():
        markdown += [f"## {TITLES[key]}", "", _markdown_table(columns, table_rows), ""]
        page.append(f"<h2>{html.escape(TITLES[key])}</h2>{_html_table(columns, table_rows)}")
    checks, backtest_files = checks_section(fit, rows, loss_column, out)
    markdown += checks
    page += [_html_line(line) for line in checks if line]
    for plot in plots:
        markdown += [f"![{plot.stem}]({plot.name})", ""]
        page.append(f"<p><img src='{plot.name}' alt='{plot.stem}'></p>")
    (out / "report.md").write_text("\n".join(markdown))
    (out / "report.html").write_text("".join(page) + "</body></html>\n")
    written = plots + backtest_files + [out / "report.md", out / "report.html"]
    match wandb_mode(wandb, "wandb"):
        case "disabled":
            pass
        case "online" | "offline" | "shared" as mode:
            _log_to_wandb(out, mode, wandb_project, tables, plots, rows)
    return written


def _log_to_wandb(out: Path, mode: Literal["online", "offline", "shared"], project: str,
                  tables: dict, plots: list[Path], rows: list[dict]) -> None:
    import wandb

    run = wandb.init(project=project, dir=str(out), mode=mode, job_type="scaling-report")
    logged: dict[str, wandb.Table | wandb.Image] = {
        key: wandb.Table(columns=columns, data=[[str(c) for c in row] for row in data])
        for key, (columns, data) in tables.items()
    }
    columns = list(dict.fromkeys(key for row in rows for key in row))
    logged["runs"] = wandb.Table(columns=columns,
                                 data=[[row.get(c) for c in columns] for row in rows])
    logged.update({plot.stem: wandb.Image(str(plot)) for plot in plots})
    run.log(logged)
    run.finish()
