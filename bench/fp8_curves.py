"""The README's FP8 comparison: validation-loss curves of demo runs that differ only in
`trainer.fp8` (none, tensorwise, rowwise; same seed and data), as a table and a PNG.

    python -m scaleforge.bench.fp8_curves RUN_DIR_NONE RUN_DIR_TENSORWISE RUN_DIR_ROWWISE \\
        --out bench/fp8/demo_val_loss.png

Each run directory is an sf-train run's (its metrics.jsonl). The table gives each recipe's
validation loss at every step all three evaluated, and its difference from the first run
(the baseline) in percent; the plot uses matplotlib (a dependency of the package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = ("none (fp32)", "tensorwise", "rowwise")


def val_losses(run_dir: Path) -> dict[int, float]:
    """step -> validation loss of every evaluation the run logged."""
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def comparison_table(curves: list[dict[int, float]]) -> list[str]:
    """Markdown rows: step, each run's validation loss, each fp8 run's difference from the
    baseline (the first curve) in percent; steps every run evaluated."""
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    rows = ["| step | " + " | ".join(LABELS[:len(curves)]) + " | "
            + " | ".join(f"{label} vs none" for label in LABELS[1:len(curves)]) + " |",
            "|---" * (2 * len(curves)) + "|"]
    for step in steps:
        base = curves[0][step]
        losses = " | ".join(f"{curve[step]:.4f}" for curve in curves)
        differences = " | ".join(f"{(curve[step] - base) / base:+.2%}" for curve in curves[1:])
        rows.append(f"| {step} | {losses} | {differences} |")
    return rows


def plot(curves: list[dict[int, float]], out: Path) -> None:
    """The validation-loss curves in one PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, curve in zip(LABELS, curves, strict=False):
        steps = sorted(curve)
        axes.plot(steps, [curve[s] for s in steps], marker="o", label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("validation loss")
    axes.set_title("demo (llama_tiny, CPU): trainer.fp8, same seed")
    axes.legend()
    axes.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path,
                        help="run directories: fp8=none first, then tensorwise, rowwise")
    parser.add_argument("--out", type=Path, default=None, help="PNG of the curves")
    args = parser.parse_args()
    curves = [val_losses(run_dir) for run_dir in args.run_dirs]
    print("\n".join(comparison_table(curves)))
    if args.out is not None:
        plot(curves, args.out)
        print(f"plot -> {args.out}")


if __name__ == "__main__":
    main()
