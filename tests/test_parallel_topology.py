"""Layout and backend validation before any process group exists, the mesh helpers that need
no processes (the bubble formula is tested with the pipeline, tests/test_pipeline.py), and
the waits of a distributed start: collective timeouts and data preparation on local rank 0."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed_test
from micro_runs import micro_config
from scaleforge.core.config import validate
from scaleforge.core.trainer import start_topology
from scaleforge.errors import ConfigError
from scaleforge.parallel.collectives import broadcast_from_rank0
from scaleforge.parallel.layout import check_layout
from scaleforge.parallel.run_setup import check_backend, errors_labelled, local_rank0_first
from scaleforge.parallel.topology import MESH_DIMS


@pytest.mark.parametrize(
    ("overrides", "world_size", "named"),
    [
        (["parallel.tp=2", "parallel.dp_shard=1"], 4, "world size 4"),
        (["parallel.tp=4"], 2, "start 4 processes (torchrun --nproc-per-node 4)"),
        (["parallel.dp_shard=3"], 2, "parallel.tp x pp x dp_replicate x dp_shard"),
        (["parallel.tp=3"], 3, "model.n_heads=4"),
        (["parallel.tp=4", "model.n_kv_heads=2"], 4, "model.n_kv_heads=2"),
        (["parallel.tp=2", "model.vocab_size=513", "data.vocab_size=500"], 2,
         "set model.vocab_size=514"),
        (["parallel.tp=2", "data.seq_len=63"], 2, "data.seq_len=63"),
        (["parallel.pp=3", "model.n_layers=2"], 3, "model.n_layers=2"),
        (["parallel.pp=2", "parallel.pp_stages_per_rank=2"], 2, "parallel.pp_stages_per_rank"),
        (["parallel.pp=2", "trainer.micro_batch_size=8"], 2, "fewer than the 2 pipeline stages"),
        (["parallel.pp=2", "parallel.pp_layers_per_stage=[1,2]"], 2,
         "parallel.pp_layers_per_stage=[1, 2]"),
        (["parallel.pp=2", "trainer.eval_batches=3"], 2, "trainer.eval_batches=3"),
        (["parallel.pp=2", "parallel.dp_shard=2", "trainer.micro_batch_size=2"], 4,
         "(a multiple of 4)"),
        (["parallel.pp=2", "model.tie_embeddings=true"], 2, "model.tie_embeddings=true"),
        (["parallel.pp=2", "parallel.pp_schedule=InterleavedZeroBubble",
          "parallel.pp_stages_per_rank=2", "model.n_layers=4", "trainer.micro_batch_size=1",
          "trainer.eval_batches=8", "trainer.activation_checkpointing=selective"], 2,
         "trainer.activation_checkpointing=selective"),
        (["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=DualPipeV",
          "parallel.pp_stages_per_rank=2", "model.n_layers=4", "trainer.micro_batch_size=1",
          "trainer.eval_batches=8"], 4, "set parallel.fsdp_reshard_after_forward=false"),
        (["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=ZBVZeroBubble",
          "parallel.pp_stages_per_rank=2", "model.n_layers=4", "trainer.micro_batch_size=1",
          "trainer.eval_batches=8"], 4, "parallel.pp_schedule='ZBVZeroBubble' with parallel.tp=2"),
        (["parallel.cp=2", "data.seq_len=62"], 2, "set data.seq_len=60"),
        (["parallel.cp=2", "parallel.tp=2", "data.seq_len=36"], 4,
         "2 x parallel.cp x parallel.tp=8 does not divide data.seq_len=36"),
        (["parallel.cp=2", "parallel.cp_impl=torch"], 2, "parallel.cp_impl=torch runs on CUDA"),
        (["parallel.cp_impl=ring"], 1, "parallel.cp_impl='ring' is not one of allgather, torch"),
        (["parallel.cp=2"], 3, "world size 3"),
        (["parallel.pp_schedule=ZigZag"], 1, "parallel.pp_schedule='ZigZag'"),
        (["parallel.backend=mpi"], 1, "parallel.backend='mpi'"),
        (["parallel.dp_shard=0"], 1, "parallel.dp_shard=0"),
        (["parallel.tp=0"], 1, "parallel.tp=0"),
        (["parallel.dp_shard=-1", "parallel.tp=2"], 3, "parallel.dp_shard=-1"),
        (["parallel.timeout_s=0"], 1, "parallel.timeout_s"),
        (["parallel.dp_shard=2", "trainer.precision=fp16"], 2, "trainer.precision=fp16"),
        (["parallel.backend=nccl", "parallel.dp_shard=2"], 2, "parallel.backend=nccl"),
    ],
)
def test_invalid_layout_is_named_in_one_line(tmp_path, overrides, world_size, named):
    cfg = micro_config(tmp_path, *overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size)
    # One line per problem (validate reports every problem at once; fp16 on CPU, say, is
    # also refused for the device): the one this layout breaks is named in a line of its own.
    assert any(named in line for line in str(info.value).splitlines())


@pytest.mark.parametrize(
    ("backend", "device", "named"),
    [("nccl", "cpu", "parallel.backend=nccl"), ("gloo", "cuda", "parallel.backend=gloo"),
     ("auto", "cpu", None), ("auto", "cuda", None), ("gloo", "cpu", None), ("nccl", "cuda", None)],
)
def test_backend_must_suit_the_device(backend, device, named):
    # torch.device("cuda", 0) is only a name: no GPU is needed to check a CUDA run's setting.
    if named is None:
        check_backend(backend, torch.device(device, 0))
        return
    with pytest.raises(ConfigError, match=named) as info:
        check_backend(backend, torch.device(device, 0))
    assert "parallel.backend=auto" in str(info.value) and "\n" not in str(info.value)


def test_nccl_on_cpu_stops_before_any_process_group(tmp_path):
    cfg = micro_config(tmp_path, "parallel.backend=nccl", "parallel.dp_shard=2")
    with pytest.raises(ConfigError, match="parallel.backend=nccl"):
        start_topology(cfg, 2)
    assert not dist.is_initialized()


def test_dp_shard_minus_one_takes_the_rest_of_the_world(tmp_path):
    cfg = micro_config(tmp_path, "parallel.tp=2", "parallel.dp_shard=-1",
                       "trainer.micro_batch_size=2")
    dims = check_layout(cfg.parallel, cfg.model, cfg.data.seq_len, 8)
    assert (dims.tp, dims.dp_shard, dims.dp_size, dims.world_size) == (2, 4, 4, 8)
    assert dims.mesh_shape == (1, 1, 4, 1, 2)  # pp, dp_replicate, dp_shard, cp, tp


def test_mesh_dims_are_in_megatron_order():
    assert MESH_DIMS == ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def test_single_process_topology_starts_no_process_group(tmp_path):
    topology = start_topology(micro_config(tmp_path), 1)
    assert not topology.is_distributed and not dist.is_initialized()
    assert (topology.dp_rank, topology.dp_size, topology.is_rank0) == (0, 1, True)
    assert topology.label() == "[pp0 dp0 tp0]"
    assert broadcast_from_rank0(topology, "runs/x") == "runs/x"


def _hang_in_tp_group(cfg) -> None:
    import time

    import torch
    import torch.distributed as dist

    topology = start_topology(cfg)
    if topology.rank == 1:
        time.sleep(3 * cfg.parallel.timeout_s)  # never joins the collective
        return
    try:
        with errors_labelled(topology):
            dist.all_reduce(torch.ones(1), group=topology.group("tp"))
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
    else:
        message = "no error"
    # Rank 1 never joins: rank 0's all-reduce fails after parallel.timeout_s (2 s, not
    # torch's 30-minute default) and the error names the rank, its coordinates and groups.
    assert "rank 0 [pp0 dp0 tp0] (tp group [0, 1]): " in message, message
    assert "Timed out waiting 2000ms" in message, message


def test_collective_timeout_from_config_becomes_an_error_naming_the_rank(tmp_path):
    cfg = micro_config(tmp_path, "parallel.tp=2", "parallel.timeout_s=2")
    run_distributed_test(_hang_in_tp_group, world_size=2, func_args=(cfg,))


def _prepare_slowly_on_local_rank0(cfg) -> tuple[str, str]:
    import datetime
    import os
    import time
    from pathlib import Path

    from torch.distributed.distributed_c10d import _set_pg_timeout

    topology = start_topology(cfg)
    # As under sf-train, where init_process_group gets parallel.timeout_s (the harness gave
    # the default group its own, longer one).
    _set_pg_timeout(datetime.timedelta(seconds=cfg.parallel.timeout_s))
    first = os.environ["LOCAL_RANK"] == "0"
    prepared = Path(cfg.run_dir) / "prepared.txt"

    def prepare() -> str:
        if first:
            time.sleep(3 * cfg.parallel.timeout_s)  # longer than any collective may wait
            prepared.write_text("shards")
        return prepared.read_text()  # the other ranks find local rank 0's result

    found = local_rank0_first(topology, prepare)

    def fail_on_local_rank0() -> None:
        if first:
            raise ConfigError("data.path=missing does not exist")

    with pytest.raises(ConfigError) as info:
        local_rank0_first(topology, fail_on_local_rank0)
    dist.barrier()  # the training groups still work after the preparation's own groups
    return found, str(info.value)


def test_other_ranks_wait_for_local_rank0_beyond_the_collective_timeout(tmp_path):
    cfg = micro_config(tmp_path, "parallel.dp_shard=2", "parallel.timeout_s=1")
    results = run_distributed_test(_prepare_slowly_on_local_rank0, world_size=2,
                                   func_args=(cfg,))
    assert results == [("shards", "data.path=missing does not exist")] * 2
