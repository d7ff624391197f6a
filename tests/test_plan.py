"""sf-plan (launch/plan.py, planner/): the layouts of a cluster run, their memory and speed,
and one clear error line for input no layout can serve."""

from __future__ import annotations

import json

import pytest

from commands import run_tool
from micro_runs import micro_config
from scaleforge.core.flops import attention_flops_per_token
from scaleforge.models.param_count import attention_params, ffn_params
from scaleforge.planner.activations import ActivationSetting, in_flight_micro_batches
from scaleforge.planner.hardware import gpu_spec
from scaleforge.planner.memory_traffic import block_forward_bytes
from scaleforge.planner.search import plan_layouts
from scaleforge.planner.shards import ShardProbe, fake_world
from scaleforge.planner.step_time import HBM_EFFICIENCY, float8_gathered_fraction

# Llama's cluster batch: sf-plan plans at sf-train's sequence length and batch unless told.
CLUSTER_BATCH = ["data.seq_len=4096", "trainer.global_batch_tokens=4194304"]


def test_llama_70b_on_512_h100_lists_fitting_layouts_fastest_first(tmp_path):
    result = run_tool("sf-plan", "model=llama_70b", "gpus=512", "gpu=h100", *CLUSTER_BATCH,
                      f"out={tmp_path / 'plan.json'}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    layouts = json.loads((tmp_path / "plan.json").read_text())["layouts"]
    fitting = [layout for layout in layouts if layout["fits"]]
    assert fitting and len(fitting) < len(layouts)
    speeds = [layout["tokens_per_s_per_gpu"] for layout in fitting]
    assert speeds == sorted(speeds, reverse=True)
    for layout in fitting:  # each fits 90% of 80 GB and multiplies to the world size
        assert layout["memory_bytes"]["total"] <= 0.9 * 80e9
        p = layout["parallel"]
        assert p["tp"] * p["pp"] * p["dp_replicate"] * p["dp_shard"] == 512
        assert p["tp"] <= 8  # within a node
    best = fitting[0]
    assert 0.2 < best["mfu"] < 0.7
    # a layout that does not fit names what overflows and the settings that would fit
    assert "do not fit; the closest:" in result.stdout
    assert " are left after " in result.stdout or " are usable: " in result.stdout
    assert ": fits with " in result.stdout
    # the command of the fastest layout, for 64 nodes of 8
    assert best["command"].startswith("torchrun --nnodes=64 --nproc-per-node=8 ")
    assert best["command"] in result.stdout
    assert "model=llama_70b" in best["command"] and "data.seq_len=4096" in best["command"]


def test_explicit_parallel_settings_pin_the_layout_and_the_json_has_the_issues_fields(tmp_path):
    result = run_tool("sf-plan", "model=llama_70b", "gpus=512", "gpu=h100", *CLUSTER_BATCH,
                      "parallel.tp=8",
                      "parallel.pp=4", "parallel.dp_shard=16", "out=p.json", cwd=tmp_path,
                      timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    layouts = json.loads((tmp_path / "p.json").read_text())["layouts"]
    assert layouts
    for layout in layouts:
        assert set(layout) == {"parallel", "activation_checkpointing", "micro_batch_size",
                               "fits", "memory_bytes", "step_time_s",
                               "tokens_per_s_per_gpu", "mfu", "command"}
        assert "parallel.tp=8 parallel.pp=4 parallel.dp_replicate=1 parallel.dp_shard=16" \
            in layout["command"]
        parallel = layout["parallel"]
        assert (parallel["tp"], parallel["pp"], parallel["dp_replicate"],
                parallel["dp_shard"], parallel["cp"]) == (8, 4, 1, 16, 1)
        assert set(layout["memory_bytes"]) == {"params", "grads", "optimizer", "activations",
                                               "total"}
    assert any(layout["fits"] for layout in layouts)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["model=llama_7b", "gpus=8", "gpu=v100"], "gpu='v100' is unknown"),
        (["model=llama_7b", "gpus=7", "gpu=h100"], "no layout of gpus=7"),
        (["model=llama_70b", "gpus=8", "gpu=h100", "gpu_memory_gb=2"],
         "one transformer block of model llama_70b needs"),
        (["model=llama_7b", "gpus=8", "gpu=a100", "trainer.fp8=tensorwise"],
         "trainer.fp8=tensorwise on gpu=a100: it has no float8 tensor cores"),
    ],
    ids=["unknown-gpu", "no-layout-divides", "a-block-exceeds-memory", "fp8-on-a100"],
)
def test_bad_input_gets_one_error_line_and_exit_status_2(tmp_path, arguments, named):
    result = run_tool("sf-plan", *arguments, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert named in result.stderr


def test_in_flight_micro_batches_follow_each_schedule():
    assert in_flight_micro_batches(None, 1, 0, 8) == 1
    assert in_flight_micro_batches("GPipe", 4, 3, 8) == 8
    assert [in_flight_micro_batches("1F1B", 4, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches("1F1B", 4, 0, 2) == 2  # never more than the step has
    # torch's interleaved warmup: (v-1) x m/rounds + 2 (pp-1-rank), plus one, per v chunks
    assert in_flight_micro_batches("Interleaved1F1B", 4, 0, 8, 2) == (4 + 6 + 1) / 2
    assert in_flight_micro_batches("Interleaved1F1B", 4, 3, 8, 2) == (4 + 0 + 1) / 2


def test_the_planner_rejects_what_the_trainer_rejects(tmp_path):
    # llama_micro has 2 kv heads and 2 layers: tp 4 and 8, pp 4 and 8 never pass
    # core.config.validate
    cfg = micro_config(tmp_path, "trainer.micro_batch_size=1")
    with fake_world(8):
        rows = plan_layouts(cfg, 8, gpu_spec("h100"), 8, set(), ShardProbe(cfg))
    layouts = {(row.layout.tp, row.layout.pp) for row in rows}
    assert all(tp <= 2 and pp <= 2 for tp, pp in layouts)
    assert (2, 2) in layouts and (1, 1) in layouts


def test_step_time_splits_compute_into_matmuls_attention_and_memory_bound_work(tmp_path):
    """One GPU, llama_micro: the attention term is the scores-and-values FLOPs at the GPU's
    attention rate; selective checkpointing adds the forward FLOPs of wk, wo and w3 per
    block (the matmuls it does not keep), full those of the block up to w2; and the
    memory-bound term grows by a third of its blocks' forward-and-backward traffic when
    checkpointing reruns their elementwise ops."""
    cfg = micro_config(tmp_path, "trainer.micro_batch_size=8")
    m, gpu = cfg.model, gpu_spec("h100")
    tokens = cfg.trainer.global_batch_tokens
    with fake_world(1):
        rows = {row.layout.checkpointing: row
                for row in plan_layouts(cfg, 1, gpu, 8, {"trainer.micro_batch_size"},
                                        ShardProbe(cfg))}
    none, selective, full = (rows[mode].time for mode in ("none", "selective", "full"))
    attention = 3 * attention_flops_per_token(m, cfg.data.seq_len) * tokens
    assert none.attention_s == pytest.approx(attention / (gpu.peak_flops
                                                          * gpu.attention_efficiency))
    assert none.compute_s == pytest.approx(none.matmul_s + none.attention_s + none.memory_s)
    q, kv, f = m.n_heads * m.head_size, m.kv_heads * m.head_size, m.mlp_hidden
    rate = gpu.peak_flops * gpu.matmul_efficiency
    recomputed = 2 * m.d_model * (kv + m.d_model + f) * m.n_layers * tokens
    assert selective.matmul_s - none.matmul_s == pytest.approx(recomputed / rate)
    block = 2 * m.d_model * (q + 2 * kv + m.d_model + 2 * f) * m.n_layers * tokens
    assert full.matmul_s - none.matmul_s == pytest.approx(block / rate)
    assert full.attention_s == pytest.approx(none.attention_s * 4 / 3)
    setting = ActivationSetting(m, cfg.data.seq_len, 8, precision="fp32")
    forward_bytes = block_forward_bytes(setting) * m.n_layers * tokens
    assert selective.memory_s - none.memory_s == pytest.approx(
        forward_bytes / (gpu.hbm_bytes_per_s * HBM_EFFICIENCY))


def test_context_parallel_divides_a_ranks_activations_and_adds_the_kv_all_gather(tmp_path):
    # 4 GPUs as FSDP over 4 ranks, or FSDP over dp_shard 2 x cp 2: the same weight shards,
    # each cp rank holding half of every sequence's tokens (plus the gathered K and V).
    pinned = {"parallel.tp", "parallel.pp", "parallel.cp", "parallel.dp_replicate",
              "trainer.micro_batch_size",
              "trainer.activation_checkpointing"}
    rows = {}
    for cp in (1, 2):
        cfg = micro_config(tmp_path, "trainer.micro_batch_size=1", f"parallel.cp={cp}")
        with fake_world(4):
            [rows[cp]] = plan_layouts(cfg, 4, gpu_spec("h100"), 8, pinned, ShardProbe(cfg))
    single, split = rows[1], rows[2]
    assert (split.layout.dp_shard, split.config.parallel.cp) == (2, 2)
    assert split.memory.params == single.memory.params
    assert 0.5 < split.memory.activations / single.memory.activations < 0.6
    assert split.time.comm_bytes["cp"] > 0 and "cp" not in single.time.comm_bytes


@pytest.mark.parametrize("grouped_mm", ["grouped", "loop"])
def test_moe_memory_follows_the_experts_and_the_dense_layers(grouped_mm):
    """sf-plan's bytes of a MoE model (a dense first layer, then 8 routed experts top 2 and a
    shared one) against one step's (bench/plan_memory.py): state exact (counting the dense
    layer as a MoE one was 21% over) and activations within 5% of autograd's saved tensors
    (counting the dense MLP's instead was 21% under; leaving out the grouped GEMM's padded
    buffer, 12.9% under: 9,471,336 measured)."""
    from scaleforge.bench.plan_memory import BASE, MOE, measure, planned
    from scaleforge.core.config import compose, to_config

    cfg = to_config(compose(BASE + MOE + ["model.moe.shared_experts=1",
                                          "model.moe.first_dense_layers=1",
                                          f"model.moe.grouped_mm={grouped_mm}"]))
    expected, measured = planned(cfg, 1)[0], measure(cfg, 1)
    for state in ("params", "grads", "optimizer"):
        assert int(expected[state]) == measured[state], state
    assert expected["activations"] == pytest.approx(measured["activations"], rel=0.05)


def _fastest(tmp_path, *overrides: str) -> dict:
    tmp_path.mkdir()
    result = run_tool("sf-plan", "model=llama3_8b", "gpus=8", "gpu=h100", *overrides,
                      "out=p.json", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "p.json").read_text())["layouts"]
    assert rows[0]["fits"]
    return rows[0]


@pytest.mark.slow
def test_fp8_plans_a_faster_llama3_8b_step_on_h100(tmp_path):
    bf16 = _fastest(tmp_path / "bf16")
    fp8 = _fastest(tmp_path / "fp8", "trainer.fp8=tensorwise")
    assert "trainer.fp8=tensorwise" in fp8["command"]
    speedup = fp8["tokens_per_s_per_gpu"] / bf16["tokens_per_s_per_gpu"]
    # the block matmuls at twice the rate, the rest unchanged: faster, and by less than 2x
    assert 1.1 < speedup < 2, speedup


def test_fp8_runs_block_matmuls_at_the_fp8_peak_and_halves_tensorwise_gathers(tmp_path):
    """dp_shard 2, llama_micro: with trainer.fp8 the blocks' projection FLOPs go at the fp8
    rate and the head at bf16's; tensorwise gathers the block projection weights in one
    byte instead of two, rowwise in two."""
    gpu = gpu_spec("h100")
    times = {}
    for recipe in ("none", "tensorwise", "rowwise"):
        cfg = micro_config(tmp_path, "trainer.precision=bf16", "parallel.dp_shard=2",
                           "trainer.activation_checkpointing=none", f"trainer.fp8={recipe}")
        pinned = {"parallel.dp_shard", "parallel.tp", "parallel.pp",
                  "trainer.activation_checkpointing", "trainer.micro_batch_size"}
        with fake_world(2):
            (row,) = plan_layouts(cfg, 2, gpu, 8, pinned, ShardProbe(cfg))
        times[recipe] = row.time
    m, tokens = cfg.model, cfg.trainer.global_batch_tokens / 2
    head = 6 * m.d_model * m.vocab_rows * tokens
    blocks = 6 * tokens * sum(attention_params(m, biases=False)
                              + ffn_params(m, layer, True, biases=False)
                              for layer in range(m.n_layers))
    rate = gpu.matmul_efficiency
    assert times["none"].matmul_s == pytest.approx((blocks + head) / (gpu.peak_flops * rate))
    assert gpu.fp8_peak_flops == 1979e12
    for recipe in ("tensorwise", "rowwise"):
        assert times[recipe].matmul_s == pytest.approx(
            blocks / (gpu.fp8_peak_flops * rate) + head / (gpu.peak_flops * rate))
    gathered = times["none"].comm_bytes["dp_shard"]
    assert times["rowwise"].comm_bytes["dp_shard"] == gathered
    fraction = float8_gathered_fraction(m)
    assert 0.5 < fraction < 1
    # Per step: 2 all-gathers (forward, and backward after resharding) of the one
    # micro-batch, 2 bytes per element, then one fp32 reduce-scatter: (2 x 2 + 4) x share x
    # total bytes. Tensorwise saves one byte per block projection element in each gather:
    # 2 x fraction x share x total, i.e. fraction / 4 of the bf16 plan's bytes.
    saved = gathered - times["tensorwise"].comm_bytes["dp_shard"]
    assert saved == pytest.approx(fraction / 4 * gathered)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_saves_the_same_activations_and_the_plan_counts_them_unchanged(recipe):
    """One step's saved tensors (bench/plan_memory.py's meter) with trainer.fp8 equal those
    without: torchao's Float8Linear saves the matmul's high-precision input and weight for
    backward, as nn.Linear does, and casts to float8 again there (measured 5,979,912 bytes
    all three ways, and 2,436,872 with selective checkpointing); the state is unchanged
    (torchao keeps fp32 weights) and the plan's activations are the same figure."""
    from scaleforge.bench.plan_memory import BASE, measure, planned
    from scaleforge.core.config import compose, to_config

    pytest.importorskip("torchao.float8")
    figures = {}
    for fp8 in ("none", recipe):
        cfg = to_config(compose(BASE + [f"trainer.fp8={fp8}"]))
        figures[fp8] = (planned(cfg, 1)[0], measure(cfg, 1))
    (plan_none, none), (plan_fp8, fp8) = figures["none"], figures[recipe]
    for key in ("params", "grads", "optimizer", "activations"):
        assert fp8[key] == none[key], key
        assert plan_fp8[key] == plan_none[key], key


def test_fp8_buffers_drop_autocast_copies_and_gather_tensorwise_weights_in_one_byte(tmp_path):
    """sf-plan's buffers with trainer.fp8 (planner/buffers.py), llama_micro in bf16: without
    data parallelism autocast keeps bf16 copies of the weights torchao does not convert
    only; under dp_shard 2 tensorwise gathers the converted share in 1 byte, rowwise in the
    compute dtype's 2."""
    from scaleforge.core.config import validate
    from scaleforge.planner.search import rank_memory

    buffers, gathered = {}, {}
    for dp_shard in (1, 2):
        for recipe in ("none", "tensorwise", "rowwise"):
            cfg = micro_config(tmp_path, "trainer.precision=bf16", f"trainer.fp8={recipe}",
                               f"parallel.dp_shard={dp_shard}",
                               "parallel.fsdp_reshard_after_forward=false")
            with fake_world(dp_shard):
                dims, probe = validate(cfg, dp_shard), ShardProbe(cfg)
                buffers[dp_shard, recipe] = rank_memory(cfg, dims, 0, probe).buffers
                gathered[dp_shard] = probe.rank_state(dims, 0, None, 1, None)[1]
    fraction = float8_gathered_fraction(cfg.model)
    converted = {dp: gathered[dp].total * fraction for dp in (1, 2)}
    assert buffers[1, "none"] == 2 * gathered[1].total
    for recipe in ("tensorwise", "rowwise"):
        assert buffers[1, recipe] == pytest.approx(2 * (gathered[1].total - converted[1]))
    # dp_shard 2, resharding off: every weight gathered, every gradient unsharded (fp32)
    assert buffers[2, "rowwise"] == buffers[2, "none"]
    assert buffers[2, "none"] - buffers[2, "tensorwise"] == pytest.approx(converted[2])
