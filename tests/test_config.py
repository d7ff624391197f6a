"""Config composition and validation: every mistake names the setting before work starts."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from scaleforge.core.config import compose, micro_batches_per_step, to_config, validate
from scaleforge.core.derived_settings import derive_settings
from scaleforge.core.precision import resolve_precision
from scaleforge.errors import ConfigError, ConfigErrors


def _error_text(error: BaseException) -> str:
    """The message of `error` and of every exception it was raised from."""
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def test_default_config_composes_and_validates():
    cfg = to_config(compose())
    validate(cfg)
    assert cfg.model.name == "llama_tiny" and cfg.data.corpus == "stdlib"


def test_demo_experiment_selects_tiny_llama_in_fp32_on_cpu():
    cfg = to_config(compose(["+experiment=demo", "trainer.device=cpu"]))
    validate(cfg)
    assert (cfg.model.name, cfg.trainer.precision) == ("llama_tiny", "auto")
    assert resolve_precision(cfg.trainer.precision, cfg.trainer.device) == "fp32"
    assert cfg.run_dir.startswith("runs/demo/")


def test_unknown_key_is_named():
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as info:
        compose(["trainer.max_stepz=3"])
    assert "max_stepz" in _error_text(info.value)


def test_wrong_type_is_named():
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as info:
        compose(["trainer.max_steps=many"])
    assert "trainer.max_steps" in _error_text(info.value)


def test_unknown_preset_is_named():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["model=llama_9000b"])
    assert "llama_9000b" in _error_text(info.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.n_heads=3"], "model.n_heads"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["data.seq_len=512"], "data.seq_len"),
        (["trainer.global_batch_tokens=1000"], "trainer.global_batch_tokens"),
        (["data.vocab_size=9000", "model.vocab_size=4096"], "data.vocab_size"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["trainer.precision=fp16", "trainer.device=cpu"], "trainer.precision"),
        (["trainer.activation_checkpointing=some"], "trainer.activation_checkpointing"),
        (["optim.schedule=step"], "optim.schedule"),
        (["optim.warmup_steps=5000"], "optim.warmup_steps"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
        (["parallel.tp=2"], "parallel.tp"),
        (["logging.wandb=maybe"], "logging.wandb"),
    ],
)
def test_invalid_setting_is_named_in_one_line(overrides, named):
    cfg = to_config(compose(overrides))
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert named in message and "\n" not in message


def test_world_size_must_match_the_layout():
    with pytest.raises(ConfigError, match="world size 2") as info:
        validate(to_config(compose(["parallel.dp_shard=1"])), world_size=2)
    assert "set parallel.dp_shard=2 (or -1" in str(info.value)


def test_dp_shard_defaults_to_the_rest_of_the_world():
    assert validate(to_config(compose()), world_size=2).dp_shard == 2
    assert validate(to_config(compose(["parallel.tp=2"])), world_size=4).dp_shard == 2


def test_a_layout_the_world_cannot_hold_is_not_told_to_set_dp_shard():
    """tp=4 on 2 processes: no dp_shard fixes it; the message says what does."""
    for overrides in (["parallel.tp=4"], ["parallel.tp=4", "parallel.dp_shard=1"]):
        with pytest.raises(ConfigError) as info:
            validate(to_config(compose(overrides)), world_size=2)
        message = str(info.value)
        assert "dp_shard=-1" not in message.split(";")[-1], message
        assert "4 processes" in message or "multiple of 4" in message, message


def test_every_section_is_checked_whatever_else_failed():
    """A model field, a parallel field, the optimizer and the batch rule, all at once."""
    cfg = to_config(compose(["model.n_heads=3", "optim.lr=-1", "trainer.micro_batch_size=7",
                             "parallel.backend=mpi"]))
    with pytest.raises(ConfigErrors) as info:
        validate(cfg)
    messages = info.value.messages
    for named in ("model.n_heads", "optim.lr", "parallel.backend",
                  "trainer.global_batch_tokens"):
        assert sum(named in m for m in messages) == 1, (named, messages)


def test_micro_batches_per_step_fills_the_global_batch():
    cfg = to_config(compose(["trainer.global_batch_tokens=65536", "trainer.micro_batch_size=8",
                             "data.seq_len=256"]))
    assert micro_batches_per_step(cfg) == 32
    assert micro_batches_per_step(cfg, dp_size=4) == 8


def test_independent_mistakes_are_all_reported_at_once():
    cfg = to_config(compose(["trainer.precision=fp8", "optim.schedule=step", "data.seq_len=512",
                             "logging.wandb=maybe"]))
    with pytest.raises(ConfigErrors) as info:
        validate(cfg)
    messages = info.value.messages
    assert len(messages) == 4 and all("\n" not in m for m in messages)
    for named in ("trainer.precision", "optim.schedule", "data.seq_len", "logging.wandb"):
        assert sum(m.startswith(named) for m in messages) == 1, (named, messages)


def test_warmup_longer_than_the_run_is_clamped_with_a_warning():
    cfg = to_config(compose(["trainer.max_steps=5", "optim.warmup_steps=20",
                             "trainer.precision=fp32"]))
    warnings = derive_settings(cfg)
    assert cfg.optim.warmup_steps == 5 and len(warnings) == 1
    assert warnings[0].startswith("warning: optim.warmup_steps=20 exceeds trainer.max_steps=5")
    validate(cfg)
    assert derive_settings(cfg) == []  # nothing left to clamp


def test_eval_every_zero_turns_evaluation_off():
    cfg = to_config(compose(["trainer.eval_every=0"]))
    validate(cfg)
    assert not any(cfg.trainer.evaluates_at(step) for step in range(cfg.trainer.max_steps + 1))
    cfg.trainer.eval_every = 4
    assert [s for s in range(11) if cfg.trainer.evaluates_at(s)] == [0, 4, 8]
    cfg.trainer.eval_every = -1
    with pytest.raises(ConfigError, match=r"trainer\.eval_every=-1 .*0 turns evaluation off"):
        validate(cfg)


def test_shards_mode_infers_vocab_size_and_seq_len(shard_dir):
    cfg = to_config(compose(["data=shards", f"data.path={shard_dir}", "model=llama_micro",
                             "trainer.precision=fp32"]))
    assert cfg.data.vocab_size is None and cfg.data.seq_len == cfg.model.max_seq_len == 64
    assert derive_settings(cfg) == []
    assert cfg.data.vocab_size == 400  # the manifest's tokenizer
    validate(cfg)


def test_model_vocab_below_the_datas_states_both(shard_dir):
    cfg = to_config(compose(["data=shards", f"data.path={shard_dir}", "model=llama_micro",
                             "model.vocab_size=300"]))
    derive_settings(cfg)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=300 is below the data's "
                                          r"vocabulary of 400 ids.*model\.vocab_size=400"):
        validate(cfg)


def test_shards_mode_without_a_path_is_reported_with_the_other_mistakes():
    cfg = to_config(compose(["data=shards", "optim.schedule=step", "trainer.precision=fp32"]))
    assert derive_settings(cfg) == [] and cfg.data.vocab_size is None
    with pytest.raises(ConfigErrors) as info:
        validate(cfg)
    assert [m.split("=")[0] for m in info.value.messages] == ["optim.schedule", "data.mode"]


def test_bf16_on_a_cpu_that_emulates_it_warns_with_the_measured_slowdown(monkeypatch):
    from scaleforge.core import precision

    assert precision.cpu_bf16_slowdown(size=64, repeats=2) > 0  # a real measurement
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: 6.25)
    cfg = to_config(compose(["trainer.precision=bf16", "trainer.device=cpu"]))
    assert derive_settings(cfg) == [
        "warning: trainer.precision=bf16 on a CPU without bf16 units: a bf16 matmul measured "
        "6.2x slower than fp32 here; trainer.precision=fp32 trains faster on this machine"]
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: 0.6)  # bf16 units
    assert derive_settings(cfg) == []
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: 6.25)
    cfg = to_config(compose(["trainer.precision=fp32", "trainer.device=cpu"]))
    assert derive_settings(cfg) == []


def test_data_summary_names_each_source_its_share_and_epochs(shard_dir):
    from scaleforge.core.run_description import describe_data
    from scaleforge.data_pipeline.manifest import load_manifest

    cfg = to_config(compose(["data=blend", f"data.blend.0.path={shard_dir}",
                             f"data.blend.1.path={shard_dir}", "trainer.max_steps=10",
                             "trainer.global_batch_tokens=4000"]))
    tokens = load_manifest(shard_dir)["splits"]["train"]["tokens"]
    line = describe_data(cfg, (shard_dir, shard_dir))
    first, second = line.removeprefix("data: ").split("; ")[:2]
    assert first == (f"{shard_dir} ({tokens:,} tokens, weight 0.70, "
                     f"{40_000 * 0.7 / tokens:.2f} epochs)")
    assert "weight 0.30" in second and line.endswith("this run reads 40,000 tokens")


def _fixes(message: str) -> list[str]:
    """The key=value settings an error message's hint names after "set" (each "or" one
    alternative), e.g. ['trainer.global_batch_tokens=8960', 'trainer.micro_batch_size=4']."""
    hint = message.rsplit("; ", 1)[-1]
    return [word.rstrip(",;)") for word in hint.replace("(", " ").split()
            if "=" in word and word.split("=")[0].count(".") >= 1]


@pytest.mark.parametrize(
    ("overrides", "world_size"),
    [
        (["trainer.micro_batch_size=7"], 1),  # the batch that does not split
        (["trainer.global_batch_tokens=1000"], 1),
        (["trainer.micro_batch_size=3", "parallel.dp_shard=1", "parallel.dp_replicate=2"], 2),
        (["parallel.dp_shard=1"], 2),  # a product below the world size
        (["parallel.dp_shard=3"], 2),
        (["parallel.tp=2", "model.vocab_size=4097"], 2),
        (["model.vocab_size=4000"], 1),  # below the data's 4096
        (["data.seq_len=512"], 1),  # beyond llama_tiny's 256
        (["optim.warmup_steps=-3"], 1),
        (["model.n_heads=3"], 1),  # 3 heads on d_model 128 with 2 kv heads
        (["model.n_kv_heads=3"], 1),
        (["parallel.tp=4"], 4),  # the 2 kv heads do not split 4 ways
        (["parallel.tp=2", "data.seq_len=255", "trainer.micro_batch_size=1",
          "trainer.global_batch_tokens=64770"], 2),  # 255 x 254: a batch both lengths split
        (["parallel.cp=2", "data.seq_len=250", "trainer.micro_batch_size=1",
          "trainer.global_batch_tokens=62000"], 2),
        (["model=moe_tiny", "parallel.ep=3"], 2),
        (["model=moe_tiny", "model.moe.num_experts=6", "parallel.ep=4"], 4),
        (["model=moe_tiny", "parallel.tp=2", "parallel.etp=2", "model.moe.expert_hidden=191"],
         2),
        (["parallel.pp=2", "model.tie_embeddings=false", "trainer.eval_batches=3"], 2),
        (["parallel.pp=3", "model.tie_embeddings=false", "trainer.eval_batches=32"], 3),
        (["parallel.pp=2", "model.tie_embeddings=false",
          "trainer.global_batch_tokens=2048"], 2),  # 1 micro-batch for 2 stages
        (["parallel.pp=2", "model.tie_embeddings=false", "trainer.eval_batches=32",
          "model.n_layers=1"], 2),  # 1 layer for 2 stages
        (["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2",
          "model.tie_embeddings=false", "trainer.eval_batches=30",
          "trainer.global_batch_tokens=10240"], 2),  # 5 micro-batches in 2 rounds
        (["model.rope_per_document=true"], 1),
        (["trainer.hang_timeout_s=900"], 1),
        (["model.lora.rank=8", "trainer.fp8=tensorwise"], 1),
    ],
)
def test_each_hint_followed_fixes_the_error(overrides, world_size):
    """Every alternative a message offers, applied alone, validates."""
    with pytest.raises(ConfigError) as info:
        validate(to_config(compose(overrides)), world_size)
    messages = info.value.messages if isinstance(info.value, ConfigErrors) else [
        str(info.value)]
    assert len(messages) == 1, messages
    fixes = _fixes(messages[0])
    assert fixes, messages[0]
    for fix in fixes:
        validate(to_config(compose([*overrides, fix])), world_size)


def test_a_pipeline_reports_its_evaluation_rule_with_its_schedule_rules():
    """Following the tied-embedding hint does not lead to a second error: both come at once,
    and both hints applied validate."""
    with pytest.raises(ConfigErrors) as info:
        validate(to_config(compose(["parallel.pp=2"])), 2)
    fixes = [_fixes(message)[0] for message in info.value.messages]
    assert fixes == ["model.tie_embeddings=false", "trainer.eval_batches=32"]
    validate(to_config(compose(["parallel.pp=2", *fixes])), 2)


def test_a_layout_hint_to_start_more_processes_fixes_it():
    with pytest.raises(ConfigError, match=r"start 2 processes \(torchrun --nproc-per-node 2\)"):
        validate(to_config(compose(["parallel.tp=2"])), 1)
    validate(to_config(compose(["parallel.tp=2"])), 2)


def test_a_null_model_vocabulary_takes_the_tokenizers_rounded_up_to_128(shard_dir):
    """The small CPU presets leave model.vocab_size null: a 400-piece tokenizer gives 512
    rows, the demo corpus's 4,096 gives 4,096; published models keep their vocabulary."""
    cfg = to_config(compose(["data=shards", f"data.path={shard_dir}", "model=llama_micro"]))
    assert cfg.model.vocab_size == 512
    assert to_config(compose(["model=llama_tiny", "data.vocab_size=1000"])).model.vocab_size \
        == 1024
    assert to_config(compose(["model=llama_tiny"])).model.vocab_size == 4096
    assert to_config(compose(["model=llama_7b"])).model.vocab_size == 32000
    assert to_config(compose(["model=qwen2_5_0_5b"])).model.vocab_size == 151936
