"""IsoFLOP sweep plans: for each compute budget, models spaced log-uniformly around the
predicted optimum, each trained for the tokens that spend the budget exactly.

For budget C the predicted compute-optimal size uses Hoffmann's rule of thumb, D = 20 N
and C = 6 N D, so N* = sqrt(C / 120) (N counted without embeddings, which the shape rule
targets); `tokens_per_param` re-centres the grid when a pilot sweep shows the optimum
elsewhere (tiny models, whose LM head dominates their FLOPs, want many more tokens). The
grid spans N* / spread ... N* x spread in `points_per_budget` log-uniform steps. Each
model's tokens are D = C / (exact training FLOPs per token), rounded down to whole
optimizer steps; its warmup is `warmup_fraction` of those steps and its cosine decay ends
on its last step, because a schedule longer than the run biases the fit (Hoffmann et al.
2022, fig. A1). `seeds_per_point` > 1 trains every grid point that many times, replicate r
with the experiment's trainer.seed and data.seed (weights and data order) both moved by
`seed` + r (`seed` moves a whole sweep's seeds, for a second sweep); the fit measures the
seed-to-seed noise from them (scaling/noise.py). A run with seed offset 0 keeps the point's
name; the others are named `<point>_s<seed offset>`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from scaleforge.core.config import Config
from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.scaling.flops import model_size
from scaleforge.scaling.shape import shape_for_params, shaped

if TYPE_CHECKING:
    from typing_extensions import Unpack

TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class PlannedRun:
    """One run of an IsoFLOP grid. Counts: parameters; tokens; FLOPs (exact matmul count)."""

    name: str
    budget: float
    n_layers: int
    d_model: int
    n_heads: int
    ffn_hidden: int
    N: int  # non-embedding parameters (the scaling-law N of this project)
    N_total: int  # every parameter, embeddings included (Hoffmann's count)
    D: int  # training tokens = max_steps x global_batch_tokens
    C: float  # exact training FLOPs = flops_per_token x D
    flops_per_token: float
    max_steps: int
    warmup_steps: int
    eval_every: int
    log_every: int
    aspect: float  # d_model / n_layers (scaling/shape.py keeps it within ASPECT_RANGE)
    trainer_seed: int  # weights' seed (trainer.seed)
    data_seed: int  # data order's seed (data.seed)


class GridOptions(TypedDict, total=False):
    """`plan_budget`'s keyword settings, as `plan_sweep` passes them on."""

    spread: float
    aspect_ratio: float
    warmup_fraction: float
    min_steps: int
    evals_per_run: int
    tokens_per_param: float
    seeds_per_point: int
    seed: int


def predicted_optimal_params(budget: float, tokens_per_param: float = TOKENS_PER_PARAM) -> float:
    """Non-embedding N* of the rule D = tokens_per_param x N under C = 6 N D, for `budget`
    FLOPs (Hoffmann's rule: 20 tokens per parameter)."""
    return math.sqrt(budget / (6 * tokens_per_param))


def run_name(budget: float, index: int, seed: int = 0) -> str:
    """Directory- and Hydra-safe name of the `index`-th model of `budget`: e.g. `C3e12_n2`,
    `C1p2e11_n0` for 1.2e11 (three significant digits, so nearby budgets never share names;
    `p` for the decimal point, which Hydra option names and shells handle badly), with
    `_s<seed>` for a seed offset other than 0 (`C3e12_n2_s1`)."""
    mantissa, exponent = f"{budget:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".").replace(".", "p")
    return f"C{mantissa}e{int(exponent)}_n{index}" + (f"_s{seed}" if seed else "")


def plan_budget(
    budget: float,
    points_per_budget: int,
    base: Config,
    spread: float = 4.0,
    aspect_ratio: float = 64.0,
    warmup_fraction: float = 0.1,
    min_steps: int = 20,
    evals_per_run: int = 5,
    tokens_per_param: float = TOKENS_PER_PARAM,
    seeds_per_point: int = 1,
    seed: int = 0,
) -> list[PlannedRun]:
    """The IsoFLOP grid of one `budget` (FLOPs) for the model/data/trainer settings of
    `base`, each point `seeds_per_point` times (module docstring). Raises ConfigError naming
    the budget and model when a run would have fewer than `min_steps` optimizer steps (the
    budget is too small for that model)."""
    if points_per_budget < 3:
        raise ConfigError(
            f"points_per_budget={points_per_budget}: a parabola needs at least 3 models per "
            "budget; use 3 or more (5 is typical)"
        )
    if seeds_per_point < 1:
        raise ConfigError(f"seeds_per_point={seeds_per_point} must be 1 or more (2 or more "
                          "measure the seed-to-seed noise)")
    if seed < 0:
        raise ConfigError(f"seed={seed} must be 0 or more (it offsets every run's seeds)")
    if spread <= 1:
        raise ConfigError(f"spread={spread} must exceed 1 (the grid spans N*/spread..N*xspread)")
    center = predicted_optimal_params(budget, tokens_per_param)
    targets = center * np.geomspace(1 / spread, spread, points_per_budget)
    return [plan_run(run_name(budget, index, seed + replicate), budget, float(target), base,
                     aspect_ratio=aspect_ratio, warmup_fraction=warmup_fraction,
                     min_steps=min_steps, evals_per_run=evals_per_run,
                     seed=seed + replicate)
            for index, target in enumerate(targets) for replicate in range(seeds_per_point)]


def plan_run(name: str, budget: float, target: float, base: Config,
             aspect_ratio: float = 64.0, warmup_fraction: float = 0.1, min_steps: int = 20,
             evals_per_run: int = 5, seed: int = 0) -> PlannedRun:
    """One run named `name`: the shape-rule model nearest `target` non-embedding
    parameters, trained for the whole steps that spend `budget` FLOPs (exact count), with
    the experiment's trainer and data seeds moved by `seed`. Raises ConfigError naming the
    budget and run when it would have fewer than `min_steps` steps."""
    batch_tokens = base.trainer.global_batch_tokens
    try:
        model = shape_for_params(target, base.model, aspect_ratio)
    except ConfigError as error:
        raise ConfigError(f"budget {budget:.3g} FLOPs is too small for the smallest model: "
                          f"run {name} targets {target:,.0f} parameters and {error}") from None
    size = model_size(model, base.data.seq_len)
    steps = int(budget / size.flops_per_token / batch_tokens)
    if steps < min_steps:
        needed = min_steps * batch_tokens * size.flops_per_token
        raise ConfigError(
            f"budget {budget:.3g} FLOPs is too small for run {name} "
            f"({size.non_embedding_params:,} non-embedding parameters, "
            f"{size.flops_per_token:.3g} FLOPs/token): it buys "
            f"{steps} steps of {batch_tokens:,} tokens, fewer than min_steps={min_steps}; "
            f"raise the budget to at least {needed:.2g} or lower trainer.global_batch_tokens"
        )
    tokens = steps * batch_tokens
    return PlannedRun(
        name=name, budget=budget, n_layers=model.n_layers, d_model=model.d_model,
        n_heads=model.n_heads, ffn_hidden=model.mlp_hidden, N=size.non_embedding_params,
        N_total=size.params, D=tokens,
        C=size.flops_per_token * tokens, flops_per_token=size.flops_per_token,
        max_steps=steps, warmup_steps=max(1, round(warmup_fraction * steps)),
        eval_every=max(1, steps // evals_per_run), log_every=max(1, steps // 50),
        aspect=model.d_model / model.n_layers,
        trainer_seed=base.trainer.seed + seed, data_seed=base.data.seed + seed,
    )


def plan_sweep(budgets: list[float], points_per_budget: int, base: Config,
               **options: Unpack[GridOptions]) -> list[PlannedRun]:
    """The IsoFLOP grids of every budget in `budgets` (FLOPs), in order; `options` as
    `plan_budget`'s keywords."""
    if not budgets:
        raise ConfigError("budgets=[] is empty; give one or more FLOP budgets, e.g. [1e12,3e12]")
    return [run for budget in budgets for run in plan_budget(budget, points_per_budget, base,
                                                             **options)]


def run_overrides(run: PlannedRun, base_model: TransformerConfig) -> dict:
    """The config values one planned run sets over the experiment (a nested dict, as the
    generated Hydra config group file holds them)."""
    model = shaped(base_model, run.n_layers, run.d_model, run.ffn_hidden)
    shape_fields = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden")
    return {
        "model": {"name": run.name, **{key: getattr(model, key) for key in shape_fields}},
        "trainer": {"max_steps": run.max_steps, "eval_every": run.eval_every,
                    "log_every": run.log_every, "seed": run.trainer_seed},
        "data": {"seed": run.data_seed},
        "optim": {"warmup_steps": run.warmup_steps},
    }


def as_rows(runs: list[PlannedRun]) -> list[dict]:
    """The plan as table rows (one dict per run)."""
    return [asdict(run) for run in runs]
