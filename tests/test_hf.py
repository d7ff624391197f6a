"""models/hf.py and sf-convert: Llama and GPT-2 to and from `transformers`, checked on logits.

No network: the Hugging Face models are small random ones built from their configs.
"""

import re

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from micro_runs import micro_config, synthetic_data  # noqa: E402
from scaleforge.core.config import compose, to_config, validate  # noqa: E402
from scaleforge.errors import ConfigError  # noqa: E402
from scaleforge.launch import convert  # noqa: E402
from scaleforge.models import TransformerConfig, build  # noqa: E402
from scaleforge.models.hf import (  # noqa: E402
    from_hf_state_dict,
    load_hf,
    to_hf_model,
    to_hf_state_dict,
)
from scaleforge.models.hf_config import from_hf_config, to_hf_config  # noqa: E402
from scaleforge.models.state_dict import check_state_dict_shapes  # noqa: E402

VOCAB, SEQ = 128, 32
TOLERANCE = 1e-5  # max abs logit difference, fp32


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (norm weights around 1), so a swapped or transposed
    tensor shows in the logits; init alone leaves norms at 1 and biases at 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm_weight = param.dim() == 1 and not name.endswith("bias")
            param.copy_(noise + 1 if is_norm_weight else noise)
    return model.eval()


def hf_llama(tied: bool = False, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    settings = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        rope_theta=5e5,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
    )
    return randomize(LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})))


def hf_gpt2(tied: bool = True, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    settings = dict(
        n_embd=64,
        n_head=4,
        n_layer=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        tie_word_embeddings=tied,
        layer_norm_epsilon=1e-6,
        bos_token_id=None,
        eos_token_id=None,
    )
    return randomize(GPT2LMHeadModel(GPT2Config(**{**settings, **overrides})))


def our_config(family: str, tied: bool) -> TransformerConfig:
    """llama_micro's shape (d 64, 4 heads, 2 kv heads), or GPT-2 at the same size."""
    gpt = TransformerConfig(
        name="gpt_micro",
        family="gpt",
        n_layers=2,
        d_model=64,
        n_heads=4,
        vocab_size=VOCAB,
        max_seq_len=SEQ,
        tie_embeddings=tied,
    )
    return {"llama": lambda: micro_config("unused", f"model.tie_embeddings={tied}").model,
            "gpt": lambda: gpt}[family]()


def our_model(cfg: TransformerConfig):
    torch.manual_seed(0)
    return randomize(build(cfg))


def tokens(vocab_size: int, length: int = SEQ) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (2, length), generator=generator)


def max_logit_difference(ours, theirs, vocab_size: int) -> float:
    batch = tokens(vocab_size, min(SEQ, ours.cfg.max_seq_len))
    with torch.no_grad():
        return (ours(batch) - theirs(batch).logits).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("make_hf", [hf_llama, hf_gpt2], ids=["llama", "gpt2"])
def test_hf_model_loaded_into_ours_gives_the_same_logits(make_hf, tied):
    hf_model = make_hf(tied=tied)
    cfg = from_hf_config(hf_model.config)
    assert cfg.tie_embeddings == tied
    model = build(cfg)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), cfg))
    assert max_logit_difference(model.eval(), hf_model, VOCAB) <= TOLERANCE


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_our_model_exported_to_hf_gives_the_same_logits(family, tied):
    cfg = our_config(family, tied)
    model = our_model(cfg)
    hf_model = to_hf_model(model.state_dict(), cfg)
    assert max_logit_difference(model, hf_model, cfg.vocab_size) <= TOLERANCE


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_state_dict_round_trips_are_bitwise_equal(family, tied):
    cfg = our_config(family, tied)
    ours = our_model(cfg).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(ours, cfg), cfg)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[name], ours[name]) for name in ours)

    hf_model = {"llama": hf_llama, "gpt": hf_gpt2}[family](tied=tied)
    theirs = hf_model.state_dict()
    hf_cfg = from_hf_config(hf_model.config)
    again = to_hf_state_dict(from_hf_state_dict(theirs, hf_cfg), hf_cfg)
    assert again.keys() == theirs.keys()
    assert all(torch.equal(again[name], theirs[name]) for name in theirs)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_config_round_trip_keeps_every_setting_that_shapes_the_model(family):
    cfg = our_config(family, tied=True)
    back = from_hf_config(to_hf_config(cfg), name=cfg.name)
    for setting in (
        "family",
        "n_layers",
        "d_model",
        "n_heads",
        "kv_heads",
        "mlp_hidden",
        "vocab_size",
        "max_seq_len",
        "norm_eps",
        "tie_embeddings",
        "init_std",
    ):
        assert getattr(back, setting) == getattr(cfg, setting), setting
    if {"llama": True, "gpt": False}[family]:  # gpt has no RoPE, so no theta to keep
        assert back.rope_theta == cfg.rope_theta


def test_published_gpt2_layout_without_prefix_and_with_mask_buffers_loads():
    hf_model = hf_gpt2(tied=True)
    cfg = from_hf_config(hf_model.config)
    published = {
        name.removeprefix("transformer."): tensor
        for name, tensor in hf_model.state_dict().items()
        if name != "lm_head.weight"
    }
    published["h.0.attn.bias"] = torch.ones(1, 1, SEQ, SEQ)
    model = build(cfg)
    model.load_state_dict(from_hf_state_dict(published, cfg))
    assert max_logit_difference(model.eval(), hf_model, VOCAB) <= TOLERANCE


def test_shape_mismatch_names_the_tensor_and_both_shapes():
    hf_state = hf_llama().state_dict()
    wider = from_hf_config(hf_llama(intermediate_size=128).config)
    with pytest.raises(
        ConfigError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape "
        r"\(96, 64\) but the model expects \(128, 64\)",
    ):
        from_hf_state_dict(hf_state, wider)
    cfg = our_config("llama", tied=False)
    ours = our_model(cfg).state_dict()
    ours["layers.1.attention.wk.weight"] = torch.zeros(64, 64)
    with pytest.raises(
        ConfigError,
        match=r"layers\.1\.attention\.wk\.weight has shape \(64, 64\) "
        r"but the model expects \(32, 64\)",
    ):
        to_hf_state_dict(ours, cfg)


def test_missing_and_unexpected_tensors_are_named():
    expected = {"a.weight": torch.Size([2, 3]), "b.weight": torch.Size([4])}
    with pytest.raises(ConfigError, match=r"ckpt: tensor b\.weight is missing"):
        check_state_dict_shapes(expected, {"a.weight": torch.zeros(2, 3)}, "ckpt")
    extra = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "c": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"ckpt: tensor c \(shape \(1,\)\) does not belong"):
        check_state_dict_shapes(expected, extra, "ckpt")


@pytest.mark.parametrize(
    "hf_config, setting",
    [
        (LlamaConfig(hidden_act="gelu"), "hidden_act='gelu'"),
        (LlamaConfig(attention_bias=True), "attention_bias=True"),
        (LlamaConfig(mlp_bias=True), "mlp_bias=True"),
        (LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope"),
        (GPT2Config(activation_function="gelu"), "activation_function='gelu'"),
        (GPT2Config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ],
    ids=[
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "rope_scaling",
        "exact_gelu",
        "layer_scaled_attention",
    ],
)
def test_unrepresentable_hf_config_is_a_config_error_naming_the_setting(hf_config, setting):
    with pytest.raises(ConfigError, match=f"Hugging Face config {setting}"):
        from_hf_config(hf_config)


def test_a_model_type_other_than_llama_and_gpt2_is_refused():
    from transformers import BertConfig

    with pytest.raises(ConfigError, match="model_type='bert' is not supported"):
        from_hf_config(BertConfig())


def write_final_model_run(run_dir, family: str = "llama"):
    """A run directory as the trainer leaves it without checkpoints: config.yaml and
    final_model.pt. Returns (model, config)."""
    overrides = {"llama": [], "gpt": [
        "model=gpt_tiny",
        "model.n_layers=2",
        "model.d_model=64",
        "model.vocab_size=512",
        "model.max_seq_len=64",
    ]}[family]
    cfg = micro_config(run_dir, *overrides)
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    model = our_model(cfg.model)
    torch.save(model.state_dict(), run_dir / "final_model.pt")
    return model, cfg


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_to_hf_from_final_model_writes_a_model_transformers_loads(tmp_path, family, capsys):
    model, cfg = write_final_model_run(tmp_path / "run", family)
    out = tmp_path / "hf"
    convert.dispatch(["to-hf", f"ckpt={tmp_path / 'run'}", f"out={out}"])
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_logit_difference(model, hf_model, cfg.model.vocab_size) <= TOLERANCE
    assert f"-> {out}" in capsys.readouterr().out


def test_to_hf_in_bf16_writes_bf16_weights(tmp_path):
    write_final_model_run(tmp_path / "run")
    convert.dispatch(["to-hf", f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}", "dtype=bf16"])
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert {p.dtype for p in hf_model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("shard_size", [None, "20KB"], ids=["one_file", "sharded"])
def test_load_hf_reads_a_saved_directory_without_pickles(tmp_path, shard_size):
    hf_model = hf_llama(tied=True)
    hf_model.save_pretrained(
        tmp_path / "hf", **({"max_shard_size": shard_size} if shard_size else {})
    )
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == bool(shard_size)
    cfg, state = load_hf(tmp_path / "hf")
    model = build(cfg)
    model.load_state_dict(state)
    assert max_logit_difference(model.eval(), hf_model, VOCAB) <= TOLERANCE


def test_trained_checkpoint_goes_to_hf_and_back_into_training(tmp_path, capsys):
    """sf-train checkpoint -> to-hf (run dir and step dir) -> from-hf -> the sf-train command
    from-hf prints (trainer.init_from and the model settings)."""
    from scaleforge.core.checkpoint.weights import load_model_checkpoint
    from scaleforge.core.trainer import Trainer

    run = tmp_path / "run"
    cfg = micro_config(
        run, "trainer.max_steps=2", "trainer.eval_every=2", "model.tie_embeddings=true"
    )
    Trainer(cfg, run, data=synthetic_data(cfg)).fit()
    step = run / "checkpoints" / "step_2"
    _, trained = load_model_checkpoint(step)
    model = build(cfg.model)
    model.load_state_dict(trained)

    for ckpt, out in ((run, tmp_path / "hf_run"), (step, tmp_path / "hf_step")):
        convert.dispatch(["to-hf", f"ckpt={ckpt}", f"out={out}"])
        hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert max_logit_difference(model.eval(), hf_model, cfg.model.vocab_size) <= TOLERANCE

    back = tmp_path / "from_hf"
    convert.dispatch(["from-hf", f"hf={tmp_path / 'hf_run'}", f"out={back}"])
    back_cfg, back_state = load_model_checkpoint(back)
    assert back_cfg.model.tie_embeddings and back_cfg.model.d_model == cfg.model.d_model
    assert all(torch.equal(back_state[name], trained[name]) for name in trained)

    command = capsys.readouterr().out.splitlines()[-1].split()
    assert command[:2] == ["sf-train", f"trainer.init_from={back}"]
    # As printed, with the default data settings (the built-in corpus), it passes every
    # check a start makes: its data settings fit the model.
    validate(to_config(compose([*command[1:], f"run_dir={tmp_path / 'as_printed'}"])))
    fresh = micro_config(tmp_path / "fresh", *command[1:])
    for setting in (*convert.SHAPE_SETTINGS, "mlp_hidden", "kv_heads"):
        assert getattr(fresh.model, setting) == getattr(back_cfg.model, setting), setting
    trainer = Trainer(fresh, tmp_path / "fresh", data=synthetic_data(fresh))
    assert trainer.initialised_from == back
    state = trainer.model_parts[0].state_dict()
    assert all(torch.equal(state[name], trained[name]) for name in trained)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["to-hf", "ckpt={tmp}", "out={tmp}/hf", "dtype=fp16"], "dtype='fp16' is not one of"),
        (["to-hf", "ckpt={tmp}", "out={tmp}/hf"], "ckpt=.*no complete checkpoint there"),
        (["to-hf", "out={tmp}/hf"], "to-hf needs ckpt=DIR"),
        (["from-hf", "hf={tmp}", "out={tmp}/ckpt"], "no config.json"),
        (["from-hf", "model={tmp}"], "'model=.*' is not a setting"),
        (["export"], "give a command: sf-convert"),
    ],
)
def test_bad_arguments_print_one_error_line_and_exit_2(
    tmp_path, monkeypatch, capsys, arguments, message
):
    argv = [argument.format(tmp=tmp_path) for argument in arguments]
    monkeypatch.setattr("sys.argv", ["sf-convert", *argv])
    with pytest.raises(SystemExit) as stopped:
        convert.main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_from_hf_refuses_pickled_weights(tmp_path):
    hf_llama().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="reads safetensors only"):
        load_hf(tmp_path)
