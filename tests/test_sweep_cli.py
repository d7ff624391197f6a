"""sf-sweep as a user runs it, collection of sweep directories, and multirun run dirs."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from commands import run_tool, start_tool
from scaleforge.errors import ConfigError
from scaleforge.launch.sweep import dispatch
from scaleforge.scaling.collect import SweepWarning, collect
from scaleforge.scaling.plots import legend_labels

CHINCHILLA = Path(__file__).parent / "data" / "chinchilla_epoch_2024.csv"
HOFFMANN_BUDGETS = "[6e18,1e19,3e19,6e19,1e20,3e20,6e20,1e21,3e21]"


def _fake_run(root: Path, name: str, loss: float | str | None) -> None:
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "val_loss": 7.0}\n')
    if loss is not None:
        record = {"run": name, "N": 1e5, "D": 1e6, "C": 6e11, "loss": loss, "val_loss": 4.0}
        (run_dir / "scaling.json").write_text(json.dumps(record))


def test_collect_skips_unfinished_failed_and_missing_runs_by_name(tmp_path):
    _fake_run(tmp_path, "C6e11_n0", 4.1)
    _fake_run(tmp_path, "C6e11_n1", None)
    _fake_run(tmp_path, "C6e11_n2", "nan")
    plan = {"settings": {}, "runs": [{"name": f"C6e11_n{i}", "budget": 6e11} for i in range(4)]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.warns(SweepWarning) as caught:
        rows = collect(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "unfinished runs (no scaling.json): C6e11_n1" in messages
    assert "NaN or infinite (diverged): C6e11_n2" in messages
    assert "never started: C6e11_n3" in messages
    assert [(r["run"], r["budget"]) for r in rows] == [("C6e11_n0", 6e11)]


def test_collect_of_a_sweep_without_finished_runs_is_an_error(tmp_path):
    _fake_run(tmp_path, "only", None)
    with pytest.warns(SweepWarning, match="only"), pytest.raises(ConfigError,
                                                                 match="no finished runs"):
        collect(tmp_path)


def test_fit_predict_and_report_on_the_published_chinchilla_runs(tmp_path):
    fit = run_tool("sf-sweep", "fit", f"table={CHINCHILLA}", f"out={tmp_path / 'fit'}",
               "bootstrap=3", "exclude_column=excluded_by_epoch", f"budgets={HOFFMANN_BUDGETS}",
               "budget_tolerance_dex=0.05", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    result = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert result["n_runs"] == 240
    assert result["inputs"] == {  # what report reuses, and what reproduces the fit
        "table": str(CHINCHILLA), "loss_column": "loss", "exclude_column": "excluded_by_epoch",
        "bootstrap": 3, "seed": 0, "budgets": json.loads(HOFFMANN_BUDGETS.replace("e", ".0e")),
        "budget_tolerance_dex": 0.05, "rows": 240}
    law = result["approach3"]["params"]
    assert set(law) == {"E", "A", "B", "alpha", "beta"}
    assert all({"value", "low", "high"} <= set(entry) for entry in law.values())
    for approach in ("approach1", "approach2", "approach3"):
        assert {"value", "low", "high"} <= set(result[approach]["a"])
        assert {"value", "low", "high"} <= set(result[approach]["b"])

    predict = run_tool("sf-sweep", "predict", f"fit={tmp_path / 'fit' / 'fit.json'}", "N=70e9",
                   "D=1.4e12", cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr
    expected = (law["E"]["value"] + law["A"]["value"] / 70e9 ** law["alpha"]["value"]
                + law["B"]["value"] / 1.4e12 ** law["beta"]["value"])
    value, low, high = (float(x) for x in re.findall(r"[\d.]+", predict.stdout))
    assert value == pytest.approx(expected, rel=1e-5) and low < value < high

    optimum = run_tool("sf-sweep", "predict", f"fit={tmp_path / 'fit' / 'fit.json'}",
                       "C=5.76e23", cwd=tmp_path)
    assert optimum.returncode == 0, optimum.stderr
    assert "(C = 6 N D)" in optimum.stdout
    assert re.search(r"N_opt=\S+ \[\S+, \S+\] D_opt=\S+ \[\S+, \S+\]", optimum.stdout)

    # table and exclude_column come from the fit's inputs
    report = run_tool("sf-sweep", "report", f"fit={tmp_path / 'fit' / 'fit.json'}",
                  f"out={tmp_path / 'report'}", "budgets=[5.76e23]",
                  "wandb=offline", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    for name in ("isoflop_curves.png", "optimal_allocation.png", "loss_contours.png",
                 "backtest.png", "backtest.json", "report.md", "report.html"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    # the plots say what the fit says: as many budgets with a parabola minimum (legend)
    # as approach 2 found, and the frontier named only where drawn
    isoflop = legend_labels(tmp_path / "report" / "isoflop_curves.png")
    with_minimum = [label for label in isoflop if "no parabola minimum" not in label]
    assert len(isoflop) == 9 and len(with_minimum) == len(result["approach2"]["minima"])
    contours = legend_labels(tmp_path / "report" / "loss_contours.png")
    assert contours in (["compute-optimal frontier"],
                        ["compute-optimal frontier: outside the runs' range"])
    assert "5.76e+23" in markdown
    assert "Backtest, largest budget held out" in markdown and "11 held-out runs" in markdown
    assert "solved under C = 6 N D" in markdown
    assert list((tmp_path / "report" / "wandb").glob("offline-run-*"))


def test_fit_and_backtest_default_to_the_loss_column_the_sweep_fitted(tmp_path):
    """A table in a sweep directory: its plan.json names the column `sf-sweep run` fitted
    (val_loss here); standalone fit and backtest take it and say so."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    lines = CHINCHILLA.read_text().splitlines()
    (sweep / "runs.csv").write_text("\n".join([lines[0] + ",val_loss"] + [
        f"{line},{float(line.split(',')[3]) + 0.01}" for line in lines[1:]]) + "\n")
    (sweep / "plan.json").write_text(json.dumps({"settings": {"loss_column": "val_loss"},
                                                 "runs": []}))
    fit = run_tool("sf-sweep", "fit", f"table={sweep / 'runs.csv'}", f"out={tmp_path / 'fit'}",
                   "bootstrap=2", "exclude_column=excluded_by_epoch", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "fitting the val_loss column (the sweep's, from" in fit.stdout
    result = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert result["inputs"]["loss_column"] == "val_loss"
    backtest = run_tool("sf-sweep", "backtest", f"table={sweep / 'runs.csv'}", "cutoff=1e21",
                        "bootstrap=2", "exclude_column=excluded_by_epoch", cwd=tmp_path)
    assert backtest.returncode == 0, backtest.stderr[-3000:]
    assert "fitting the val_loss column" in backtest.stdout
    plain = run_tool("sf-sweep", "fit", f"table={CHINCHILLA}", f"out={tmp_path / 'plain'}",
                     "bootstrap=2", "exclude_column=excluded_by_epoch", cwd=tmp_path)
    assert "fitting the loss column (the default: no sweep plan.json" in plain.stdout


def test_backtest_of_the_published_chinchilla_runs_beyond_a_cutoff(tmp_path):
    result = run_tool("sf-sweep", "backtest", f"table={CHINCHILLA}", "cutoff=1e21",
                      "exclude_column=excluded_by_epoch", "bootstrap=5",
                      f"out={tmp_path / 'backtest'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    backtest = json.loads((tmp_path / "backtest" / "backtest.json").read_text())
    assert (tmp_path / "backtest" / "backtest.png").stat().st_size > 0
    approach3 = backtest["approach3"]
    # 23 runs above 1e21 FLOPs (up to 1.3e22), predicted within 3% each (bench/RESULTS.md)
    assert (approach3["n_train"], approach3["n_test"]) == (217, 23)
    assert approach3["mean_rel_error"] < 0.02 and approach3["max_rel_error"] < 0.04
    assert 0 <= approach3["coverage"] <= 1
    # without budgets= the runs are not IsoFLOP groups: approaches 1 and 2 say so
    assert "form no IsoFLOP budgets" in backtest["approach2"]["skipped"]
    assert "approach3: 23 runs, loss error mean" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["fit", "tabel=x.csv"], "tabel=x.csv"),
        (["fit", "table=missing.csv", "out=o"], "table=missing.csv"),
        (["plan", "budgets=1e12"], "budgets='1e12'"),
        (["plan", "budgets=[1e12]", "points_per_budget=2"], "points_per_budget=2"),
        (["collect", "sweep_dir=nowhere"], "sweep_dir=nowhere"),
        (["predict", "fit=nowhere.json", "N=1e9"], "fit=nowhere.json"),
        (["frobnicate"], "give a command"),
        (["check", "budgets=[1e12]"], "check_multiple=0.0"),
        (["backtest", "table=x.csv", "cutoff=1e12"], "table=x.csv"),
    ],
)
def test_bad_arguments_are_config_errors_naming_them(tmp_path, monkeypatch, arguments, named):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(named)):
        dispatch(arguments)


def test_a_bad_argument_stops_sf_sweep_with_one_line(tmp_path):
    result = run_tool("sf-sweep", "fit", "tabel=x.csv", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "tabel=x.csv" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_multirun_jobs_each_get_their_own_run_dir_and_record(tmp_path, stdlib_overrides):
    sweep = tmp_path / "sweep"
    result = run_tool(
        "sf-train", "--multirun", "model=llama_micro", *stdlib_overrides, "data.vocab_size=512",
        "data.seq_len=64", "trainer.micro_batch_size=4", "trainer.global_batch_tokens=256",
        "trainer.max_steps=2,3", "trainer.eval_every=1", "trainer.log_every=1",
        "optim.warmup_steps=1", "trainer.precision=fp32", "trainer.device=cpu",
        "logging.wandb=disabled", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {}
    for job in ("0", "1"):
        record = json.loads((sweep / job / "scaling.json").read_text())
        steps[job] = record["steps"]
        assert record["D"] == record["steps"] * 256 and record["N"] < record["N_total"]
        assert record["C"] > 6 * record["N"] * record["D"]  # exact count includes the LM head
    assert steps == {"0": 2, "1": 3}


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_whole_multirun_after_the_current_jobs_checkpoint(
        tmp_path, stdlib_overrides, signal_number):
    """Hydra would start the next job after a preempted one; the sweep stops instead."""
    sweep = tmp_path / "sweep"
    process = start_tool(
        "sf-train", "--multirun", "model=llama_micro", *stdlib_overrides, "data.vocab_size=512",
        "data.seq_len=64", "trainer.micro_batch_size=4", "trainer.global_batch_tokens=256",
        "trainer.max_steps=100000", "trainer.seed=0,1,2", "trainer.eval_every=0",
        "trainer.log_every=1", "optim.warmup_steps=1", "trainer.precision=fp32",
        "trainer.device=cpu", "logging.wandb=disabled", "logging.progress_bar=false",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    metrics = sweep / "0" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:  # training, past step 0
            break
        time.sleep(0.5)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert "sweep stopped after this job's checkpoint" in stdout
    assert list((sweep / "0" / "checkpoints").glob("step_*"))
    assert not (sweep / "1").exists() and not (sweep / "2").exists()


@pytest.mark.slow
def test_cpu_demo_sweep_runs_end_to_end_on_a_reduced_grid(tmp_path, stdlib_overrides):
    overrides = ",".join([*stdlib_overrides, "data.vocab_size=512", "model.vocab_size=512",
                          "data.seq_len=64", "trainer.micro_batch_size=16",
                          "trainer.global_batch_tokens=1024"])
    result = run_tool("sf-sweep", "run", "plan=chinchilla_cpu", "budgets=[1.2e11,3e11]",
                  "points_per_budget=3", "spread=1.5", "tokens_per_param=20", "bootstrap=5",
                  "wandb=offline",
                  f"overrides=[{overrides}]", f"out={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    fit = json.loads((tmp_path / "sweep" / "fit" / "fit.json").read_text())
    assert fit["n_runs"] == 6 and len(fit["budgets"]) == 2
    assert (tmp_path / "sweep" / "report" / "report.html").is_file()
    assert (tmp_path / "sweep" / "runs.csv").is_file()


def test_collect_gathers_several_sweeps_into_one_table(tmp_path):
    _fake_run(tmp_path / "a", "C6e11_n0", 4.1)
    _fake_run(tmp_path / "b", "C1e12_n0", 3.9)
    out = tmp_path / "all.csv"
    dispatch(["collect", f"sweep_dir=[{tmp_path / 'a'},{tmp_path / 'b'}]", f"out={out}"])
    lines = out.read_text().splitlines()
    assert lines[0].startswith("run,N,D,C,loss") and len(lines) == 3
