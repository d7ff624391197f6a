"""Every collective kind a training step issues, run once through the project's own code on
a real process group: NCCL at world size 1 on a GPU machine (NCCL refuses two ranks on one
GPU), gloo with 2 ranks on the CPU (bench/gpu_check.sh's rehearsal). A world size of 1
creates no process group in training, so without this a first multi-GPU run would be the
first time any of them ran over NCCL.

    python -m scaleforge.bench.collectives_check --out OUT_DIR              # cuda: NCCL, 1 rank
    python -m scaleforge.bench.collectives_check --out OUT_DIR --cpu        # gloo, 2 ranks

With the step's shapes and dtypes (`--model`, `--seq-len`; bf16 activations, fp32 gradient
reduction) each check runs, times and verifies (against the value the sum or the gather
must give):
- FSDP2 as `parallel.data_parallel.apply_data_parallel` wraps one block of the model, bf16
  mixed precision: forward + backward, with the collectives FSDP itself called counted;
- sequence parallelism's all-gather and reduce-scatter (`parallel.sequence_collectives`),
  forward and backward, on (B, T, d) bf16;
- all-reduce as the step's metrics and MoE statistics use it (`collectives.sum_over_world`,
  `max_over_world`);
- expert parallelism's all-to-all with uneven splits (`AllToAllDispatcher` dispatch and
  combine, one empty expert);
- send/recv as the pipeline's P2P (`batch_isend_irecv` to the next rank; to itself at world
  size 1, where NCCL allows it: a refusal is recorded, not fatal).
Writes OUT_DIR/collectives.json (one record per check) and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaleforge.core.config import compose, to_config
from scaleforge.models import build
from scaleforge.models.config import TransformerConfig
from scaleforge.parallel.collectives import max_over_world, sum_over_world
from scaleforge.parallel.data_parallel import apply_data_parallel
from scaleforge.parallel.expert_parallel import AllToAllDispatcher
from scaleforge.parallel.sequence_collectives import gather_sequence, reduce_scatter_sequence
from scaleforge.parallel.topology import ParallelDims, Topology

# (all_gather_single and reduce_scatter_single: FSDP2's calls from torch 2.13 on; absent
# before, where FSDP2 calls all_gather_into_tensor and reduce_scatter_tensor.)
COUNTED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
           "reduce_scatter_single", "all_to_all_single", "batch_isend_irecv", "broadcast",
           "all_gather")


class _Counter:
    """The torch.distributed calls made while installed, by name."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> _Counter:
        for name in (name for name in COUNTED if hasattr(dist, name)):
            real = self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._counted(name, real))
        return self

    def _counted(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)
        return counted

    def __exit__(self, *_: object) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)


def _timed(work: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def check_fsdp(cfg: TransformerConfig, topology: Topology, seq_len: int) -> dict[str, Any]:
    """One block (and the embedding and head) under FSDP2 in bf16: forward and backward."""
    model_cfg = {**_as_dict(cfg), "n_layers": 1}
    model = build(model_cfg, device=topology.device, seed=0)
    apply_data_parallel(model, topology, "bf16")
    tokens = torch.randint(cfg.vocab_rows, (1, seq_len), device=topology.device,
                           generator=torch.Generator(topology.device).manual_seed(0))
    with _Counter() as counter:
        logits, ms = _timed(lambda: model(tokens), topology.device)
        _, backward_ms = _timed(lambda: logits.float().square().mean().backward(),
                                topology.device)
    for parameter in model.parameters():  # DTensors (FSDP2): each rank checks its shard
        assert parameter.grad is not None
        assert bool(torch.isfinite(getattr(parameter.grad, "_local_tensor", parameter.grad)).all())
    return {"shape": f"1 block of d_model {cfg.d_model}, tokens 1 x {seq_len}",
            "dtype": "bf16 params, fp32 reduce", "ms": ms + backward_ms,
            "fsdp_called": counter.calls}


def check_sequence(cfg: TransformerConfig, topology: Topology, seq_len: int,
                   group: dist.ProcessGroup) -> dict[str, Any]:
    """All-gather and reduce-scatter along the sequence, (B, T / world, d) bf16, and their
    backward (a reduce-scatter and an all-gather)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = torch.full((1, seq_len // world, cfg.d_model), float(rank + 1),
                       device=topology.device, dtype=torch.bfloat16, requires_grad=True)
    whole, gather_ms = _timed(lambda: gather_sequence(local, group, dim=1), topology.device)
    expected = torch.arange(1, world + 1, device=topology.device, dtype=torch.bfloat16)
    expected = expected.repeat_interleave(seq_len // world)
    torch.testing.assert_close(whole[0, :, 0], expected)
    _, backward_ms = _timed(lambda: whole.sum().backward(), topology.device)
    assert local.grad is not None and bool((local.grad == world).all())  # summed over ranks
    partial = torch.ones(1, seq_len, cfg.d_model, device=topology.device, dtype=torch.bfloat16,
                         requires_grad=True)
    part, scatter_ms = _timed(lambda: reduce_scatter_sequence(partial, group, dim=1),
                              topology.device)
    assert part.shape[1] == seq_len // world and bool((part == world).all())
    part.sum().backward()
    assert partial.grad is not None and bool((partial.grad == 1).all())
    return {"shape": f"1 x {seq_len} x {cfg.d_model}", "dtype": "bf16",
            "ms": gather_ms + backward_ms + scatter_ms}


def check_all_reduce(topology: Topology, cfg: TransformerConfig) -> dict[str, Any]:
    """The metrics' and MoE statistics' all-reduces (fp32 vectors)."""
    world = dist.get_world_size()
    value = torch.ones(cfg.n_layers * 10, device=topology.device)
    total, ms = _timed(lambda: sum_over_world(topology, value), topology.device)
    assert bool((total == world).all())
    largest = max_over_world(topology, torch.tensor(float(topology.rank),
                                                  device=topology.device))
    assert float(largest) == world - 1
    return {"shape": f"({value.numel()},)", "dtype": "fp32", "ms": ms}


def check_all_to_all(cfg: TransformerConfig, topology: Topology, seq_len: int,
                     group: dist.ProcessGroup) -> dict[str, Any]:
    """Expert parallelism's dispatch and combine with uneven splits and an empty expert:
    2 experts per rank; tokens go back to where they came from."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    experts = 2 * world
    counts = torch.tensor([(e + rank) % 3 * seq_len // 8 for e in range(experts)],
                          device=topology.device)  # 0, 1/8, 2/8 of the tokens: uneven
    counts[0] = 0  # an empty expert
    n = int(counts.sum())
    x = torch.randn(n, cfg.d_model, device=topology.device, dtype=torch.bfloat16,
                    generator=torch.Generator(topology.device).manual_seed(rank),
                    requires_grad=True)
    dispatcher = AllToAllDispatcher(group, world, experts)

    def round_trip() -> torch.Tensor:
        local, local_counts, state = dispatcher.dispatch(x, counts)
        assert int(local_counts.sum()) == local.size(0)
        return dispatcher.combine(local * 2, state)

    back, ms = _timed(round_trip, topology.device)
    torch.testing.assert_close(back, x * 2)
    back.sum().backward()
    assert x.grad is not None and bool((x.grad == 2).all())
    return {"shape": f"({n}, {cfg.d_model}) split {counts.tolist()}", "dtype": "bf16", "ms": ms}


def check_send_recv(cfg: TransformerConfig, topology: Topology, seq_len: int
                    ) -> dict[str, Any]:
    """A pipeline stage's activation (1, T, d) bf16 to the next rank and one from the
    previous (to and from itself at world size 1)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    send = torch.full((1, seq_len, cfg.d_model), float(rank), device=topology.device,
                      dtype=torch.bfloat16)
    receive = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, (rank + 1) % world),
           dist.P2POp(dist.irecv, receive, (rank - 1) % world)]

    def exchange() -> None:
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    _, ms = _timed(exchange, topology.device)
    assert bool((receive == float((rank - 1) % world)).all())
    return {"shape": f"1 x {seq_len} x {cfg.d_model}", "dtype": "bf16", "ms": ms}


def _as_dict(cfg: TransformerConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def run_checks(model: str, seq_len: int, device: torch.device,
               written: Callable[[list[dict[str, Any]]], None] = lambda records: None
               ) -> list[dict[str, Any]]:
    """Every check on this rank of the started default group; one record per check, the
    records so far handed to `written` after each (a check that hangs leaves the others'
    results behind)."""
    world = dist.get_world_size()
    cfg = to_config(compose([f"model={model}"])).model
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (1, 1, world, 1, 1),
                            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"))
    topology = Topology(ParallelDims(tp=1, pp=1, dp_replicate=1, dp_shard=world), device,
                        mesh)
    group = mesh.get_group("dp_shard")
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("fsdp all-gather + reduce-scatter", lambda: check_fsdp(cfg, topology, seq_len)),
        ("sequence all-gather + reduce-scatter",
         lambda: check_sequence(cfg, topology, seq_len, group)),
        ("all-reduce", lambda: check_all_reduce(topology, cfg)),
        ("all-to-all, uneven splits", lambda: check_all_to_all(cfg, topology, seq_len, group)),
        ("send/recv", lambda: check_send_recv(cfg, topology, seq_len)),
    ]
    records = []
    for name, check in checks:
        try:
            record = {"check": name, "status": "ok", **check()}
        except Exception as error:  # recorded; the other checks still run
            last = traceback.format_exception_only(type(error), error)[-1].strip()
            record = {"check": name, "status": f"failed: {last[:300]}"}
            if name == "send/recv" and world == 1:
                record["status"] = f"refused at world size 1: {last[:200]}"
        records.append(record)
        written(records)
    return records


def _rank_main(rank: int, world: int, backend: str, store_path: str, model: str,
               seq_len: int, out: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # as in main()
    device = (torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    try:
        def write(records: list[dict[str, Any]]) -> None:
            if rank == 0:
                report = {"backend": backend, "world_size": world, "model": model,
                          "seq_len": seq_len, "device": _device_name(device),
                          "checks": records}
                Path(out).write_text(json.dumps(report, indent=2))

        run_checks(model, seq_len, device, write)
    finally:
        dist.destroy_process_group()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="OUT_DIR for collectives.json")
    parser.add_argument("--cpu", action="store_true", help="gloo, 2 ranks, on the CPU")
    parser.add_argument("--model", default=None, help="model preset (default: by device)")
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args()
    # torch 2.13 deprecates all_gather_into_tensor and reduce_scatter_tensor (2.11 has no
    # successor): not this check's business, and one per rank per call.
    warnings.filterwarnings("ignore", category=FutureWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or ("llama_micro" if args.cpu else "llama_1b")
    seq_len = args.seq_len or (64 if args.cpu else 2048)
    out = args.out / "collectives.json"
    store = tempfile.mktemp(prefix="sf-collectives-store-")
    start = time.perf_counter()
    if args.cpu:
        torch.multiprocessing.spawn(_rank_main, args=(2, "gloo", store, model, seq_len,
                                                      str(out)), nprocs=2)
    else:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        _rank_main(0, 1, "nccl", store, model, seq_len, str(out))
    report = json.loads(out.read_text())
    report["wall_s"] = time.perf_counter() - start
    out.write_text(json.dumps(report, indent=2))
    for record in report["checks"]:
        extra = f" {record['ms']:.1f} ms, {record['shape']}" if "ms" in record else ""
        print(f"{record['check']}: {record['status']}{extra}")
    failed = [r for r in report["checks"] if r["status"].startswith("failed")]
    print(f"collectives ({report['backend']}, {report['world_size']} rank(s)): "
          f"{len(report['checks']) - len(failed)} of {len(report['checks'])} ok")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
