"""A training step waits for the device once: the health decision's read,
`core.health.read_on_host`; under expert parallelism also once per MoE layer forward, for
the all-to-all's split sizes (`parallel.expert_parallel.split_sizes_on_host`). Any other
read (`.item()`, `float()`, `bool()`, `.tolist()`, `.numpy()`, `torch.equal`, a copy to the
CPU) would make the host wait for the GPU on every step, in one process and in every
layout, and so would a tensor made from host data on the GPU (`torch.tensor(value,
device=...)`: a copy from pageable memory, which waits for the stream).

`HostSyncs` sees the ones that reach torch's dispatcher through a TorchDispatchMode
(`aten._local_scalar_dense` behind item/float/int, `is_nonzero` behind bool, `equal`,
`_to_copy` to the CPU, `lift_fresh` behind torch.tensor and as_tensor) and the two reads that
skip it on a CPU tensor (`.tolist()`, `.numpy()`) by wrapping those methods. The suite runs
on the CPU, where the device is the host: a read seen here may be of a tensor that would
stay on the host on a GPU, so the count is an upper bound, and a step makes none beyond the
documented one.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import scaleforge.core.health as health
import scaleforge.core.trainer as trainer_module
import scaleforge.parallel.expert_parallel as expert_parallel
from distributed import run_distributed_test
from micro_runs import micro_config, synthetic_data
from scaleforge.core.config import micro_batches_per_step
from scaleforge.core.trainer import Trainer, start_topology

aten = torch.ops.aten
DOCUMENTED = "read_on_host"
SPLIT_SIZES = "split_sizes_on_host"
# llama_micro with 4 experts of width 32, top 2, in both layers, both balancing mechanisms.
MOE = ["model.moe.num_experts=4", "model.moe.expert_hidden=32", "model.moe.aux_loss_coef=0.01",
       "model.moe.bias_update_rate=0.01"]
STEPS = 2
REPO = Path(__file__).resolve().parent.parent
# Ops that read a tensor's data on the host.
_READ_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
# The frames between an op's caller and the mode: torch's dispatch wrappers and ours.
_MACHINERY_FILES = ("torch/_compile.py", "torch/_dynamo/", "torch/utils/_python_dispatch.py")
_MACHINERY_FUNCTIONS = {"__torch_dispatch__", "counted", "_record", "_caller"}


def _is_ours(filename: str) -> bool:
    """Source of this repository (the package and its tests), not an installed package."""
    return filename.startswith(str(REPO)) and "/.venv/" not in filename


class HostSyncs(TorchDispatchMode):
    """Within its block, lists every host sync: DOCUMENTED for a read inside
    `core.health.read_on_host`, SPLIT_SIZES for one inside
    `expert_parallel.split_sizes_on_host`, else the op and the innermost line of ours that
    made it."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self._documented: str | None = None  # the documented read running, if one is
        self._patches = pytest.MonkeyPatch()

    def __enter__(self) -> HostSyncs:
        for method in ("tolist", "numpy"):
            self._patches.setattr(torch.Tensor, method, self._counting(method))
        for module, name in ((health, DOCUMENTED), (expert_parallel, SPLIT_SIZES)):
            self._patches.setattr(module, name, self._labelled(getattr(module, name), name))
        return super().__enter__()

    def _labelled(self, read: Any, label: str) -> Any:
        def documented_read(*args: Any) -> Any:
            self._documented = label
            try:
                return read(*args)
            finally:
                self._documented = None

        return documented_read

    def __exit__(self, *exc_info: Any) -> None:
        self._patches.undo()
        super().__exit__(*exc_info)

    def _counting(self, method: str) -> Any:
        original = getattr(torch.Tensor, method)

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.device.type == "cpu":  # elsewhere the dispatcher sees the copy
                self._record(f"Tensor.{method}")
            return original(tensor, *args, **kwargs)

        return counted

    def _caller(self) -> traceback.FrameSummary:
        """The innermost frame that is not dispatch machinery: the code that ran the op."""
        return next(frame for frame in reversed(traceback.extract_stack())
                    if not any(part in frame.filename for part in _MACHINERY_FILES)
                    and not (frame.filename == __file__ and frame.name in _MACHINERY_FUNCTIONS))

    def _record(self, sync: str) -> None:
        if self._documented is not None:
            self.syncs.append(self._documented)
            return
        ours = [frame for frame in traceback.extract_stack()
                if _is_ours(frame.filename) and frame.filename != __file__]
        where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "outside scaleforge"
        self.syncs.append(f"{sync} at {where}")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        # A copy to the CPU names its device; a dtype cast (no device) stays where it is.
        device = kwargs.get("device")
        to_host = func is aten._to_copy.default and device is not None and (
            torch.device(device).type == "cpu")
        # torch.tensor / as_tensor: host data copied to the device, counted when our code
        # asks; torch wraps the Python scalars of its own ops (`t[mask] = 0.0`) the same way,
        # and those stay kernel arguments on a GPU.
        upload = func is aten.lift_fresh.default and _is_ours(self._caller().filename)
        if func in _READ_OPS or to_host or upload:
            self._record(str(func))
        return func(*args, **kwargs)


def _steps_syncs(trainer: Trainer, uncounted_steps: int = 0) -> list[str]:
    """The host syncs of STEPS training steps after `uncounted_steps` (with none, optimizer
    state creation in the first step is counted too). The batches are drawn before: the
    loader fills host memory (through `.numpy()` views), which the step copies to the device."""
    for _ in range(uncounted_steps):
        trainer.train_step(trainer.train_batches)
    per_step = trainer.micro_batches
    batches = [next(trainer.train_batches) for _ in range(STEPS * per_step)]
    with HostSyncs() as syncs:
        for step in range(STEPS):
            trainer.train_step(iter(batches[step * per_step:(step + 1) * per_step]))
    return syncs.syncs


def test_training_step_waits_for_the_device_once_for_the_health_decision(tmp_path):
    cfg = micro_config(tmp_path)  # 2 micro-batches per step, clipping at 1.0
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    assert _steps_syncs(trainer) == [DOCUMENTED] * STEPS


def test_dropless_moe_step_waits_for_the_device_once(tmp_path):
    """The grouped GEMM keeps the experts' group offsets on the device, and the routing
    counts, aux loss, load statistics and expert-bias update stay there too."""
    cfg = micro_config(tmp_path, *MOE, "model.moe.grouped_mm=grouped")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    assert _steps_syncs(trainer) == [DOCUMENTED] * STEPS


def test_moe_loop_over_experts_reads_the_group_sizes(tmp_path):
    """The loop (CUDA without the grouped GEMM) reads each layer's group sizes: counted
    here, so the grouped path's zero above is a measurement."""
    cfg = micro_config(tmp_path, *MOE, "model.moe.grouped_mm=loop")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    syncs = [sync for sync in _steps_syncs(trainer) if sync != DOCUMENTED]
    assert len(syncs) == STEPS * trainer.micro_batches * cfg.model.n_layers, syncs
    assert all("models/moe.py" in sync for sync in syncs), syncs


def test_host_syncs_catches_syncs_added_to_a_step(tmp_path, monkeypatch):
    cfg = micro_config(tmp_path)
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    clip_grad_norm = trainer_module.clip_grad_norm

    def clip_and_read(*args: Any, **kwargs: Any) -> torch.Tensor:
        norm = clip_grad_norm(*args, **kwargs)
        norm.item(), float(norm), bool(norm > 0), norm.reshape(1).tolist()
        norm.numpy(), torch.equal(norm, norm), torch.tensor(1.0, device=norm.device)
        return norm

    monkeypatch.setattr(trainer_module, "clip_grad_norm", clip_and_read)
    syncs = _steps_syncs(trainer)
    added = [sync for sync in syncs if sync != DOCUMENTED]
    assert syncs.count(DOCUMENTED) == STEPS and len(added) == 7 * STEPS, syncs
    assert all("core/trainer.py" in sync for sync in added), added


def _syncs_in_rank(cfg: Any, uncounted_steps: int) -> list[str]:
    topology = start_topology(cfg, dist.get_world_size())
    data = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)
    trainer = Trainer(cfg, Path(cfg.run_dir), data=data, topology=topology)
    return _steps_syncs(trainer, uncounted_steps)


@pytest.mark.parametrize(
    ("layout", "uncounted_steps"),
    [
        (["parallel.dp_shard=2"], 0),
        (["parallel.tp=2"], 0),
        # Experts split over tp: the gathers, reduce-scatters and the router's gradient sum
        # stay on the device (dropless grouped GEMM).
        (["parallel.tp=2", "parallel.etp=2", *MOE], 0),
        # torch's schedule exchanges the stages' shapes as pickled objects in its first
        # step (recv_object_list reads sizes on the host): once per run, so not counted.
        (["parallel.pp=2", "model.n_layers=2", "trainer.micro_batch_size=2",
          "trainer.eval_batches=4"], 1),
    ],
    ids=["dp_shard2", "tp2", "tp2_etp2_moe", "pp2"],
)
def test_parallel_training_step_waits_for_the_device_once_on_every_rank(tmp_path, layout,
                                                                        uncounted_steps):
    cfg = micro_config(tmp_path, *layout)
    for rank_syncs in run_distributed_test(_syncs_in_rank, world_size=2,
                                           func_args=(cfg, uncounted_steps)):
        assert rank_syncs == [DOCUMENTED] * STEPS


@pytest.mark.parametrize("layout", [
    ["parallel.dp_shard=2", "parallel.ep=2"],
    ["parallel.cp=2", "parallel.ep=2"],
], ids=["ep2", "ep2_cp2"])
def test_ep_step_reads_the_split_sizes_once_per_moe_layer_forward(tmp_path, layout):
    """Under expert parallelism each MoE layer's forward reads its all-to-all split sizes
    (every layer is MoE), and nothing else but the health decision reads."""
    cfg = micro_config(tmp_path, *MOE, *layout)
    micro_batches = micro_batches_per_step(cfg, dp_size=2 if "parallel.dp_shard=2" in layout else 1)
    per_step = [SPLIT_SIZES] * (micro_batches * cfg.model.n_layers) + [DOCUMENTED]
    for rank_syncs in run_distributed_test(_syncs_in_rank, world_size=2, func_args=(cfg, 0)):
        assert rank_syncs == per_step * STEPS
