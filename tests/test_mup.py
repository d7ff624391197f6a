"""muP (models/mup.py): the coordinate check, the base shape equal to the standard
parametrization, its config checks, its per-layer learning rates, its refusal by to-hf, and a
muP model under tensor, pipeline and data parallelism trained like one process."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from layout_runs import (
    COMMON,
    LOSS_RTOL,
    PIPELINE_MODEL,
    assert_weights_match,
    run_layout,
    train_and_record,
)
from micro_runs import cut_and_resume, micro_config, synthetic_data
from run_metrics import logged_losses
from scaleforge.core.lr_schedule import set_lr
from scaleforge.core.optimizer import OptimConfig, build_optimizer
from scaleforge.core.trainer import Trainer
from scaleforge.errors import ConfigError
from scaleforge.models import build
from scaleforge.models.config import TransformerConfig
from scaleforge.models.mup import MupConfig

BASE_WIDTH = 32
WIDTHS = (32, 64, 128)


def _config(width: int, base_width: int | None, **settings) -> TransformerConfig:
    shape = {"n_layers": 2, "n_heads": 4, "vocab_size": 256, "max_seq_len": 32,
             "ffn_multiple_of": 32, **settings}
    return TransformerConfig(d_model=width, mup=MupConfig(base_width=base_width), **shape)


def _learnable_batches(steps: int) -> torch.Tensor:
    """(steps + 1, 8, 33) token rows that follow a fixed rule (a learnable signal, so the
    updates are coherent from step to step, as on real text); the last is held out."""
    start = torch.randint(0, 256, (steps + 1, 8, 1), generator=torch.Generator().manual_seed(0))
    return (start * 5 ** torch.arange(33) + 7 * torch.arange(33)) % 256


def _activation_sizes(width: int, base_width: int | None, lr: float = 1e-2,
                      steps: int = 20) -> dict[str, float]:
    """Mean |x| of each block's output and of the logits on held-out rows after `steps`
    Adam steps at a constant `lr` (the coordinate check of Yang et al. 2022, fig. 5)."""
    cfg = _config(width, base_width)
    model = build(cfg, seed=0)
    optimizer = build_optimizer(torch.nn.ModuleList([model]),
                                OptimConfig(lr=lr, weight_decay=0.0), "cpu", cfg)
    data = _learnable_batches(steps)
    for step in range(steps):
        loss = model.loss(data[step, :, :-1], data[step, :, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sizes: dict[str, float] = {}
    hooks = [block.register_forward_hook(
        lambda module, inputs, output, name=name: sizes.__setitem__(
            f"block {name}", output.abs().mean().item()))
        for name, block in model.layers.items()]
    with torch.no_grad():
        sizes["logits"] = model(data[-1, :, :-1]).abs().mean().item()
    for hook in hooks:
        hook.remove()
    return sizes


@pytest.fixture
def one_thread():
    # Tiny matmuls: threads only contend (47 s with the default threads on a loaded 2-core
    # machine, 1.3 s CPU in one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_coordinate_check_activations_stay_flat_under_mup_and_grow_under_standard(one_thread):
    # Measured (2026-12-07, widths 32, 64, 128): muP block outputs 0.127, 0.126, 0.141 and
    # 0.339, 0.311, 0.366, logits 0.646, 0.641, 0.673 (max/min <= 1.18); standard
    # parametrization block outputs 0.127, 1.09, 28.6 and 0.339, 1.24, 30.6 (90x to 225x).
    mup = [_activation_sizes(width, BASE_WIDTH) for width in WIDTHS]
    standard = [_activation_sizes(width, None) for width in WIDTHS]
    for layer in mup[0]:
        sizes = [row[layer] for row in mup]
        assert max(sizes) / min(sizes) < 1.5, (layer, sizes)
    for layer in (name for name in standard[0] if name.startswith("block")):
        sizes = [row[layer] for row in standard]
        assert sizes[-1] / sizes[0] > 10, (layer, sizes)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_mup_at_its_base_width_is_the_standard_parametrization(family):
    standard = build(_config(64, None, family=family), seed=3)
    mup = build(_config(64, 64, family=family), seed=3)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(standard(tokens), mup(tokens))


def test_mup_scales_hidden_init_and_learning_rate_and_the_multipliers():
    cfg = _config(128, 32)  # m = 4
    standard, mup = build(_config(128, None), seed=0), build(cfg, seed=0)
    hidden = "layers.0.feed_forward.w1.weight"
    ratio = (mup.get_parameter(hidden).std() / standard.get_parameter(hidden).std()).item()
    assert ratio == pytest.approx(0.5, rel=1e-6)
    assert torch.equal(mup.tok_embeddings.weight, standard.tok_embeddings.weight)
    assert torch.equal(mup.output.weight, standard.output.weight)
    assert mup.output_multiplier == 0.25
    assert mup.layers["0"].attention.query_scale == pytest.approx(0.5)  # head 32 vs base 8
    optimizer = build_optimizer(torch.nn.ModuleList([mup]), OptimConfig(lr=1e-3), "cpu", cfg)
    set_lr(optimizer, 10, OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"), 20)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lr_of[id(mup.get_parameter(hidden))] == pytest.approx(2.5e-4)
    assert lr_of[id(mup.tok_embeddings.weight)] == pytest.approx(1e-3)
    assert lr_of[id(mup.output.weight)] == pytest.approx(1e-3)
    assert lr_of[id(mup.layers["0"].attention_norm.weight)] == pytest.approx(1e-3)


def test_base_head_dim_sets_the_attention_multiplier():
    cfg = TransformerConfig(d_model=128, n_heads=8, vocab_size=256,
                            mup=MupConfig(base_width=32, base_head_dim=16))
    assert build(cfg, device="meta").layers["0"].attention.query_scale == 1.0


@pytest.mark.parametrize("mup, setting", [
    ({"base_width": 0}, "model.mup.base_width=0 must be a positive width"),
    ({"base_width": 32, "base_head_dim": -1}, "model.mup.base_head_dim=-1 must be positive"),
    ({"base_head_dim": 16}, "model.mup.base_head_dim=16 without model.mup.base_width"),
])
def test_invalid_mup_settings_are_one_config_error(mup, setting):
    with pytest.raises(ConfigError, match=setting):
        TransformerConfig(mup=MupConfig(**mup)).check("model")


def test_mup_refuses_lora_adapters_in_one_line():
    cfg = micro_config("unused", "model.mup.base_width=32", "model.lora.rank=4").model
    with pytest.raises(ConfigError, match="model.lora.rank=0 or model.mup.base_width=null"):
        cfg.check("model")


def test_mup_refuses_mixture_of_experts_in_one_line():
    cfg = micro_config("unused", "model=moe_tiny", "model.mup.base_width=32").model
    with pytest.raises(ConfigError, match="model.moe.num_experts=0 or model.mup.base_width=null"):
        cfg.check("model")


def test_to_hf_refuses_a_mup_model_in_one_line(tmp_path):
    from scaleforge.launch import convert

    cfg = micro_config(tmp_path / "run", "model.mup.base_width=32")
    (tmp_path / "run").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), tmp_path / "run" / "config.yaml")
    torch.save(build(cfg.model, seed=0).state_dict(), tmp_path / "run" / "final_model.pt")
    with pytest.raises(ConfigError, match=r"model.mup.base_width=32: a muP model's readout") \
            as error:
        convert.dispatch(["to-hf", f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}"])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "hf").exists()


# llama_micro is d_model 64: base 32 makes m = 2, so every multiplier is active.
MUP = ["model.mup.base_width=32"]


@pytest.mark.parametrize("layout, overrides, world_size", [
    pytest.param("tp2", ["parallel.tp=2"], 2, marks=pytest.mark.slow),
    pytest.param("dp_shard2", ["parallel.dp_shard=2"], 2, marks=pytest.mark.slow),
    pytest.param("pp2", ["parallel.pp=2", *PIPELINE_MODEL], 2, marks=pytest.mark.slow),
])
def test_mup_model_under_layout_trains_like_single_process(tmp_path, layout, overrides,
                                                           world_size):
    same_data = [o for o in overrides if not o.startswith("parallel.")]
    reference = train_and_record(micro_config(tmp_path / "one", *COMMON, *MUP, *same_data),
                                 tmp_path / "one", 5, world_size=1)
    standard = train_and_record(micro_config(tmp_path / "sp", *COMMON, *same_data),
                                tmp_path / "sp", 5, world_size=1)
    # muP changes the run (so the comparison below is of muP numerics, not of SP's).
    assert abs(reference["losses"][-1] - standard["losses"][-1]) > 1e-3
    result = run_layout(micro_config(tmp_path / "run", *COMMON, *MUP, *overrides), world_size)
    for name, tensor in reference["initial"].items():
        assert torch.equal(result["initial"][name], tensor), name
    torch.testing.assert_close(torch.tensor(result["losses"]),
                               torch.tensor(reference["losses"]), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                               torch.tensor(reference["grad_norms"]), rtol=LOSS_RTOL, atol=0)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=LOSS_RTOL)
    # The Adam bounds take the reference's first group's learning rate, the largest (muP
    # only lowers the hidden weights'), so they are looser for those, never wrong.
    assert_weights_match(result["final"], reference)


def test_mup_run_resumes_bitwise_with_its_per_layer_learning_rates(tmp_path):
    def run(run_dir, *overrides):
        cfg = micro_config(run_dir, "trainer.max_steps=4", *MUP, *overrides)
        trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg))
        trainer.fit()
        return trainer

    _, resumed = cut_and_resume(run, tmp_path, 2)
    resumed_dir = tmp_path / "resumed"
    reference, after = logged_losses(tmp_path / "full"), logged_losses(resumed_dir)
    assert sorted(after) == [3, 4]
    assert all(after[step] == reference[step] for step in after)
    scales = sorted({group["lr_scale"] for group in resumed.optimizer.param_groups})
    assert scales == [0.5, 1.0]  # hidden weights at 1/m with m = 64 / 32
