"""FLOPs and sizes, the shape rule, IsoFLOP plans, their Hydra files and the SLURM launcher."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

from scaleforge.core.config import compose as compose_config
from scaleforge.core.config import register_configs, to_config, validate
from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.param_count import num_params
from scaleforge.scaling.flops import flops_per_token, model_size
from scaleforge.scaling.plan import (
    plan_budget,
    plan_run,
    plan_sweep,
    predicted_optimal_params,
    run_name,
)
from scaleforge.scaling.shape import (
    ASPECT_RANGE,
    MIN_D_MODEL,
    MIN_HEAD_DIM,
    head_dim_for,
    shape_for_params,
    shaped,
    within_rule,
)
from scaleforge.scaling.sweep_files import multirun_command, read_plan, write_sweep

PRESETS = Path(__file__).parent.parent / "configs" / "sweep_plan"
LLAMA = TransformerConfig(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                          ffn_hidden=192, vocab_size=300, max_seq_len=32)


def test_six_n_and_kaplan_approximations_match_hand_counts():
    # per layer: wq, wo 64x64; wk, wv 64x32; three 64x192 MLP matrices; two RMSNorms
    body = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64) + 64
    total = body + 2 * 300 * 64  # untied token embedding and output matrix
    assert flops_per_token(LLAMA, 32, "6N") == 6 * total
    # Kaplan: 6 N_non-embedding + 6 n_layers n_ctx d_attn
    assert flops_per_token(LLAMA, 32, "6N+attention") == 6 * body + 6 * 2 * 32 * 64
    size = model_size(LLAMA, 32)
    assert (size.params, size.non_embedding_params) == (total, body)
    assert size.flops_per_token == flops_per_token(LLAMA, 32, "exact")
    with pytest.raises(ValueError, match="flops method"):
        flops_per_token(LLAMA, 32, "7N")


@pytest.mark.parametrize("target", np.geomspace(3e4, 1e11, 23).tolist())
def test_shape_rule_lands_within_five_percent_with_valid_heads(target):
    cfg = shape_for_params(target, TransformerConfig(vocab_size=32000, max_seq_len=2048))
    assert abs(num_params(cfg, embeddings=False) / target - 1) <= 0.05
    assert cfg.d_model == cfg.n_heads * head_dim_for(cfg.d_model)
    assert 2 * cfg.d_model <= cfg.ffn_hidden <= 4 * cfg.d_model
    cfg.check()
    if target >= 1e8:  # large models have room for the documented aspect ratio of 64
        assert 32 <= cfg.d_model / cfg.n_layers <= 128


def test_shape_rule_rejects_a_target_below_the_smallest_model():
    with pytest.raises(ConfigError, match="no model shape within the rule's bounds has 1,000 "):
        shape_for_params(1000, TransformerConfig())


@pytest.mark.parametrize("aspect_ratio", [20.0, 200.0])  # the range's ends pull hardest
def test_shape_rule_never_leaves_its_aspect_head_and_width_bounds(aspect_ratio):
    low, high = ASPECT_RANGE
    for target in [1.95e4, *np.geomspace(1.1e4, 1e11, 19)]:  # 1.95e4: in the widest gap
        cfg = shape_for_params(float(target), TransformerConfig(vocab_size=1024),
                               aspect_ratio)
        assert within_rule(cfg), (target, cfg.n_layers, cfg.d_model)
        assert low <= cfg.d_model / cfg.n_layers <= high
        assert cfg.head_size >= MIN_HEAD_DIM and cfg.d_model >= MIN_D_MODEL
        # The nearest in-bounds shape: the widest gap is between one layer of width 32 (at
        # most 16,480 parameters, MLP 4x) and one of width 48 (at least 23,136, MLP 2x), so a
        # target there misses by at most sqrt(23136 / 16480) - 1 = 18.5%.
        assert abs(math.log(num_params(cfg, embeddings=False) / target)) <= math.log(1.185)


def test_aspect_ratio_outside_the_rule_is_one_config_error():
    with pytest.raises(ConfigError, match=r"aspect_ratio=16 is outside the shape rule's range "
                                          r"\[20, 200\]"):
        shape_for_params(1e5, TransformerConfig(), aspect_ratio=16.0)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_no_planned_shape_of_a_sweep_preset_falls_outside_the_rule(preset):
    settings = OmegaConf.load(PRESETS / f"{preset}.yaml")
    base = to_config(compose_config([f"+experiment={settings.experiment}",
                                     *settings.get("overrides", [])]))
    options = {key: settings[key] for key in ("spread", "aspect_ratio", "tokens_per_param",
                                              "min_steps", "seeds_per_point")
               if key in settings}
    runs = plan_sweep(list(settings.budgets), settings.points_per_budget, base, **options)
    if settings.get("check_multiple", 0) > 0:  # the 10x run, at the grid's rule of thumb
        budget = settings.check_multiple * max(settings.budgets)
        target = predicted_optimal_params(budget, settings.get("tokens_per_param", 20.0))
        runs.append(plan_run("check", budget, target, base,
                             aspect_ratio=settings.get("aspect_ratio", 64.0),
                             min_steps=settings.get("min_steps", 20)))
    for run in runs:
        shape = shaped(base.model, run.n_layers, run.d_model, run.ffn_hidden)
        print(f"{run.name}: {run.n_layers} x {run.d_model}, aspect {run.aspect:.1f}, N {run.N:,}")
        assert within_rule(shape), run
        assert run.aspect == run.d_model / run.n_layers


@pytest.fixture(scope="module")
def cpu_base():
    return to_config(compose_config(["+experiment=chinchilla_cpu"]))


def test_isoflop_grid_spends_each_budget_with_a_schedule_matched_to_it(cpu_base):
    budget = 1e12
    runs = plan_budget(budget, 5, cpu_base, spread=3.0)
    batch = cpu_base.trainer.global_batch_tokens
    sizes = np.array([run.N for run in runs])
    ratios = sizes[1:] / sizes[:-1]
    assert np.all(ratios > 1) and np.allclose(np.log(ratios), np.log(3.0) / 2, atol=0.1)
    assert math.sqrt(sizes[0] * sizes[-1]) == pytest.approx(predicted_optimal_params(budget),
                                                            rel=0.1)
    for run in runs:
        assert run.D == run.max_steps * batch
        assert budget - run.flops_per_token * batch < run.C <= budget
        assert run.warmup_steps == max(1, round(0.1 * run.max_steps))
        assert run.N_total > run.N


def test_budget_too_small_for_the_models_names_the_run_and_fix(cpu_base):
    with pytest.raises(ConfigError, match=r"budget 1e\+10 FLOPs is too small.*run C1e10_n0"):
        plan_budget(1e10, 3, cpu_base)
    big_batches = replace(cpu_base, trainer=replace(cpu_base.trainer, global_batch_tokens=65536))
    with pytest.raises(ConfigError, match=r"too small for run C3e11_n.*min_steps=20.*"
                                          "trainer.global_batch_tokens"):
        plan_budget(3e11, 3, big_batches)
    with pytest.raises(ConfigError, match="points_per_budget=2"):
        plan_budget(1e12, 2, cpu_base)


def test_generated_run_configs_compose_into_valid_training_configs(tmp_path, cpu_base):
    runs = plan_budget(1e12, 3, cpu_base)
    write_sweep(tmp_path, runs, cpu_base.model, {"budgets": [1e12]})
    assert [r["name"] for r in read_plan(tmp_path)["runs"]] == [r.name for r in runs]
    argv = multirun_command(tmp_path, runs, "chinchilla_cpu", [], "local")
    assert argv[:2] == ["sf-train", "--multirun"]
    assert f"+sweep_run={','.join(r.name for r in runs)}" in argv
    register_configs()
    with initialize_config_module(config_module="scaleforge.configs", version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "+experiment=chinchilla_cpu", f"+sweep_run={runs[1].name}",
            f"hydra.searchpath=[file://{tmp_path / 'hydra'}]"])
    assert cfg.hydra.sweep.subdir == runs[1].name
    with open_dict(cfg):
        del cfg["hydra"]
    config = to_config(cfg)
    validate(config)
    assert (config.model.n_layers, config.model.d_model) == (runs[1].n_layers, runs[1].d_model)
    assert num_params(config.model, embeddings=False) == runs[1].N
    assert config.trainer.max_steps == runs[1].max_steps


def test_slurm_launcher_config_selects_submitit():
    register_configs()
    with initialize_config_module(config_module="scaleforge.configs", version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.timeout_min == 240


def test_run_names_tell_nearby_budgets_apart_and_slurm_adds_the_launcher(tmp_path, cpu_base):
    assert run_name(1e12, 3) == "C1e12_n3"
    assert run_name(1.2e11, 0) == "C1p2e11_n0" != run_name(1e11, 0)
    runs = plan_budget(1e12, 3, cpu_base)
    argv = multirun_command(tmp_path, runs, "chinchilla_cpu", ["optim.lr=1e-3"], "slurm")
    assert "hydra/launcher=slurm" in argv and argv[-1] == "optim.lr=1e-3"
