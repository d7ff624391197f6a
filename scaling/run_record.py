"""The scaling record of one finished run: (N, D, C, final loss, val loss) in its run dir.

`sf-train` writes `run_dir/scaling.json` when training ends, so a run that has it is
finished and one that lacks it is not (`collect` relies on this). The final loss is the
training loss averaged over the logged steps of the last `SMOOTH_FRACTION` of training
(one step's loss is noisy; Hoffmann et al. fit smoothed final training losses); the
validation loss is the last evaluation's (mean over `trainer.eval_batches` batches).
"""

from __future__ import annotations

import math
from pathlib import Path

from scaleforge.core.config import Config
from scaleforge.core.metrics import from_json, to_json
from scaleforge.scaling.flops import model_size

RECORD_FILE = "scaling.json"
SMOOTH_FRACTION = 0.1


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`; NaN/inf, stored as strings, become floats."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [from_json(line) for line in text.splitlines()]


def smoothed_final_loss(records: list[dict], max_steps: int) -> float:
    """Mean training loss of the logged steps in the last SMOOTH_FRACTION of `max_steps`
    (at least the last logged step). NaN when no step logged a loss."""
    logged = [r for r in records if "loss" in r]
    if not logged:
        return math.nan
    start = max_steps * (1 - SMOOTH_FRACTION)
    tail = [r["loss"] for r in logged if r["step"] >= start] or [logged[-1]["loss"]]
    return sum(tail) / len(tail)


def summarize_run(cfg: Config, run_dir: Path) -> dict:
    """The scaling record of the finished run in `run_dir` trained with `cfg`.

    N: non-embedding parameters; N_total: all parameters; N_active: the non-embedding
    parameters a token passes through (a MoE model's active ones; N for a dense model);
    D: tokens trained; C: exact
    training FLOPs (C_6N and C_6N_attention: the approximations); loss, val_loss: nats.
    """
    records = read_metrics(run_dir)
    size = model_size(cfg.model, cfg.data.seq_len)
    tokens = cfg.trainer.max_steps * cfg.trainer.global_batch_tokens
    evaluated = [r["val_loss"] for r in records if "val_loss" in r]
    return {
        "run": Path(run_dir).name,
        "N": size.non_embedding_params,
        "N_total": size.params,
        "N_active": size.active_non_embedding_params,
        "D": tokens,
        "C": size.flops_per_token * tokens,
        "C_6N": size.flops_per_token_6n * tokens,
        "C_6N_attention": size.flops_per_token_6n_attention * tokens,
        "loss": smoothed_final_loss(records, cfg.trainer.max_steps),
        "val_loss": evaluated[-1] if evaluated else math.nan,
        "steps": cfg.trainer.max_steps,
        "n_layers": cfg.model.n_layers,
        "d_model": cfg.model.d_model,
        "n_heads": cfg.model.n_heads,
    }


def write_run_record(cfg: Config, run_dir: Path) -> Path:
    """Write `summarize_run` to `run_dir/scaling.json` (NaN as the string "nan"); return
    the path."""
    path = Path(run_dir) / RECORD_FILE
    path.write_text(to_json(summarize_run(cfg, run_dir), indent=1) + "\n")
    return path
