"""gpu_check.json and gpu_check.md, the GPU proof's report (bench/gpu_check.sh): the steps
as the script records them when each ends, the speed runs (bench/gpu_check.py) and the
table. No torch import, so that recording a step takes no time from the GPU window.

    python -m scaleforge.bench.gpu_report --record OUT_DIR KEY VALUE
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def record_step(out_dir: Path, key: str, value: str) -> None:
    """Add gpu_check.sh's step `key` with its outcome to gpu_check.json (and the table)."""
    path = out_dir / "gpu_check.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.setdefault("steps", {})[key] = value
    _write(report, out_dir)


def write_report(speed: dict[str, Any], out_dir: Path) -> None:
    """The speed report into gpu_check.json (beside the steps gpu_check.sh recorded there)
    and gpu_check.md."""
    path = out_dir / "gpu_check.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report |= {"device": speed["device"], "torch": speed["torch"],
               "rehearsal": speed["plan"]["rehearsal"], "speed": speed}
    _write(report, out_dir)


def _write(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = out_dir / "gpu_check.json.tmp"
    temporary.write_text(json.dumps(report, indent=2))
    temporary.replace(out_dir / "gpu_check.json")
    (out_dir / "gpu_check.md").write_text(markdown_table(report))


def _twin_key(run: dict[str, Any]) -> tuple[bool, str, str]:
    """What a run of ours is compared with torchtitan at: compile, attention, fp8 recipe."""
    return run["compile"], run["attention"], run.get("fp8", "none")


def markdown_table(report: dict[str, Any]) -> str:
    """The steps and the speed runs, each run's ratio to torchtitan at the same compile
    setting, attention kernel and fp8 recipe (else, without fp8, at the same compile
    setting: 'each side's best'; an fp8 run without its torchtitan twin gets no ratio)."""
    lines = [f"Device: {report.get('device', '?')} | torch {report.get('torch', '?')}"
             + (" | CPU rehearsal: CPU numbers, not GPU ones" if report.get("rehearsal")
                else ""), ""]
    lines += [f"- {name}: {value}" for name, value in report.get("steps", {}).items()]
    speed = report.get("speed")
    if not speed:
        return "\n".join(lines) + "\n"
    plan = speed["plan"]
    lines += ["", f"{plan['model']} at seq {plan['seq_len']}, bf16 autocast, {plan['warmup']} "
              f"warm-up steps, {plan['repeats']} x {plan['steps']} timed steps "
              "(tokens/s: median, spread = (max - min) / median)", "",
              "| run | batch | tokens/s | spread | MFU exact | MFU 6N+attn | peak GiB | "
              "vs torchtitan |", "|---|---|---|---|---|---|---|---|"]
    ok = [r for r in speed["runs"] if r.get("status") == "ok"]
    # keyed by compile, attention and fp8 recipe (a record from before fp8 rows: none)
    titan = {_twin_key(r["run"]): r["tokens_per_s"] for r in ok
             if r["run"]["system"] == "torchtitan"}
    best = {c: max(v for (cc, _, f), v in titan.items() if cc == c and f == "none")
            for c, _, fp8 in titan if fp8 == "none"}
    for record in speed["runs"]:
        run = record["run"]
        shape = f"{run['micro_batch_size']} x {run['seq_len']}"
        if record.get("status") != "ok":
            lines.append(f"| {record['name']} | {shape} | {record.get('status')} | | | | | |")
            continue
        ratio = ""
        if run["system"] == "scaleforge" and run["model"] == plan["model"]:
            base = titan.get(_twin_key(run))
            label = "" if base else " (vs its best)"
            if not base and run.get("fp8", "none") == "none":  # fp8: its twin's alone
                base = best.get(run["compile"])
            ratio = f"{record['tokens_per_s'] / base:.3f}{label}" if base else ""
        mfu = [("n/a" if record[k] is None else f"{record[k]:.1%}")
               for k in ("mfu", "mfu_6n_attention")]
        lines.append(f"| {record['name']} | {shape} | {record['tokens_per_s']:,.0f} | "
                     f"{record['spread']:.1%} | {mfu[0]} | {mfu[1]} | "
                     f"{record['peak_memory_gib']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", nargs=3, metavar=("OUT_DIR", "KEY", "VALUE"),
                        required=True, help="record a step in OUT_DIR/gpu_check.json")
    args = parser.parse_args()
    record_step(Path(args.record[0]), args.record[1], args.record[2])


if __name__ == "__main__":
    main()
