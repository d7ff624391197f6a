"""FP8 training (trainer.fp8, parallel/float8.py): which layers torchao converts, the
configuration errors (compiled fp8 on a CPU among them), checkpoints in and out of fp8 runs,
activation checkpointing, and the fp8 run under dp_shard2, tp2, pp2 and cp2 against the fp8
run in one process (rowwise under tp2 and both recipes under cp2 as another fp8 rounding).
torchao's float8 casts run eagerly on the CPU (several times slower than fp32 matmuls
there), so the tests that train more than one short run are marked slow."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch import nn

from layout_runs import COMMON, PIPELINE_MODEL, run_layout, train_and_record
from micro_runs import cut_and_resume, micro_config, synthetic_data
from run_metrics import logged_losses
from scaleforge.core.checkpoint.weights import load_model_checkpoint
from scaleforge.core.config import validate
from scaleforge.core.trainer import Trainer
from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.parallel import float8
from scaleforge.parallel.parallelize import BuildPlan, build_model
from scaleforge.parallel.run_setup import init_topology

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor  # noqa: E402

BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def _one_process_model(fp8: str, **model: object) -> nn.Module:
    cfg = micro_config("unused", "trainer.fp8=" + fp8)
    topology = init_topology(cfg.parallel, validate(cfg), "cpu")
    model_cfg = TransformerConfig(**{**cfg.model.__dict__, **model})
    return build_model(BuildPlan(model=model_cfg, fp8=fp8), topology)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_converts_the_block_linears_and_keeps_head_and_embeddings(recipe):
    model = _one_process_model(recipe)
    converted, kept = float8.float8_layers(model)
    assert converted == [f"layers.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]
    assert kept == ["tok_embeddings", "output"]
    assert all(isinstance(model.get_submodule(name), Float8Linear) for name in converted)
    line = float8.describe_float8(model, recipe, False)
    assert line.startswith(f"fp8: torchao {float8.torchao_version()}, {recipe} recipe: "
                           "float8 matmuls in 14 block linears (attention.wq x2,")
    assert "kept in high precision: tok_embeddings x1, output x1;" in line
    # the weights stay fp32 parameters with nn.Linear's names
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "layers.0.attention.wq.weight" in model.state_dict()


def test_a_block_linear_whose_dimension_the_float8_gemm_cannot_take_stays_high_precision():
    # d_model 72 (not a multiple of 16) is one side of every block linear, so none is
    # converted; under tp 4 a 32-wide wk would split into 8-wide shards.
    model = _one_process_model("tensorwise", d_model=72, n_heads=4, n_kv_heads=2)
    converted, kept = float8.float8_layers(model)
    assert converted == [] and "layers.0.attention.wq" in kept
    wk = nn.Linear(64, 32)
    assert float8._is_fp8_linear(wk, "layers.0.attention.wk", tp=2)
    assert not float8._is_fp8_linear(wk, "layers.0.attention.wk", tp=4)
    assert not float8._is_fp8_linear(nn.Linear(64, 512), "output", tp=1)


def test_lora_adapted_projections_keep_their_adapters_in_high_precision():
    # core.config refuses model.lora with trainer.fp8 at start; should a model with
    # adapters reach the conversion anyway, they stay (a plain nn.Linear filter).
    cfg = micro_config("unused", "model.lora.rank=4", "model.lora.targets=[attention]")
    topology = init_topology(cfg.parallel, validate(cfg), "cpu")
    model = build_model(BuildPlan(model=cfg.model, fp8="tensorwise"), topology)
    converted, kept = float8.float8_layers(model)
    assert converted == [f"layers.{i}.feed_forward.{w}" for i in range(2)
                         for w in ("w1", "w3", "w2")]
    assert "layers.0.attention.wq.lora_a" in dict(model.named_parameters())


def test_bad_fp8_settings_fail_at_validation_with_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="trainer.fp8='fp4'.*tensorwise"):
        validate(micro_config("unused", "trainer.fp8=fp4"))
    with pytest.raises(ConfigError, match="trainer.fp8=rowwise with model moe_tiny's experts"):
        validate(micro_config("unused", "model=moe_tiny", "trainer.fp8=rowwise"))
    validate(micro_config("unused", "model=moe_tiny"))  # fp8=none: no torchao needed
    monkeypatch.setattr(float8, "torch_release", lambda: "2.11.0")  # the GPU machines' torch
    with pytest.raises(ConfigError, match="trainer.fp8=rowwise on a CPU needs torch >= 2.13"):
        float8.check_fp8("rowwise", micro_config("unused").model, "cpu")
    float8.check_fp8("rowwise", micro_config("unused").model, "cuda")
    # compiled fp8 on a CPU: losses 5.4e-4 off eager fp8 under the tests' AVX2 kernels
    # (parallel/float8.py's check_fp8), refused at start; CUDA's is allowed
    with pytest.raises(ConfigError, match="trainer.compile=true with trainer.fp8=tensorwise "
                                          "on a CPU.*set trainer.compile=false"):
        validate(micro_config("unused", "trainer.fp8=tensorwise", "trainer.compile=true"))
    float8.check_fp8("tensorwise", micro_config("unused").model, "cuda", compile_blocks=True)


def test_missing_torchao_is_one_config_error_naming_the_install(monkeypatch):
    real_import = importlib.import_module

    def without_torchao(name: str, *args: object) -> object:
        if name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(float8.importlib, "import_module", without_torchao)
    with pytest.raises(ConfigError, match=r"trainer.fp8 needs torchao.*pip install torchao=="):
        validate(micro_config("unused", "trainer.fp8=tensorwise"))


def _reference(tmp_path: Path, *overrides: str) -> dict:
    cfg = micro_config(tmp_path / "reference", *COMMON, *overrides)
    return train_and_record(cfg, tmp_path / "reference", 5, world_size=1)


# One process, fp8 against fp32 (same weights, same data). Every converted matmul rounds
# its inputs to e4m3 (3 mantissa bits: 2^-4 relative, round to nearest) and its output
# gradient to e4m3 (rowwise) or e5m2 (tensorwise, 2^-3), with scales that map each tensor's
# (row's) largest magnitude to the format's largest. A cross-entropy near log(512) at init
# moves by about those roundings times the logits' share of the loss, averaged over a
# step's 512 tokens; measured 3e-5 (tensorwise) and 2e-5 (rowwise) relative over 5 steps.
# 1e-3 leaves 30x and still fails a run whose matmuls are off by more than fp8's rounding;
# that the run differs from fp32 at all proves the float8 path ran.
FP8_VS_FP32_LOSS_RTOL = 1e-3


@pytest.mark.parametrize("recipe", ["tensorwise", pytest.param("rowwise",
                                                                marks=pytest.mark.slow)])
def test_fp8_trains_like_fp32_within_float8_rounding(tmp_path, recipe):
    fp8 = _reference(tmp_path / recipe, f"trainer.fp8={recipe}")
    fp32 = _reference(tmp_path / "fp32")
    losses, expected = torch.tensor(fp8["losses"]), torch.tensor(fp32["losses"])
    torch.testing.assert_close(losses, expected, rtol=FP8_VS_FP32_LOSS_RTOL, atol=0)
    assert not torch.equal(losses, expected)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_fp8_with_activation_checkpointing_recomputes_the_same_numbers(tmp_path, mode):
    plain = _reference(tmp_path / "plain", "trainer.fp8=tensorwise")
    checkpointed = _reference(tmp_path / mode, "trainer.fp8=tensorwise",
                              f"trainer.activation_checkpointing={mode}")
    assert checkpointed["losses"] == plain["losses"]
    for name, tensor in plain["final"].items():
        assert torch.equal(checkpointed["final"][name], tensor), name


# 2 micro-batches per step (gradient accumulation), 8 steps, as tests/test_checkpoint.py.
ACCUMULATE = ("trainer.global_batch_tokens=512", "trainer.micro_batch_size=4")


def _train(run_dir: Path, *overrides: str) -> Trainer:
    cfg = micro_config(run_dir, "trainer.max_steps=8", *ACCUMULATE, *overrides)
    trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg, num_windows=20))
    trainer.fit()
    return trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model_parts[0].state_dict().items()}


@pytest.mark.slow
def test_fp8_checkpoint_resumes_bitwise_and_saves_fp32_weights(tmp_path):
    fp8 = "trainer.fp8=tensorwise"
    full, resumed = cut_and_resume(_train, tmp_path, 3, fp8)
    resumed_dir = tmp_path / "resumed"
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step_3"
    reference, after = logged_losses(tmp_path / "full"), logged_losses(resumed_dir)
    assert sorted(after) == [4, 5, 6, 7, 8]
    assert all(after[s] == reference[s] for s in after), (after, reference)
    for name, value in _weights(full).items():
        assert torch.equal(value, _weights(resumed)[name]), name
    _, saved = load_model_checkpoint(tmp_path / "cut/checkpoints/step_3")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


@pytest.mark.slow
def test_checkpoints_move_between_fp32_and_fp8_runs(tmp_path):
    source = _train(tmp_path / "fp32", "checkpoint.every=3")
    checkpoint = tmp_path / "fp32/checkpoints/step_3"
    into_fp8 = micro_config(tmp_path / "into_fp8", "trainer.max_steps=8", *ACCUMULATE,
                            "trainer.fp8=rowwise", f"trainer.resume={checkpoint}")
    trainer = Trainer(into_fp8, tmp_path / "into_fp8", data=synthetic_data(into_fp8,
                                                                          num_windows=20))
    assert trainer.step == 3 and trainer.optimizer.state
    _, saved = load_model_checkpoint(checkpoint)
    for name, value in saved.items():
        assert torch.equal(trainer.model_parts[0].state_dict()[name], value), name
    trainer.fit()
    # and back: the fp8 run's last checkpoint resumes in a run without fp8
    back = micro_config(tmp_path / "back", "trainer.max_steps=9", *ACCUMULATE,
                        f"trainer.resume={tmp_path / 'into_fp8'}")
    resumed = Trainer(back, tmp_path / "back", data=synthetic_data(back, num_windows=20))
    assert resumed.step == 8
    for name, value in _weights(trainer).items():
        assert torch.equal(resumed.model_parts[0].state_dict()[name], value), name
    assert source.step == 8


def _gathers_float8_weights(trainer: Trainer) -> None:
    """Runs in each rank: FSDP's tensorwise weights are torchao's float8-gathered ones."""
    model = trainer.model_parts[0]
    weight = model.get_submodule("layers.0.attention.wq").weight
    assert isinstance(weight.to_local(), WeightWithDynamicFloat8CastTensor)
    assert not isinstance(model.get_submodule("output").weight.to_local(),
                          WeightWithDynamicFloat8CastTensor)


def _run_dp_shard2_tensorwise(cfg) -> dict:
    from distributed import run_distributed_test

    return run_distributed_test(_train_checking_gather, world_size=2,
                                func_args=(cfg, Path(cfg.run_dir)))[0]


def _train_checking_gather(cfg, run_dir: Path) -> dict:
    return train_and_record(cfg, run_dir, 5, 2, prepare=_gathers_float8_weights)


# fp8 under a layout against fp8 in one process. Both runs start from the same weights and
# data and do the same float8 casts: tensorwise scales come from each tensor's largest
# magnitude (a max, which no reduction order changes), rowwise from each row's. What
# differs is the fp32 arithmetic's order (layout_runs' notes: ~2^-20 relative of a matmul
# output), and where such a difference carries a value across an fp8 rounding boundary
# that entry moves by one e4m3 step (2^-3 relative): a fraction ~2^-20 / 2^-3 of entries,
# so per operation an rms relative noise of sqrt(2^-20 x 2^-3) = 2^-11.5, below the one
# bf16 rounding (2^-9) that the bf16 layout tests' tolerances are derived for
# (tests/test_parallel_layouts.py, BF16_*): losses within 1e-4 relative, grad norms within
# 1e-2, each weight's difference within 10% of its single-process update. Measured
# (tensorwise): dp_shard2 1.2e-6 / 5e-7 / 0.13%; tp2 8e-6 / 3.5e-4 / 2.8%.
FP8_LOSS_RTOL, FP8_GRAD_NORM_RTOL, FP8_UPDATE_RTOL = 1e-4, 1e-2, 0.1


def _compare_fp8(result: dict, reference: dict, fp32: dict) -> None:
    for name, tensor in reference["initial"].items():
        assert torch.equal(result["initial"][name], tensor), name
    torch.testing.assert_close(torch.tensor(result["losses"]),
                               torch.tensor(reference["losses"]), rtol=FP8_LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                               torch.tensor(reference["grad_norms"]),
                               rtol=FP8_GRAD_NORM_RTOL, atol=0)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=FP8_LOSS_RTOL)
    to_fp8 = to_fp32 = worst = 0.0
    for name, tensor in reference["final"].items():
        update = (tensor - reference["initial"][name]).norm()
        difference = (result["final"][name] - tensor).norm()
        assert difference <= FP8_UPDATE_RTOL * update, (name, difference, update)
        worst = max(worst, (difference / update).item())
        to_fp8 += difference.item()
        to_fp32 += (result["final"][name] - fp32["final"][name]).norm().item()
    # the layout ran fp8: its weights lie nearer the fp8 run's than the fp32 run's
    assert to_fp8 < to_fp32 / 2, (to_fp8, to_fp32)
    losses = torch.tensor(result["losses"])
    print(f"losses within {((losses - torch.tensor(reference['losses'])).abs() / losses).max():.1e}"
          f" relative, weights within {worst:.2%} of their update")
    print(f"weights {to_fp8:.3e} from the fp8 run, {to_fp32:.3e} from the fp32 run")


@pytest.mark.slow
def test_fp8_tensorwise_under_dp_shard2_gathers_float8_and_matches_one_process(tmp_path):
    cfg = micro_config(tmp_path / "run", *COMMON, "trainer.fp8=tensorwise",
                       "parallel.dp_shard=2")
    result = _run_dp_shard2_tensorwise(cfg)
    _compare_fp8(result, _reference(tmp_path / "fp8", "trainer.fp8=tensorwise"),
                 _reference(tmp_path / "fp32"))


@pytest.mark.slow
def test_fp8_tensorwise_under_tp2_matches_one_process(tmp_path):
    cfg = micro_config(tmp_path / "run", *COMMON, "trainer.fp8=tensorwise", "parallel.tp=2")
    result = run_layout(cfg, 2, 5)
    assert result["placements"]["layers.0.attention.wq.weight"] == ((2,), "(Shard(dim=0),)")
    _compare_fp8(result, _reference(tmp_path / "fp8", "trainer.fp8=tensorwise"),
                 _reference(tmp_path / "fp32"))



def test_the_fp8_curves_table_compares_each_recipe_with_the_baseline_at_shared_steps(tmp_path):
    from scaleforge.bench.fp8_curves import comparison_table, val_losses

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 8.0}\n'
                                            '{"step": 5, "loss": 7.0}\n'
                                            '{"step": 10, "val_loss": 5.0}\n')
    assert val_losses(tmp_path) == {0: 8.0, 10: 5.0}
    rows = comparison_table([{0: 8.0, 10: 5.0}, {0: 8.0, 10: 5.1}, {10: 4.95}])
    assert rows[0] == ("| step | none (fp32) | tensorwise | rowwise | tensorwise vs none | "
                       "rowwise vs none |")
    assert rows[2:] == ["| 10 | 5.0000 | 5.1000 | 4.9500 | +2.00% | -1.00% |"]


@pytest.mark.slow
def test_fp8_tensorwise_dp_shard2_checkpoint_resumes_bitwise(tmp_path):
    # The float8-gathered weights (torchao's WeightWithDynamicFloat8CastTensor inside FSDP's
    # DTensor) go through torch.distributed.checkpoint as fp32 shards and come back into
    # the same subclass; the scales are recomputed from them, so the run continues exactly.
    overrides = [*COMMON, "trainer.fp8=tensorwise", "parallel.dp_shard=2",
                 "trainer.max_steps=4"]
    uninterrupted = run_layout(micro_config(tmp_path / "full", *overrides), 2, 4)
    saved = run_layout(micro_config(tmp_path / "saved", *overrides), 2, 2, save_at=(2,))
    assert saved["losses"] == uninterrupted["losses"][:2]
    checkpoint = tmp_path / "saved/checkpoints/step_2"
    resumed = run_layout(micro_config(tmp_path / "resumed", *overrides,
                                      f"trainer.resume={checkpoint}"), 2, 2)
    assert resumed["start_step"] == 2
    assert resumed["losses"] == uninterrupted["losses"][2:]
    for name, tensor in uninterrupted["final"].items():
        assert tensor.dtype == torch.float32
        assert torch.equal(resumed["final"][name], tensor), name


# Pipeline: each stage converts its own blocks' linears, and the schedule runs the same
# micro-batches as one process's gradient accumulation, so every cast sees the same tensor as
# in one process (measured: losses equal bitwise, grad norms within 1e-7, weights within
# 1e-6 of their update, both recipes).
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_under_pp2_matches_one_process(tmp_path, recipe):
    fp8 = f"trainer.fp8={recipe}"
    cfg = micro_config(tmp_path / "run", *COMMON, *PIPELINE_MODEL, fp8, "parallel.pp=2")
    result = run_layout(cfg, 2, 5)
    assert result["stage_ids"] == [[0], [1]]
    _compare_fp8(result, _reference(tmp_path / "fp8", *PIPELINE_MODEL, fp8),
                 _reference(tmp_path / "fp32", *PIPELINE_MODEL))


# Context parallel: each cp rank casts its own chunks of the sequence, so its activations'
# and output gradients' scales come from those chunks' largest magnitudes (torchao casts the
# local tensor; torchtitan's context parallel does the same), not from the whole
# micro-batch's as in one process. The runs then round the same values with other scales:
# not reduction-order noise (as under dp, tp, pp) but a second fp8 rounding, each within
# half an fp8 step of the fp32 value whatever the scale (2^-4 relative in e4m3, 2^-3 in
# e5m2; a finer scale only moves values off the subnormal range). So the cp run lies about
# as far from the one-process fp8 run as that lies from the fp32 run: its losses within
# twice the fp8-vs-fp32 bound of the fp8 run's (FP8_VS_FP32_LOSS_RTOL, by the triangle
# inequality through the fp32 run), and its weights, summed over the tensors, at most twice
# the fp8 run's distance from the fp32 run's. Per tensor the roundings' effects are random:
# a norm weight (64 entries, Adam-normalised updates) measured 8x either way, so the sum.
# Measured (tensorwise): losses within 3.8e-5; each pair of the three runs 15-19% of a block
# matrix's update apart; the sum 1.02x fp8's distance from fp32. Rowwise scales its inputs
# per token, a row that one cp rank holds whole, so only the weight-gradient casts (scaled
# over the tokens) differ: losses within 1.7e-5, the sum 0.24x.
# That the ranks ran float8 is checked in them (a cp run without float8 would lie at the
# fp32 run, within these bounds too).
CP_FP8_ROUNDINGS = 2


def _run_checking_float8(cfg, world_size: int, gathers_float8: bool) -> dict:
    from distributed import run_distributed_test

    return run_distributed_test(_train_checking_float8, world_size=world_size,
                                func_args=(cfg, Path(cfg.run_dir), gathers_float8))[0]


def _train_checking_float8(cfg, run_dir: Path, gathers_float8: bool) -> dict:
    def check(trainer: Trainer) -> None:
        model = trainer.model_parts[0]
        assert isinstance(model.get_submodule("layers.0.attention.wq"), Float8Linear)
        if gathers_float8:
            _gathers_float8_weights(trainer)

    return train_and_record(cfg, run_dir, 5, 2, prepare=check)


def _assert_another_fp8_rounding(result: dict, reference: dict, fp32: dict, label: str) -> None:
    """`result` (a layout's fp8 run) within fp8 rounding of the one-process fp8 run
    `reference`, as the notes above CP_FP8_ROUNDINGS derive; `fp32` the one-process fp32
    run."""
    for name, tensor in reference["initial"].items():
        assert torch.equal(result["initial"][name], tensor), name
    losses = torch.tensor(result["losses"])
    torch.testing.assert_close(losses, torch.tensor(reference["losses"]), atol=0,
                               rtol=CP_FP8_ROUNDINGS * FP8_VS_FP32_LOSS_RTOL)
    assert result["val_loss"] == pytest.approx(
        reference["val_loss"], rel=CP_FP8_ROUNDINGS * FP8_VS_FP32_LOSS_RTOL)
    to_fp8 = sum((result["final"][name] - tensor).norm().item()
                 for name, tensor in reference["final"].items())
    fp8_to_fp32 = sum((tensor - fp32["final"][name]).norm().item()
                      for name, tensor in reference["final"].items())
    assert to_fp8 <= CP_FP8_ROUNDINGS * fp8_to_fp32, (to_fp8, fp8_to_fp32)
    print(f"{label}: losses within "
          f"{((losses - torch.tensor(reference['losses'])).abs() / losses).max():.1e}, "
          f"weights {to_fp8 / fp8_to_fp32:.2f}x the fp8 run's distance from fp32")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_under_cp2_stays_within_fp8_rounding_of_one_process(tmp_path, recipe):
    fp8 = f"trainer.fp8={recipe}"
    cfg = micro_config(tmp_path / "run", *COMMON, fp8, "parallel.cp=2")
    # FSDP shards over dp_shard x cp: tensorwise weights are gathered in float8
    result = _run_checking_float8(cfg, 2, gathers_float8=recipe == "tensorwise")
    reference = _reference(tmp_path / "fp8", fp8)
    fp32 = _reference(tmp_path / "fp32")
    _assert_another_fp8_rounding(result, reference, fp32, f"cp2 {recipe}")
