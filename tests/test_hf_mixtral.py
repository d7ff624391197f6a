"""Mixtral conversion (models/hf_mixtral.py) both ways, checked against transformers'
MixtralForCausalLM on a tiny random config (no download): logits, bitwise round trips, the
published per-expert layout, a saved directory, and the settings Mixtral cannot hold."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from scaleforge.errors import ConfigError  # noqa: E402
from scaleforge.models import TransformerConfig, build  # noqa: E402
from scaleforge.models.config import as_transformer_config  # noqa: E402
from scaleforge.models.hf import (  # noqa: E402
    from_hf_state_dict,
    load_hf,
    save_hf,
    to_hf_model,
    to_hf_state_dict,
)
from scaleforge.models.hf_config import from_hf_config  # noqa: E402
from test_hf import SEQ, TOLERANCE, VOCAB, max_logit_difference, randomize  # noqa: E402


def hf_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, num_hidden_layers=2, vocab_size=VOCAB,
                           max_position_embeddings=SEQ, rope_theta=5e5, rms_norm_eps=1e-6,
                           num_local_experts=4, num_experts_per_tok=2, bos_token_id=None,
                           eos_token_id=None, tie_word_embeddings=False)
    return randomize(MixtralForCausalLM(config))


def our_config(**moe: object) -> TransformerConfig:
    return as_transformer_config(dict(
        name="mixtral_micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
        max_seq_len=SEQ, ffn_hidden=48,
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 48} | moe))


def our_model(cfg: TransformerConfig):
    torch.manual_seed(0)
    return randomize(build(cfg))


def test_hf_mixtral_loaded_into_ours_gives_the_same_logits() -> None:
    hf_model = hf_mixtral()
    cfg = from_hf_config(hf_model.config)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden) == (4, 2, 48)
    model = build(cfg)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), cfg))
    assert max_logit_difference(model.eval(), hf_model, VOCAB) <= TOLERANCE


def test_our_moe_model_exported_to_mixtral_gives_the_same_logits() -> None:
    cfg = our_config()
    model = our_model(cfg)  # randomized weights; the expert bias (a buffer) stays 0
    hf_model = to_hf_model(model.state_dict(), cfg)
    assert isinstance(hf_model, MixtralForCausalLM)
    assert max_logit_difference(model.eval(), hf_model, VOCAB) <= TOLERANCE


def test_mixtral_state_dict_round_trips_are_bitwise_equal() -> None:
    cfg = our_config()
    ours = build(cfg, seed=3).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(ours, cfg), cfg)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[name], ours[name]) for name in ours)
    theirs = hf_mixtral().state_dict()
    hf_cfg = from_hf_config(hf_mixtral().config)
    again = to_hf_state_dict(from_hf_state_dict(theirs, hf_cfg), hf_cfg)
    assert again.keys() == theirs.keys()
    assert all(torch.equal(again[name], theirs[name]) for name in theirs)


def test_published_per_expert_layout_loads() -> None:
    """Mixtral's released files keep each expert apart under `block_sparse_moe.`."""
    hf_model = hf_mixtral()
    cfg = from_hf_config(hf_model.config)
    published = {}
    for name, tensor in hf_model.state_dict().items():
        layer, _, rest = name.partition(".mlp.")
        if not rest:
            published[name] = tensor
        elif rest == "gate.weight":
            published[f"{layer}.block_sparse_moe.gate.weight"] = tensor
        elif rest == "experts.down_proj":
            for e, w2 in enumerate(tensor):
                published[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = w2
        else:
            for e, fused in enumerate(tensor):
                w1, w3 = fused.chunk(2)
                published[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = w1
                published[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = w3
    model = build(cfg)
    model.load_state_dict(from_hf_state_dict(published, cfg))
    assert max_logit_difference(model.eval(), hf_model, VOCAB) <= TOLERANCE


def test_save_hf_and_load_hf_round_trip_a_mixtral_directory(tmp_path) -> None:
    cfg = our_config()
    state = build(cfg, seed=5).state_dict()
    save_hf(state, cfg, tmp_path / "hf")
    loaded_cfg, loaded = load_hf(tmp_path / "hf")
    assert loaded_cfg.moe.num_experts == 4 and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], state[name]) for name in state)


@pytest.mark.parametrize("moe,message", [
    ({"shared_experts": 1}, "model.moe.shared_experts=1"),
    ({"score_func": "sigmoid"}, "model.moe.score_func='sigmoid'"),
    ({"first_dense_layers": 1}, "model.moe.first_dense_layers=1"),
])
def test_settings_mixtral_cannot_hold_are_refused(moe: dict, message: str) -> None:
    cfg = our_config(**moe)
    with pytest.raises(ConfigError, match=message):
        to_hf_model(build(cfg, seed=0).state_dict(), cfg)


def test_a_moved_expert_bias_is_refused_on_export() -> None:
    cfg = our_config()
    model = build(cfg, seed=0)
    model.layers["1"].feed_forward.expert_bias[2] = 0.01
    with pytest.raises(ConfigError, match=r"layers.1.feed_forward.expert_bias is not zero"):
        to_hf_state_dict(model.state_dict(), cfg)
