"""Start-up that holds only its shard (models/init.py, parallel/parallelize.py): each
parameter drawn from its own generator keyed by (seed, name), each rank drawing one full
parameter at a time and keeping its shard. That the weights of every layout equal the
single-process draw bitwise is checked by tests/test_parallel_layouts.py ("initial");
here: the draw itself, the memory bound per rank, and tied embeddings under a V pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distributed import run_distributed_test
from layout_runs import assert_weights_match, run_layout, train_and_record
from micro_runs import micro_config
from scaleforge.core.config import build_plan, validate
from scaleforge.core.trainer import start_topology
from scaleforge.errors import ConfigError
from scaleforge.models import build
from scaleforge.models.init import parameter_seed
from scaleforge.parallel.parallelize import build_model, build_pipelined_model
from scaleforge.torch_compat import mem_tracker

# What a V schedule over 2 ranks needs: 4 stages, 4 micro-batches, whole evaluation groups.
V_PIPELINE = ("parallel.pp_stages_per_rank=2", "model.n_layers=4",
              "trainer.global_batch_tokens=1024", "trainer.eval_batches=4")


def test_a_parameter_depends_only_on_the_seed_and_its_name(tmp_path):
    cfg = micro_config(tmp_path).model
    first = build(cfg, seed=7).state_dict()
    assert all(torch.equal(v, build(cfg, seed=7).state_dict()[k]) for k, v in first.items())
    assert not torch.equal(first["layers.0.attention.wq.weight"],
                           build(cfg, seed=8).state_dict()["layers.0.attention.wq.weight"])
    # A deeper model: its first layers' query weights are the same draws (nothing depends on
    # how many parameters were drawn before), its residual projections scaled differently.
    deeper = build(micro_config(tmp_path, f"model.n_layers={cfg.n_layers + 2}").model,
                   seed=7).state_dict()
    assert torch.equal(deeper["layers.1.attention.wq.weight"],
                       first["layers.1.attention.wq.weight"])
    assert torch.equal(deeper["tok_embeddings.weight"], first["tok_embeddings.weight"])
    wo = "layers.1.attention.wo.weight"
    ratio = deeper[wo].std() / first[wo].std()
    expected = (cfg.n_layers / (cfg.n_layers + 2)) ** 0.5
    assert ratio.item() == pytest.approx(expected, rel=0.05)
    assert parameter_seed(7, "a") != parameter_seed(7, "b") != parameter_seed(8, "b")


def test_seed_none_takes_one_draw_from_torchs_global_generator(tmp_path):
    cfg = micro_config(tmp_path).model
    torch.manual_seed(3)
    first = build(cfg)
    torch.manual_seed(3)
    again = build(cfg)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(),
                                                 strict=True))
    assert not torch.equal(first.output.weight, build(cfg).output.weight)


def _start_up_memory(overrides: tuple[str, ...]) -> dict[str, int]:
    """Build this rank's model under a memory tracker: peak and final bytes on the CPU,
    this rank's parameter shard bytes and the largest full parameter of the model."""
    cfg = micro_config("unused", *overrides)
    topology = start_topology(cfg, dist.get_world_size())
    plan = build_plan(cfg, topology.dp_size)
    torch.manual_seed(0)
    tracker = mem_tracker()
    with tracker:
        if topology.dims.pp > 1:
            model = build_pipelined_model(plan, topology).model_parts
        else:
            model = build_model(plan, topology)
    shards = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes
                 for p in model.parameters())
    full = build(cfg.model, device="meta")
    return {
        "peak": tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"],
        "final": tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"],
        "shards": shards,
        "largest": max(p.numel() * p.element_size() for p in full.parameters()),
        "model": sum(p.numel() * p.element_size() for p in full.parameters()),
    }


@pytest.mark.parametrize("overrides", [
    ("parallel.dp_shard=2",),
    ("parallel.tp=2",),
    ("parallel.dp_replicate=2",),
    ("parallel.pp=2",),
    ("parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", *V_PIPELINE),
], ids=lambda o: "_".join(x.split("=")[1] for x in o[:2]))
def test_start_up_holds_its_shard_plus_at_most_one_full_parameter(overrides):
    for rank, memory in enumerate(run_distributed_test(_start_up_memory, world_size=2,
                                                       func_args=(overrides,))):
        # After start-up a rank holds its shards (and the small RoPE tables); while drawing,
        # at most one full parameter more.
        assert memory["final"] - memory["shards"] < 64 * 1024, (rank, memory)
        assert memory["peak"] <= memory["final"] + memory["largest"], (rank, memory)
        if "parallel.dp_replicate=2" not in overrides:  # replication holds a full copy
            assert memory["shards"] < 0.75 * memory["model"], (rank, memory)


def test_tied_embeddings_under_a_v_pipeline_train_as_in_one_process(tmp_path):
    common = ("model.tie_embeddings=true", "optim.grad_clip=0.05", *V_PIPELINE[1:])
    one = micro_config(tmp_path / "one", *common)
    reference = train_and_record(one, tmp_path / "one", 3, world_size=1)
    pipelined = run_layout(micro_config(tmp_path / "pp", *common, "parallel.pp=2",
                                        "parallel.pp_schedule=ZBVZeroBubble",
                                        V_PIPELINE[0]), world_size=2, steps=3)
    assert pipelined["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert_weights_match(pipelined["final"], reference)  # each entry within its Adam bound


def test_tied_embeddings_with_pipeline_and_sharding_are_refused(tmp_path):
    cfg = micro_config(tmp_path, "model.tie_embeddings=true", "parallel.pp=2",
                       "parallel.pp_schedule=ZBVZeroBubble", "parallel.dp_shard=2",
                       *V_PIPELINE[:2], "trainer.global_batch_tokens=2048",
                       "trainer.eval_batches=8", "parallel.fsdp_reshard_after_forward=false")
    with pytest.raises(ConfigError, match="model.tie_embeddings=true with parallel.pp=2 and "
                                          "tensor or data parallelism"):
        validate(cfg, world_size=4)
