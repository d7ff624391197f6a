"""The deepseek_v3 family (models/deepseek_v3/): multi-head latent attention with DeepSeekMoE,
converted both ways against transformers' DeepseekV3ForCausalLM on tiny random configs (no
download), counted by sf-plan like a measured step, and trained under tp2 and dp_shard2
like one process."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from scaleforge.errors import ConfigError  # noqa: E402
from scaleforge.models import build, count_parameters, num_params  # noqa: E402
from scaleforge.models.hf import from_hf_state_dict, to_hf_model, to_hf_state_dict  # noqa: E402
from scaleforge.models.hf_config import from_hf_config, to_hf_config  # noqa: E402
from test_hf import SEQ, VOCAB, max_logit_difference, randomize  # noqa: E402

TOLERANCE = 1e-4  # max abs logit difference, fp32 (the bound)
TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1,
            norm_topk_prob=True, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, vocab_size=VOCAB, max_position_embeddings=SEQ, rms_norm_eps=1e-6,
            rope_interleave=False, tie_word_embeddings=False, bos_token_id=None,
            eos_token_id=None)
Q_LORA = {"with-q-latent": 32, "without": None}


def hf_deepseek_v3(q_lora_rank: int | None, **overrides) -> DeepseekV3ForCausalLM:
    """A random tiny DeepSeek-V3: the expert bias nonzero, so routing reads it."""
    torch.manual_seed(0)
    model = randomize(DeepseekV3ForCausalLM(DeepseekV3Config(
        **(TINY | {"q_lora_rank": q_lora_rank} | overrides))))
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers[1:]:
        bias = layer.mlp.gate.e_score_correction_bias
        bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("q_lora_rank", Q_LORA.values(), ids=Q_LORA.keys())
def test_hf_deepseek_v3_loaded_into_ours_gives_the_same_logits(q_lora_rank):
    hf_model = hf_deepseek_v3(q_lora_rank)
    cfg = from_hf_config(hf_model.config)
    assert (cfg.family, cfg.mla.q_lora_rank) == ("deepseek_v3", q_lora_rank or 0)
    assert (cfg.moe.num_experts, cfg.moe.first_dense_layers, cfg.moe.score_func) == (
        4, 1, "sigmoid")
    model = build(cfg)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), cfg))
    assert count_parameters(model) == num_params(cfg) == hf_model.num_parameters()
    assert max_logit_difference(model.eval(), hf_model, VOCAB) <= TOLERANCE


@pytest.mark.parametrize("q_lora_rank", Q_LORA.values(), ids=Q_LORA.keys())
def test_our_deepseek_v3_exported_to_hf_gives_the_same_logits(q_lora_rank):
    cfg = from_hf_config(hf_deepseek_v3(q_lora_rank).config)
    torch.manual_seed(0)
    model = randomize(build(cfg))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.1)
    theirs = to_hf_model(model.state_dict(), cfg)
    assert isinstance(theirs, DeepseekV3ForCausalLM)
    assert max_logit_difference(model, theirs, VOCAB) <= TOLERANCE


def test_state_dict_and_config_round_trips_are_exact():
    hf_model = hf_deepseek_v3(32)
    cfg = from_hf_config(hf_model.config)
    theirs = hf_model.state_dict()
    again = to_hf_state_dict(from_hf_state_dict(theirs, cfg), cfg)
    assert again.keys() == theirs.keys()
    assert all(torch.equal(again[name], theirs[name]) for name in theirs)
    assert from_hf_config(to_hf_config(cfg)) == cfg


@pytest.mark.parametrize(("setting", "value"), [
    ("rope_interleave", True), ("routed_scaling_factor", 2.5), ("topk_group", 1),
])
def test_what_our_block_does_not_compute_is_refused_by_name(setting, value):
    overrides = {setting: value} | ({"n_group": 2} if setting == "topk_group" else {})
    with pytest.raises(ConfigError, match=setting):
        from_hf_config(DeepseekV3Config(**(TINY | {"q_lora_rank": 32} | overrides)))


def test_the_671b_preset_counts_the_papers_parameters():
    """DeepSeek-V3's 671B total and 37B active (arXiv 2412.19437, without its
    multi-token-prediction module)."""
    from scaleforge.core.config import compose, to_config

    cfg = to_config(compose(["model=deepseek_v3_671b"])).model
    assert num_params(cfg) == 671_026_404_352
    assert num_params(cfg, active=True) == 37_552_282_624


def test_the_tiny_preset_builds_and_the_gqa_settings_are_refused():
    from scaleforge.core.config import compose, to_config

    cfg = to_config(compose(["model=deepseek_v3_tiny"])).model
    assert count_parameters(build(cfg, "meta")) == num_params(cfg)
    cfg.n_kv_heads = 2
    with pytest.raises(ConfigError, match="model.n_kv_heads=2: the deepseek_v3 family"):
        cfg.check("model")


def test_sf_plan_counts_latent_attention_like_a_measured_step():
    """sf-plan's bytes of deepseek_v3_tiny's attention in dense blocks (bench/plan_memory.py's
    step: 4 blocks at d_model 128, 4 micro-batches of 2 x 64 tokens, fp32) against one
    measured step: parameters, gradients and optimizer state exact; activations, counted
    tensor by tensor by the family's spec (the latent norms whole on every rank, the value
    padded to the query width), within 1% of autograd's saved tensors (measured 2026-12-07:
    0.05% under, the norms' rstd rounding)."""
    from scaleforge.bench.plan_memory import BASE, measure, planned
    from scaleforge.core.config import compose, to_config

    cfg = to_config(compose([*BASE, "model=deepseek_v3_tiny", "model.n_kv_heads=null",
                             "model.moe.num_experts=0"]))
    expected, measured = planned(cfg, 1)[0], measure(cfg, 1)
    for state in ("params", "grads", "optimizer"):
        assert int(expected[state]) == measured[state], state
    assert expected["activations"] == pytest.approx(measured["activations"], rel=0.01)


# Placements under tp2: the heads split (wq_b, wkv_b by rows, wo by columns), the latent
# projections, their norms and the shared RoPE key whole on both ranks.
TP2_PLACEMENTS = {
    "layers.0.attention.wq_a.weight": "(Replicate(),)",
    "layers.0.attention.q_norm.weight": "(Replicate(),)",
    "layers.0.attention.wq_b.weight": "(Shard(dim=0),)",
    "layers.0.attention.wkv_a.weight": "(Replicate(),)",
    "layers.0.attention.kv_norm.weight": "(Replicate(),)",
    "layers.0.attention.wkv_b.weight": "(Shard(dim=0),)",
    "layers.0.attention.wk_rope.weight": "(Replicate(),)",
    "layers.0.attention.wo.weight": "(Shard(dim=1),)",
    "layers.0.feed_forward.w1.weight": "(Shard(dim=0),)",
    "layers.1.feed_forward.router.weight": "(Replicate(),)",
}
SHARDED = {"layers.0.attention.wkv_b.weight": "(Shard(dim=0),)"}  # FSDP by rows
LAYOUTS = {"tp2": (["parallel.tp=2"], TP2_PLACEMENTS),
           "dp_shard2": (["parallel.dp_shard=2"], SHARDED),
           # context parallelism wraps the latent attention's kernel like any other's
           "cp2": (["parallel.cp=2"], SHARDED)}


@pytest.mark.parametrize("layout", ["tp2", "dp_shard2",
                                    pytest.param("cp2", marks=pytest.mark.slow)])
def test_deepseek_v3_trains_under_the_layout_like_one_process_in_fp32(tmp_path, layout):
    """5 steps of deepseek_v3_tiny (MoE layer with the aux-loss-free bias moving) under real
    gloo processes against one process: losses and grad norms within LOSS_RTOL, every weight
    within its Adam bound and the expert biases within the layout tests' tolerances
    (tests/layout_runs.py)."""
    from layout_runs import COMMON, LOSS_RTOL, assert_weights_match, run_layout, train_and_record
    from micro_runs import micro_config
    from scaleforge.models.init import canonical_name

    overrides, placements = LAYOUTS[layout]
    model = ["model=deepseek_v3_tiny"]
    result = run_layout(micro_config(tmp_path / "run", *COMMON, *model, *overrides), 2, 5)
    placed = {canonical_name(name): value for name, value in result["placements"].items()}
    for name, placement in placements.items():
        assert placed[name] == ((2,), placement), name
    single = micro_config(tmp_path / "single", *COMMON, *model)
    reference = train_and_record(single, tmp_path / "single", 5, world_size=1)
    losses = torch.tensor(result["losses"])
    torch.testing.assert_close(losses, torch.tensor(reference["losses"]), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                               torch.tensor(reference["grad_norms"]), rtol=LOSS_RTOL, atol=0)
    assert "layers.1.feed_forward.expert_bias" in result["final"]
    worst = assert_weights_match(result["final"], reference)
    moved = reference["final"]["layers.1.feed_forward.expert_bias"]
    assert moved.abs().sum() > 0  # the aux-loss-free balancing took part
    print(f"{layout}: losses {result['losses']}, largest weight difference / its bound "
          f"{worst:.2f}")


def test_from_hf_prints_the_model_settings_that_rebuild_the_model(tmp_path):
    """sf-convert from-hf's `model.*=...` overrides (model.mla.* and model.moe.* included)
    rebuild the converted config exactly (name and init std aside)."""
    import dataclasses

    from micro_runs import micro_config
    from scaleforge.launch.convert import model_overrides

    cfg = from_hf_config(hf_deepseek_v3(32).config)
    overrides = model_overrides(cfg)
    assert "model.mla.kv_lora_rank=24" in overrides
    rebuilt = micro_config(tmp_path, *overrides, f"data.vocab_size={VOCAB}",
                           f"data.seq_len={SEQ}").model
    assert dataclasses.replace(rebuilt, name=cfg.name, init_std=cfg.init_std) == cfg
