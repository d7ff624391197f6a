"""FLOPs and sizes, the shape rule, IsoFLOP plans, their Hydra files and the SLURM launcher."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from scaleforge.core.config import compose as compose_config
from scaleforge.core.config import register_configs, to_config, validate
from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.param_count import num_params
from scaleforge.scaling.flops import flops_per_token, model_size
from scaleforge.scaling.plan import plan_budget, predicted_optimal_params, run_name
from scaleforge.scaling.shape import head_dim_for, shape_for_params
from scaleforge.scaling.sweep_files import multirun_command, read_plan, write_sweep

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
    with pytest.raises(ConfigError, match="non-embedding parameters within 5%"):
        shape_for_params(1000, TransformerConfig())


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
