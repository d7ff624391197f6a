"""Mixture-of-Experts layers (models/moe.py): routing against a token-by-token reference,
grouped GEMM against the loop (uneven and empty groups, padded groups), the experts' dtype
under autocast, capacity dropping, the auxiliary loss's gradient, the aux-loss-free bias and
its one all-reduce per step, parameter counts against the papers, and training through the
Trainer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from micro_runs import micro_config, synthetic_data
from scaleforge.core.config import compose, to_config
from scaleforge.core.flops import matmul_params
from scaleforge.core.trainer import Trainer
from scaleforge.errors import ConfigError
from scaleforge.models import build, count_parameters, num_params
from scaleforge.models.config import as_transformer_config
from scaleforge.models.moe import (
    GROUP_ALIGNMENT,
    Experts,
    MoE,
    moe_layers,
    pad_groups,
    update_expert_bias,
)
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.expert_load import ExpertLoad
from scaleforge.parallel.run_setup import init_topology
from scaleforge.parallel.topology import ParallelDims
from scaleforge.planner.hardware import gpu_spec
from scaleforge.planner.search import plan_layouts
from scaleforge.planner.shards import GatheredElements, ShardProbe, fake_world
from scaleforge.planner.step_time import StepWork, compute_times
from scaleforge.planner.table import layout_record
from scaleforge.scaling.flops import model_size
from scaleforge.scaling.run_record import summarize_run

MICRO_MOE = dict(name="m", n_layers=3, d_model=32, n_heads=4, vocab_size=128, max_seq_len=32,
                 ffn_hidden=64)


def moe_config(**moe: object) -> dict:
    return MICRO_MOE | {"moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16} | moe}


def reference(module: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the top-k experts' SwiGLU outputs weighted by their scores."""
    tokens = x.reshape(-1, x.size(-1))
    out = torch.zeros_like(tokens)
    w1, w3, w2 = module.experts.w1, module.experts.w3, module.experts.w2
    for t, token in enumerate(tokens):
        logits = module.router(token).float()
        scores = logits.softmax(-1) if module.score_func == "softmax" else logits.sigmoid()
        chosen = (scores + module.expert_bias).topk(module.top_k).indices
        weights = scores[chosen] / scores[chosen].sum()
        for e, weight in zip(chosen.tolist(), weights, strict=True):
            out[t] += weight * (w2[e] @ (F.silu(w1[e] @ token) * (w3[e] @ token)))
        if module.shared is not None:
            out[t] += module.shared(token)
    return out.view_as(x)


@pytest.mark.parametrize("score_func,shared", [("softmax", 0), ("sigmoid", 2)])
def test_routing_matches_token_by_token_reference(score_func: str, shared: int) -> None:
    model = build(moe_config(score_func=score_func, shared_experts=shared), seed=1)
    module = model.layers["0"].feed_forward
    assert isinstance(module, MoE)
    module.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # steers the choice only
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(module(x), reference(module, x), rtol=1e-5, atol=1e-6)


def test_grouped_mm_matches_loop_forward_and_backward() -> None:
    x = torch.randn(3, 7, 32)
    results = []
    for mode in ("loop", "grouped"):
        module = build(moe_config(grouped_mm=mode), seed=2).layers["0"].feed_forward
        out = module(x)
        out.square().sum().backward()
        results.append([out, *(w.grad for w in (module.experts.w1, module.experts.w3,
                                                 module.experts.w2, module.router.weight))])
    for loop, grouped in zip(*results, strict=True):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)


def test_pad_groups_pads_each_group_to_the_alignment_without_moving_rows() -> None:
    x = torch.arange(17.0).unsqueeze(1).expand(17, 3)
    counts = torch.tensor([5, 0, 11, 1])
    buffer, offsets, rows = pad_groups(x, counts)
    # groups of at least one alignment, each a multiple: 8, 8, 16, 8 rows
    assert GROUP_ALIGNMENT == 8
    assert offsets.dtype == torch.int32 and offsets.tolist() == [8, 16, 32, 40]
    assert buffer.shape == (17 + 4 * 8, 3)
    assert rows.tolist() == [*range(0, 5), *range(16, 27), 32]
    torch.testing.assert_close(buffer[rows], x, rtol=0, atol=0)
    padding = torch.ones(buffer.size(0), dtype=torch.bool)
    padding[rows] = False
    assert buffer[padding].abs().sum() == 0


def _experts(dtype: torch.dtype, device: str, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(4, 32, 16, "grouped")
    with torch.no_grad():
        for weight in (experts.w1, experts.w3, experts.w2):
            weight.normal_(0, 0.2)
    return experts.to(device=device, dtype=dtype)


GROUP_CASES = [[5, 0, 11, 1], [0, 0, 17, 0], [8, 16, 0, 3], [0, 0, 0, 0]]
# fp32: both sum in fp32 in a different order; bf16: torch.testing's default for bf16 (each
# output rounded to bf16's 8-bit mantissa once or twice more on one side than the other).
GROUPED_TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {}}


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.float32), ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("counts", GROUP_CASES, ids=["uneven", "one", "aligned", "empty"])
def test_grouped_experts_match_the_loop_with_uneven_and_empty_groups(
        device: str, dtype: torch.dtype, counts: list[int]) -> None:
    """Forward and every gradient of the padded grouped GEMM against the loop over experts,
    groups of 0, 1, uneven and aligned sizes, and no rows at all."""
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm runs on CUDA from compute capability 9.0")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 32, generator=generator).to(device=device, dtype=dtype)
    upstream = torch.randn(sum(counts), 32, generator=generator).to(device=device, dtype=dtype)
    results = []
    for mode in ("loop", "grouped"):
        experts = _experts(dtype, device)
        experts.grouped_mm = mode
        inputs = x.clone().requires_grad_()
        out = experts(inputs, torch.tensor(counts, device=device))
        out.backward(upstream)
        results.append([out, inputs.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad])
    for loop, grouped in zip(*results, strict=True):
        torch.testing.assert_close(grouped, loop, **GROUPED_TOLERANCE[dtype])


def test_experts_compute_in_the_autocast_dtype_and_take_the_grouped_path(monkeypatch) -> None:
    """Under bf16 autocast the residual stream stays fp32; the experts still get bf16 (the
    dtype CUDA's grouped GEMM runs in) and run as torch._grouped_mm; the layer's output keeps
    the residual stream's dtype."""
    module = build(moe_config(), seed=5).layers["0"].feed_forward
    received: list[torch.dtype] = []
    module.experts.register_forward_pre_hook(lambda _, args: received.append(args[0].dtype))
    grouped_calls: list[torch.dtype] = []
    # models/moe.py calls torch._grouped_mm through its module-level name where it has one
    # (the compat module's), else torch's.
    import scaleforge.models.moe as moe_module

    owner = moe_module if hasattr(moe_module, "grouped_mm") else torch
    name = "grouped_mm" if owner is moe_module else "_grouped_mm"
    grouped_mm = getattr(owner, name)

    def counted(a: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        grouped_calls.append(a.dtype)
        return grouped_mm(a, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert received == [torch.bfloat16]
    assert grouped_calls == [torch.bfloat16] * 3
    assert out.dtype == torch.float32
    received.clear()
    module(x)  # without autocast: the stream's own dtype
    assert received == [torch.float32]


@pytest.mark.cuda
def test_experts_get_bf16_and_the_grouped_path_on_cuda_under_autocast() -> None:
    from scaleforge.models.moe import use_grouped_mm

    module = build(moe_config(), device="cuda", seed=5).layers["0"].feed_forward
    received: list[torch.Tensor] = []
    module.experts.register_forward_pre_hook(lambda _, args: received.append(args[0]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        module(torch.randn(2, 5, 32, device="cuda")).float().sum().backward()
    assert received[0].dtype == torch.bfloat16
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert use_grouped_mm("auto", received[0]) == hopper


class CountingCollectives:
    """Counts the torch.distributed collectives called while installed (on torch's fake
    process group they do nothing else): (name, group size) per call."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "all_to_all_single", "broadcast", "send", "recv")

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[tuple[str, int]] = []
        for name in self.NAMES:
            monkeypatch.setattr(torch.distributed, name, self._counted(name))

    def _counted(self, name: str):
        real = getattr(torch.distributed, name)

        def counted(*args: object, group=None, **kwargs: object):
            self.calls.append((name, torch.distributed.get_world_size(group)))
            return real(*args, group=group, **kwargs)

        return counted


@pytest.mark.parametrize("sizes", [
    {"dp_shard": 2}, {"dp_replicate": 2, "dp_shard": 2}, {"dp_shard": 2, "cp": 2},
    {"dp_replicate": 2, "dp_shard": 2, "cp": 2}, {"cp": 2, "tp": 2}, {"tp": 2}])
def test_expert_load_sums_every_moe_layer_in_one_all_reduce_per_step(
        sizes: dict, monkeypatch) -> None:
    """Three MoE layers' loads, dropped counts and aux losses travel in one all-reduce over
    every rank that sees other tokens (dp_replicate x dp_shard x cp), none when there are
    none (tp ranks route the same tokens)."""
    cfg = moe_config(aux_loss_coef=0.01, bias_update_rate=0.001)
    model = build(cfg, seed=6)
    assert len(moe_layers(model)) == 3
    dims = ParallelDims(**{"tp": 1, "pp": 1, "dp_replicate": 1, "dp_shard": 1} | sizes)
    with fake_world(dims.world_size):
        topology = init_topology(ParallelConfig(**sizes), dims, "cpu")
        expert_load = ExpertLoad(model, topology, as_transformer_config(cfg), micro_batches=1)
        model(torch.randint(128, (2, 8)))
        counter = CountingCollectives(monkeypatch)
        expert_load.step()
    token_ranks = dims.dp_replicate * dims.dp_shard * dims.cp
    assert counter.calls == ([("all_reduce", token_ranks)] if token_ranks > 1 else [])
    assert sorted(expert_load.last) == [0, 1, 2]


def test_capacity_factor_drops_and_counts_overflow() -> None:
    model = build(moe_config(capacity_factor=0.5), seed=3)
    module = model.layers["0"].feed_forward
    x = torch.randn(1, 16, 32)
    module(x)
    capacity = 4  # ceil(0.5 x 16 tokens x top 2 / 4 experts)
    load = module.load
    assert load.sum() == 32  # routed, before dropping
    assert module.dropped == (load - load.clamp(max=capacity)).sum() > 0
    dropless = build(moe_config(), seed=3).layers["0"].feed_forward
    dropless(x)
    assert dropless.dropped == 0


def test_aux_loss_gradient_is_added_in_backward() -> None:
    """With the auxiliary loss the router's gradient is that of output + coef x aux."""
    x = torch.randn(2, 6, 32)
    grads = []
    for coef in (0.0, 0.5):
        module = build(moe_config(aux_loss_coef=coef), seed=4).layers["0"].feed_forward
        module(x).square().sum().backward()
        grads.append(module.router.weight.grad.clone())
    module = build(moe_config(), seed=4).layers["0"].feed_forward
    scores = module.router(x.reshape(-1, 32)).float().softmax(-1)
    chosen = scores.topk(2, dim=-1).indices.flatten()
    fraction = torch.bincount(chosen, minlength=4).float() / chosen.numel()
    aux = 0.5 * 4 * (fraction * scores.mean(0)).sum()
    (aux_grad,) = torch.autograd.grad(aux, module.router.weight)
    torch.testing.assert_close(grads[1] - grads[0], aux_grad, rtol=1e-4, atol=1e-7)


def test_expert_bias_moves_towards_the_mean_load() -> None:
    module = build(moe_config(), seed=0).layers["0"].feed_forward
    update_expert_bias(module, torch.tensor([10.0, 2.0, 4.0, 0.0]), 0.01)
    torch.testing.assert_close(module.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))


def test_dense_first_layers_and_every_n() -> None:
    cfg = as_transformer_config(moe_config(first_dense_layers=1, every_n_layers=2) |
                                {"n_layers": 5})
    assert [i for i in range(5) if cfg.moe.is_moe_layer(i)] == [2, 4]
    assert sorted(moe_layers(build(cfg, device="meta"))) == [2, 4]


@pytest.mark.parametrize("name,total,active", [
    # Mixtral 8x7B as released (46.7B, 12.9B active: Jiang et al. 2024, "47B" / "13B").
    ("mixtral_8x7b", 46_702_792_704, 12_879_925_248),
    # DeepSeekMoE 16B (Dai et al. 2024): "16.4B" total, "2.8B" activated.
    ("deepseek_v3_16b", 16_375_728_128, 2_828_650_496),
    # moe_tiny: llama_tiny's active count (1,311,872) plus 4 routers of 128 x 8.
    ("moe_tiny", 3_085_440, 1_311_872 + 4 * 128 * 8),
])
def test_preset_parameter_counts(name: str, total: int, active: int) -> None:
    cfg = to_config(compose([f"model={name}"])).model
    assert num_params(cfg) == total
    assert num_params(cfg, active=True) == active
    assert count_parameters(build(cfg, device="meta")) == total


def test_flops_count_active_parameters() -> None:
    cfg = to_config(compose(["model=moe_tiny"])).model
    dense = to_config(compose(["model=llama_tiny"])).model
    assert matmul_params(cfg) - matmul_params(dense) == 4 * 128 * 8  # the routers


@pytest.mark.parametrize("setting,message", [
    ("model.moe.top_k=9", "model.moe.top_k=9"),
    ("model.moe.score_func=relu", "model.moe.score_func"),
    ("model.moe.first_dense_layers=4", "model.moe.first_dense_layers=4"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor=0"),
])
def test_bad_moe_settings_name_the_setting(setting: str, message: str) -> None:
    cfg = to_config(compose(["model=moe_tiny", setting]))
    with pytest.raises(ConfigError, match=message):
        cfg.model.check("model")


def test_trainer_logs_moe_metrics_and_balances(tmp_path) -> None:
    cfg = micro_config(tmp_path, "model.moe.num_experts=4", "model.moe.expert_hidden=32",
                       "model.moe.bias_update_rate=0.01", "model.moe.aux_loss_coef=0.01",
                       "model.moe.capacity_factor=1.0", "checkpoint.at_end=false")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert {"aux_loss", "expert_load", "expert_load.0", "dropped_tokens.1"} <= set(last)
    assert last["expert_load"] >= 1 and last["aux_loss"] > 0 and last["dropped_tokens"] > 0
    bias = trainer.model_parts[0].layers["0"].feed_forward.expert_bias
    assert 0 < bias.abs().max() <= 5 * 0.01 + 1e-6  # at most the rate per step, 5 steps
    record = summarize_run(cfg, tmp_path)  # the scaling tools' record: both counts
    assert record["N_active"] == num_params(cfg.model, False, active=True) < record["N"]


def test_scaling_counts_use_active_parameters() -> None:
    cfg = to_config(compose(["model=moe_tiny"])).model
    size = model_size(cfg, 256)
    assert size.active_non_embedding_params == num_params(cfg, False, active=True)
    assert size.active_non_embedding_params < size.non_embedding_params
    assert size.flops_per_token_6n == 6 * num_params(cfg, active=True)


def test_sf_plan_shards_experts_over_the_data_parallel_ranks(tmp_path) -> None:
    """The planner picks ep = dp_shard for a MoE model and counts each rank's share of the
    experts: deepseek_v3_16b on 16 GPUs holds fewer parameter bytes per rank at dp_shard 16
    (4 experts per rank) than at tp 8 x dp_shard 2 (32 experts per rank, ep 2)."""
    cfg = to_config(compose(["model=deepseek_v3_16b", "trainer.global_batch_tokens=1048576",
                             "data.seq_len=4096", "trainer.precision=bf16"]))
    with fake_world(16):
        rows = plan_layouts(cfg, 16, gpu_spec("h100"), 8, {"parallel.pp"}, ShardProbe(cfg))
    by_layout = {(row.layout.tp, row.layout.dp_shard): row for row in rows}
    wide, narrow = by_layout[(1, 16)], by_layout[(8, 2)]
    assert wide.config.parallel.ep == 16 and narrow.config.parallel.ep == 2
    assert layout_record(wide)["parallel"]["ep"] == 16
    total = num_params(cfg.model) * 4  # fp32 master weights
    assert wide.memory.params < total / 16 * 1.1 < narrow.memory.params
    # Each MoE layer's all-to-all: the k assignments of a rank's tokens out and back, in
    # forward and backward, (ep - 1) / ep of them leaving the rank; bf16 rows of d_model.
    # Under tp every tp rank sends the whole sequence's rows.
    m = cfg.model
    moe_layers = sum(m.moe.is_moe_layer(layer) for layer in range(m.n_layers))
    for row in (wide, narrow):
        t, ep, dp = row.config.trainer, row.config.parallel.ep, row.layout.dp_shard
        micro_batches = t.global_batch_tokens // (dp * t.micro_batch_size * cfg.data.seq_len)
        rows = t.micro_batch_size * cfg.data.seq_len * m.moe.top_k
        assert row.time.comm_bytes["ep"] == pytest.approx(
            moe_layers * 4 * micro_batches * (ep - 1) / ep * rows * m.d_model * 2)


@pytest.mark.parametrize("etp", [1, 2])
def test_sf_plan_step_time_counts_experts_every_tp_rank_runs_whole(etp: int) -> None:
    """Under tp 2 a MoE layer's router, and under etp 1 its experts too, run whole on every
    tp rank: the planned matmul time is the dense share / 2 plus those FLOPs whole."""
    m = to_config(compose(["model=moe_tiny"])).model
    gpu, tokens = gpu_spec("h100"), 65536

    def matmul_s(tp: int) -> float:
        dims = ParallelDims(tp=tp, pp=1, dp_replicate=1, dp_shard=1)
        work = StepWork(m, 256, tokens, 8, tokens // (8 * 256), dims, None, 1, "none", 1,
                        "bf16", True, GatheredElements(0, 0, 0), 1, etp if tp > 1 else 1)
        return compute_times(work, gpu)[0]

    expert = 3 * m.d_model * m.moe.expert_hidden
    whole = 6 * m.n_layers * (m.d_model * m.moe.num_experts
                              + (m.moe.top_k * expert if etp == 1 else 0))
    extra = whole / 2 * tokens / (gpu.peak_flops * gpu.matmul_efficiency)
    assert matmul_s(2) == pytest.approx(matmul_s(1) / 2 + extra)
