"""LoRA (models/lora.py, `model.lora.*`): adapters trained on a frozen base, the optimizer
holding state for them alone, checkpoints of the adapters that resume bitwise over the base
of trainer.init_from, the merged Hugging Face export, and tp2 / dp_shard2 runs that give the
single-process losses (and cp2, pp2)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from layout_runs import LOSS_RTOL, assert_weights_match, run_layout, train_and_record
from micro_runs import micro_config, synthetic_data
from run_metrics import logged_losses
from scaleforge.core.checkpoint.safe_load import read_metadata, saved_shapes
from scaleforge.core.checkpoint.weights import load_model_checkpoint, save_model_checkpoint
from scaleforge.core.trainer import Trainer
from scaleforge.errors import ConfigError
from scaleforge.launch import convert
from scaleforge.models import build
from scaleforge.models.lora import LoRAConfig, LoRALinear, is_adapter

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=1e-2"]
# llama_micro: 2 blocks x (wq, wk, wv, wo, w1, w2, w3) x (A, B)
ADAPTERS_LLAMA_MICRO = 2 * 7 * 2


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A model-only checkpoint of llama_micro (512 ids) with its own random weights: the
    base the LoRA runs start from (trainer.init_from)."""
    out = tmp_path_factory.mktemp("lora_base") / "base"
    cfg = micro_config(out)
    cfg.model.vocab_size = 512
    save_model_checkpoint(build(cfg.model, seed=7).state_dict(), cfg, out)
    return out


def test_lora_trains_the_adapters_alone_and_the_optimizer_holds_no_base_state(
        tmp_path, base_checkpoint):
    cfg = micro_config(tmp_path / "run", *LORA, f"trainer.init_from={base_checkpoint}")
    trainer = Trainer(cfg, tmp_path / "run", data=synthetic_data(cfg))
    model = trainer.model_parts[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        trainer.train_step(trainer.train_batches)
    names = {id(p): n for n, p in model.named_parameters()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == ADAPTERS_LLAMA_MICRO and all(map(is_adapter, trained))
    with_state = [names[id(p)] for p in trainer.optimizer.state]
    assert sorted(with_state) == sorted(trained)  # counted: 28 parameters, adapters only
    optimizer_params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(optimizer_params) == ADAPTERS_LLAMA_MICRO
    after = model.state_dict()
    for name, value in after.items():
        changed = not torch.equal(value, before[name])
        assert changed == is_adapter(name), name
    _, base = load_model_checkpoint(base_checkpoint)
    assert all(torch.equal(after[k], base[k]) for k in base)  # the base is init_from's


def test_lora_checkpoint_holds_the_adapters_and_resumes_bitwise(tmp_path, base_checkpoint):
    settings = [*LORA, f"trainer.init_from={base_checkpoint}", "trainer.max_steps=4",
                "trainer.eval_every=0", "checkpoint.every=2"]
    whole = micro_config(tmp_path / "whole", *settings)
    Trainer(whole, tmp_path / "whole", data=synthetic_data(whole)).fit()
    # Stopped after 2 steps by max_steps=2: micro_config's 2 warmup steps make the learning
    # rates of steps 1 and 2 the same as the whole run's, whatever max_steps.
    first = micro_config(tmp_path / "resumed", *settings[:-2], "trainer.max_steps=2",
                         "trainer.eval_every=0", "checkpoint.every=2")
    Trainer(first, tmp_path / "resumed", data=synthetic_data(first)).fit()
    step = tmp_path / "resumed" / "checkpoints" / "step_2"
    saved = saved_shapes(read_metadata(step), "model")
    assert len(saved) == ADAPTERS_LLAMA_MICRO and all(map(is_adapter, saved))
    resumed = micro_config(tmp_path / "resumed", *settings)
    trainer = Trainer(resumed, tmp_path / "resumed", data=synthetic_data(resumed))
    assert trainer.step == 2
    trainer.fit()
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "whole")
    _, whole_state = load_model_checkpoint(tmp_path / "whole")
    _, resumed_state = load_model_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)


def test_merged_hf_export_gives_the_logits_of_the_adapted_model(tmp_path, base_checkpoint):
    cfg = micro_config(tmp_path / "run", *LORA, f"trainer.init_from={base_checkpoint}",
                       "trainer.max_steps=3", "trainer.eval_every=0")
    Trainer(cfg, tmp_path / "run", data=synthetic_data(cfg)).fit()
    trained_cfg, state = load_model_checkpoint(tmp_path / "run")
    ours = build(trained_cfg.model)
    ours.load_state_dict(state)
    assert any(isinstance(m, LoRALinear) for m in ours.modules())
    assert any(state[k].abs().max() > 0 for k in state if k.endswith("lora_b"))
    convert.dispatch(["to-hf", f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}"])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours.eval()(tokens) - theirs(tokens).logits).abs().max().item()
    assert difference <= 1e-5


def test_peft_adapter_loaded_with_peft_on_the_base_gives_our_logits(tmp_path, base_checkpoint):
    from peft import PeftModel

    cfg = micro_config(tmp_path / "run", *LORA, f"trainer.init_from={base_checkpoint}",
                       "trainer.max_steps=3", "trainer.eval_every=0", "model.lora.dropout=0.1",
                       "model.lora.targets=[attention,w2]")
    Trainer(cfg, tmp_path / "run", data=synthetic_data(cfg)).fit()
    trained_cfg, state = load_model_checkpoint(tmp_path / "run")
    ours = build(trained_cfg.model)
    ours.load_state_dict(state)
    convert.dispatch(["to-hf", f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}",
                      f"peft={tmp_path / 'peft'}"])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    config = theirs.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours.eval()(tokens) - theirs(tokens).logits).abs().max().item()
    assert difference <= 1e-5


def test_peft_export_of_a_run_without_adapters_is_refused(tmp_path):
    cfg = micro_config(tmp_path / "run", "trainer.max_steps=2", "trainer.eval_every=0")
    Trainer(cfg, tmp_path / "run", data=synthetic_data(cfg)).fit()
    with pytest.raises(ConfigError, match="is not a LoRA run"):
        convert.dispatch(["to-hf", f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}",
                          f"peft={tmp_path / 'peft'}"])


@pytest.mark.slow  # 20 s (tp2) to 70 s (pp2) each on 2 loaded cores
@pytest.mark.parametrize("layout, world_size", [
    (["parallel.tp=2"], 2), (["parallel.dp_shard=2"], 2), (["parallel.cp=2"], 2),
    # two stages of two layers, four micro-batches a step (as the pipeline layout tests)
    (["parallel.pp=2", "model.n_layers=4", "trainer.eval_batches=4"], 2)],
    ids=["tp2", "dp_shard2", "cp2", "pp2"])
def test_lora_layout_gives_the_single_process_losses(tmp_path, layout, world_size):
    settings = [*LORA, "trainer.micro_batch_size=2", "optim.grad_clip=0.3",
                *(o for o in layout if not o.startswith("parallel."))]
    reference = train_and_record(micro_config(tmp_path / "one", *settings), tmp_path / "one",
                                 5, 1)
    result = run_layout(micro_config(tmp_path / "run", *settings, *layout), world_size, 5)
    assert result["initial"].keys() == reference["initial"].keys()
    for name, value in reference["initial"].items():
        assert torch.equal(result["initial"][name], value), name
    torch.testing.assert_close(torch.tensor(result["losses"]),
                               torch.tensor(reference["losses"]), rtol=LOSS_RTOL, atol=0)
    assert_weights_match(result["final"], reference)
    for name in reference["final"]:  # the base did not move
        if not is_adapter(name):
            assert torch.equal(result["final"][name], reference["initial"][name]), name


def test_dry_run_counts_gradients_and_adam_state_of_the_adapters_only(tmp_path):
    from scaleforge.parallel.layout import layout_dims
    from scaleforge.planner.shards import ADAM_STEP_BYTES, state_of_parameters

    cfg = micro_config(tmp_path, *LORA)
    cfg.model.vocab_size = 512
    model = build(cfg.model, seed=0)
    state = state_of_parameters(model.named_parameters(), layout_dims(cfg.parallel, 1))
    adapters = [p for n, p in model.named_parameters() if is_adapter(n)]
    adapter_bytes = sum(p.numel() * 4 for p in adapters)
    assert state.params == sum(p.numel() * 4 for p in model.parameters())
    assert state.grads == adapter_bytes
    assert state.optimizer == 2 * adapter_bytes + ADAM_STEP_BYTES * len(adapters)


def test_sf_plan_counts_gradients_and_adam_state_of_the_adapters_only(tmp_path):
    """sf-plan's shard probe (one block, scaled to the model's layers) counts what the dry
    run counts of the built model: the frozen base holds no gradient and no AdamW state."""
    from scaleforge.parallel.layout import layout_dims
    from scaleforge.planner.shards import ShardProbe, state_of_parameters

    cfg = micro_config(tmp_path, *LORA)
    cfg.model.vocab_size = 512
    dims = layout_dims(cfg.parallel, 1)
    planned, _ = ShardProbe(cfg).rank_state(dims, 0)
    built = state_of_parameters(build(cfg.model, seed=0).named_parameters(), dims)
    assert planned == built
    assert planned.grads < planned.params / 10


def test_lora_with_fp8_is_refused_at_start(tmp_path):
    from scaleforge.core.config import validate

    with pytest.raises(ConfigError, match="float8 layers would drop the adapters"):
        validate(micro_config(tmp_path, *LORA, "trainer.fp8=tensorwise"))


def test_lora_settings_are_checked():
    for lora, message in [(LoRAConfig(rank=-1), "model.lora.rank=-1"),
                          (LoRAConfig(rank=4, targets=["attn"]), "model.lora.targets"),
                          (LoRAConfig(rank=4, dropout=1.0), "model.lora.dropout=1.0")]:
        with pytest.raises(ConfigError, match=message):
            lora.check()
