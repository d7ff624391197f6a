"""A CUDA world on a CPU machine: fake CUDA tensors over torch's fake process group, in which
the training step's CUDA code runs and what would fail on a GPU shows.

PyPI's default torch wheels for Linux are CUDA builds that import and run on a CPU-only
machine. Under one:
- `fake_cuda_world(n)` makes this process rank 0 of an n-process world on the fake process
  group (every collective returns at once, nothing is sent) and has torch.cuda answer as a
  machine with n H100s would (`cuda_answered`, bench/fake_cuda_device.py): `is_available()`
  (autocast("cuda") disables itself without it), device count, index, name, capability
  (9, 0), bf16 support; streams and events (FSDP's) and the generator state are stand-ins;
  a generator on CUDA (one per parameter, models/init.py) draws on the CPU (it needs the
  driver; a fake tensor's values are never read). Build the topology in it;
- `fake_cuda_tensors()` then runs a block under torch's FakeTensorMode: tensors on CUDA
  carry shapes, dtypes and devices but no data, so every CUDA code path runs (no kernel
  executes), while host memory stays real (seeds, device-mesh coordinates, batches before
  their copy to the device). In it a CPU tensor meeting a CUDA one raises
  `FakeTensorDeviceMismatchError`, and reading a device value on the host (`.item()`,
  `.tolist()`, `bool()`, a copy to the CPU then read) raises `DataDependentOutputException`:
  the host sync a GPU step would wait on. The reads the project makes on purpose
  (`ALLOWED_HOST_READS`) are answered with stand-ins. It yields a `CollectiveDevices`
  record of every collective and point-to-point call (the process-group ops and the
  functional collectives DTensor and FSDP use) with the devices of its tensors: an NCCL
  group has no CPU backend, so a CPU tensor there fails on the first GPU run;
- `gradients_stood_in(parameters)`: backward cannot run on fake CUDA tensors without a GPU
  (torch's autograd engine asks the driver for each device's stream context,
  `hasPrimaryContext`), so `torch.autograd.backward` and `grad` are replaced by zeros for
  every leaf of the graph and every parameter;
- `pipeline_shapes_given(...)`: pipeline stages built with their shapes given, which torch
  needs over a fake group (no stage can tell another its shapes).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

import scaleforge.core.health as health
import scaleforge.parallel.expert_parallel as expert_parallel
from scaleforge.bench.fake_cuda_device import cuda_answered
from scaleforge.planner.shards import fake_world
from scaleforge.torch_compat import (
    FakeTensor,
    FakeTensorMode,
    TorchDispatchMode,
    tree_leaves,
    unset_fake_temporarily,
)

# The host reads a training step makes on purpose (tests/test_host_syncs.py counts them on
# the CPU): the health decision's one read per step, and under expert parallelism the
# all-to-all's split sizes, once per MoE layer forward. Answered here with stand-ins.
ALLOWED_HOST_READS = (
    "scaleforge.core.health.read_on_host",
    "scaleforge.parallel.expert_parallel.split_sizes_on_host",
)
# Operator namespaces of collectives: the process-group ops (all_reduce, send, ...) and
# the functional collectives (DTensor, FSDP2).
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
aten = torch.ops.aten
# The matrix products whose dtypes are recorded (bf16 autocast, FSDP's bf16 weights).
MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default)
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object",
                      "scatter_object_list", "send_object_list", "recv_object_list")
_THIS = os.path.realpath(__file__)
_REPO = Path(_THIS).parent.parent


def has_cuda_build() -> bool:
    """Whether this torch is a CUDA build (runs here without a GPU all the same)."""
    return torch.version.cuda is not None


@dataclass
class CollectiveCall:
    """One collective seen: its operator, the devices of its tensors, and the innermost line
    of this repository that made it."""

    op: str
    devices: list[str]
    where: str
    object_collective: str | None = None  # the torch object collective that made it


@dataclass
class CollectiveDevices(TorchDispatchMode):
    """Records every collective operator dispatched inside it (see the module doc), and the
    input dtypes of every matrix product (MATMULS)."""

    calls: list[CollectiveCall] = field(default_factory=list)
    ops: list[tuple[str, list[torch.dtype]]] = field(default_factory=list)  # MATMULS run
    allowed_reads: list[str] = field(default_factory=list)  # ALLOWED_HOST_READS answered

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in MATMULS:
            self.ops.append((str(func), [t.dtype for t in tensors]))
        if func.namespace in COLLECTIVE_NAMESPACES:
            self.calls.append(CollectiveCall(str(func), [str(t.device) for t in tensors],
                                             innermost_line_of_ours(), _object_collective()))
        if _host_only(tensors, kwargs):
            # Host memory stays real: what the host computes (seeds, device-mesh
            # coordinates, batches before their copy) has real values.
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def off_device(self, device_type: str = "cuda") -> list[CollectiveCall]:
        """The calls given a tensor not on `device_type`, but those of torch's object
        collectives (`broadcast_object_list`, ...): torch places their buffers on the
        device of the group's backend (NCCL's: the current CUDA device; the fake group's:
        the CPU)."""
        return [call for call in self.calls if call.object_collective is None
                and any(not device.startswith(device_type) for device in call.devices)]


def _host_only(tensors: list[torch.Tensor], kwargs: dict) -> bool:
    """Whether an op reads and makes only real host tensors: no fake tensor among its
    inputs, none off the CPU, and no other device asked for (a factory's `device`)."""
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return False
    return all(not isinstance(t, FakeTensor) and t.device.type == "cpu" for t in tensors)


def _object_collective() -> str | None:
    """The torch object collective (broadcast_object_list, send_object_list, ...) on the
    stack, if one is."""
    for frame in traceback.extract_stack():
        if frame.filename.endswith("distributed_c10d.py") and frame.name in OBJECT_COLLECTIVES:
            return frame.name
    return None


def innermost_line_of_ours(stack: traceback.StackSummary | None = None) -> str:
    """'path:line (function)' of the innermost frame in this repository's package (not this
    module, not an installed package, not a test), or 'outside scaleforge'."""
    frames = stack if stack is not None else traceback.extract_stack()
    for frame in reversed(frames):
        name = os.path.realpath(frame.filename)
        if (name.startswith(str(_REPO)) and "/.venv" not in name
                and name != _THIS and "/tests/" not in name):
            return f"{Path(name).relative_to(_REPO)}:{frame.lineno} ({frame.name})"
    return "outside scaleforge"


# The token count each expert-parallel dispatch sends, for the stand-in split sizes.
_dispatched_tokens: contextvars.ContextVar[int] = contextvars.ContextVar("dispatched_tokens")


def _answered_read_on_host(record: list[str]) -> Callable[[torch.Tensor], list[float]]:
    def read_on_host(values: torch.Tensor) -> list[float]:
        """read_on_host's stand-in: zeros (a finite loss, no flag raised)."""
        record.append("read_on_host")
        return [0.0] * values.numel()

    return read_on_host


def _answered_split_sizes(record: list[str]) -> Callable:
    def split_sizes_on_host(send: torch.Tensor, receive: torch.Tensor
                            ) -> tuple[list[int], list[int]]:
        """split_sizes_on_host's stand-in: the dispatched tokens spread evenly over the ep
        ranks, the same number received as sent."""
        record.append("split_sizes_on_host")
        ep, tokens = send.numel(), _dispatched_tokens.get()
        sizes = [tokens // ep + (rank < tokens % ep) for rank in range(ep)]
        return sizes, list(sizes)

    return split_sizes_on_host


def _dispatch_counting_tokens(dispatch: Callable) -> Callable:
    def counted(self: Any, x: torch.Tensor, counts: torch.Tensor) -> Any:
        token = _dispatched_tokens.set(x.size(0))
        try:
            return dispatch(self, x, counts)
        finally:
            _dispatched_tokens.reset(token)

    return counted


def _leaves(roots: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The leaf tensors (AccumulateGrad nodes) the autograd graph of `roots` ends in."""
    seen: set[int] = set()
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            yield node.variable
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


def _as_tensors(tensors: Any) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def gradients_stood_in(parameters: Callable[[], Iterator[nn.Parameter]]) -> Iterator[None]:
    """`torch.autograd.backward` and `grad` replaced by gradient stand-ins: zeros for every
    leaf the graph ends in (a pipeline stage's received activations) and for every one of
    `parameters()` still without a gradient (module doc: a backward over fake CUDA tensors
    needs the GPU's context)."""

    def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> None:
        with torch.no_grad():
            for leaf in _leaves(_as_tensors(tensors)):
                if leaf.requires_grad and leaf.grad is None:
                    leaf.grad = torch.zeros_like(leaf)
            for param in parameters():
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)

    def grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(torch.zeros_like(t) for t in _as_tensors(inputs))

    # The zero-bubble schedules' split backward: input gradients, then weight gradients
    # from the graph's intermediates that the first half's hooks caught (torch 2.11).
    def input_backward(outputs: Any, output_grads: Any, input_values: list[Any],
                       weights: Any) -> tuple[tuple[torch.Tensor | None, ...], list]:
        grads = []
        with torch.no_grad():
            for value in input_values:
                needs = isinstance(value, torch.Tensor) and value.requires_grad
                grads.append(torch.zeros_like(value) if needs else None)
                if needs and value.grad is None:
                    value.grad = grads[-1]
        return tuple(grads), []

    def weight_backward(weights: Iterator[nn.Parameter], param_groups: list,
                        retain_graph: bool = False) -> tuple[torch.Tensor | None, ...]:
        grads = []
        with torch.no_grad():
            for weight in weights:
                if weight.requires_grad and weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                grads.append(weight.grad)
        return tuple(grads)

    from torch.distributed.pipelining import stage

    with (mock.patch.object(torch.autograd, "backward", backward),
          mock.patch.object(torch.autograd, "grad", grad),
          mock.patch.object(stage, "stage_backward_input", input_backward),
          mock.patch.object(stage, "stage_backward_weight", weight_backward)):
        yield


@contextlib.contextmanager
def allowed_host_reads_answered(record: list[str]) -> Iterator[None]:
    """The reads in ALLOWED_HOST_READS answered with stand-ins (module doc), each call's
    name appended to `record`."""
    dispatcher = expert_parallel.AllToAllDispatcher
    with (mock.patch.object(health, "read_on_host", _answered_read_on_host(record)),
          mock.patch.object(expert_parallel, "split_sizes_on_host",
                            _answered_split_sizes(record)),
          mock.patch.object(dispatcher, "dispatch", _dispatch_counting_tokens(
              dispatcher.dispatch))):
        yield


class _DeviceFreeFakeTensorMode(FakeTensorMode):
    """FakeTensorMode that never initialises a device, also while torch.cuda answers that
    it is available (torch's mode asks that to decide whether it may touch the device)."""

    @property
    def avoid_device_init(self) -> bool:
        return True


@contextlib.contextmanager
def fake_cuda_world(world_size: int) -> Iterator[None]:
    """Rank 0 of `world_size` on the fake process group with torch.cuda answered (module
    doc); build the topology in it, then run the step in `fake_cuda_tensors()`."""
    world = fake_world(world_size) if world_size > 1 else contextlib.nullcontext()
    with cuda_answered(world_size), world:
        yield


@contextlib.contextmanager
def pipeline_shapes_given(first_inputs: Callable[[], torch.Tensor],
                          autocast: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """Pipeline stages built with their shapes given (torch's static metadata), as torch
    needs over a fake process group, where no stage can tell another its shapes: the first
    stage's input is `first_inputs()` (a micro-batch of token ids on the device), and each
    stage's output is what its module returns (run under `autocast()`) on its input, the
    previous stage's output. Stages are built in order of their index on a rank, and the
    activations between stages all have one shape, so a stage whose predecessor is on
    another rank takes the last output seen (rank 0 holds stage 0, which is built first)."""
    from torch.distributed.pipelining import PipelineStage

    init = PipelineStage.__init__
    between: list[torch.Tensor] = []

    def given(stage: Any, submodule: nn.Module, stage_index: int, num_stages: int,
              device: torch.device, *args: Any, **kwargs: Any) -> None:
        if not args and "input_args" not in kwargs:
            inputs = first_inputs() if stage_index == 0 else between[-1]
            with torch.no_grad(), autocast():
                outputs = submodule(inputs)
            if stage_index < num_stages - 1:
                between.append(outputs.detach())
            kwargs |= {"input_args": inputs, "output_args": outputs.detach()}
        init(stage, submodule, stage_index, num_stages, device, *args, **kwargs)

    with mock.patch.object(PipelineStage, "__init__", given):
        yield


def _on_host(collective: Callable) -> Callable:
    def real(*args: Any, **kwargs: Any) -> Any:
        with unset_fake_temporarily():
            return collective(*args, **kwargs)

    return real


@contextlib.contextmanager
def object_collectives_on_host() -> Iterator[None]:
    """torch's object collectives (pickled Python objects in byte tensors) run outside the
    fake mode: their buffers are host memory, filled from the pickle."""
    c10d = dist.distributed_c10d
    with contextlib.ExitStack() as stack:
        for name in OBJECT_COLLECTIVES:
            real = _on_host(getattr(c10d, name))
            stack.enter_context(mock.patch.object(c10d, name, real))
            stack.enter_context(mock.patch.object(dist, name, real))
        yield


@contextlib.contextmanager
def fake_cuda_tensors() -> Iterator[CollectiveDevices]:
    """Fake tensors, the allowed host reads answered; yields the CollectiveDevices record
    of the block."""
    collectives = CollectiveDevices()
    with (allowed_host_reads_answered(collectives.allowed_reads), object_collectives_on_host(),
          _DeviceFreeFakeTensorMode(allow_non_fake_inputs=True), collectives):
        yield collectives
