"""Every private torch name ScaleForge touches, in this one module, with the torch versions
each was checked on and what runs where a version lacks it.

ScaleForge supports torch 2.11 to 2.14 (pyproject.toml). The rest of the package imports
these names from here and never reaches into torch's private modules or attributes itself;
tests/test_torch_compat.py scans the package's source, so a new private name fails there
until it is added here and to `PRIVATE_NAMES`, and it checks each entry against the
installed torch. A torch upgrade is then a change to this file.

What differs across the supported versions:
- torch 2.11's `DeviceMesh._unflatten` rejects a dimension given by name when the name is
  in the mesh (its check is inverted; 2.13 fixed it): `unflatten_mesh` passes the index.
- torch 2.13 renamed `PipelineStage._shape_inference` (2.11) to
  `_forward_metadata_inference`: `PipelineStage` here wraps whichever the installed torch
  calls, so a stage can tell its first-step shape inference from real forwards.
- torch 2.11's V schedules open their first step with a send from a stage to its
  neighbour on the same rank, which gloo cannot do: `PipelineStage` leaves those out.
- torch 2.11's stages keep the activation receive buffers of their first call: an eval
  first left them without gradients for every later step; `PipelineStage` sets them to
  require grad whenever a schedule turns backward on.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# The imports below are private torch names, present on every version in CHECKED.
from torch._C._distributed_c10d import Backend as C10dBackend  # noqa: F401  (re-exported)
from torch._ops import OpOverload  # noqa: F401  (re-exported)
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import (  # noqa: F401  (re-exported)
    DataDependentOutputException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # noqa: F401
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage as TorchPipelineStage
from torch.distributed.pipelining._backward import stage_backward  # noqa: F401
from torch.distributed.tensor.parallel import ParallelStyle as TorchParallelStyle
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401  (re-exported)
from torch.utils._pytree import tree_leaves  # noqa: F401  (re-exported)

# The torch releases every entry of PRIVATE_NAMES was looked up on (tests/test_torch_compat.py
# repeats the lookup under whichever torch runs the tests).
CHECKED = ("2.11.0", "2.13.0", "2.14.1")
EVERYWHERE = "none needed: present on every checked version"


@dataclass(frozen=True)
class PrivateName:
    """One private torch name: its dotted path from `torch`, what ScaleForge uses it for, the
    versions it was checked on, those of them that lack it, and what runs there instead."""

    path: str
    use: str
    checked: tuple[str, ...] = CHECKED
    absent: tuple[str, ...] = ()
    fallback: str = EVERYWHERE


PRIVATE_NAMES = (
    PrivateName("torch._C._distributed_c10d.Backend",
                "the type of a process group's options (mesh backend overrides)"),
    PrivateName("torch.distributed.ProcessGroupGloo._Options",
                "gloo's options class, to give a mesh's gloo groups a timeout"),
    PrivateName("torch.distributed.ProcessGroupGloo._Options._timeout",
                "a process group's collective timeout (`group_options`)"),
    PrivateName("torch.distributed.device_mesh.DeviceMesh._flatten",
                "FSDP's dp_shard x cp mesh dimension (`flatten_mesh`)"),
    PrivateName("torch.distributed.device_mesh.DeviceMesh._unflatten",
                "the expert mesh: dp_shard x cp cut into efsdp x ep (`unflatten_mesh`)"),
    PrivateName("torch.distributed.pipelining._backward.stage_backward",
                "a pipeline stage's full backward with FSDP's per-micro-batch reduction"),
    PrivateName("torch.distributed.pipelining.stage.PipelineStage._forward_metadata_inference",
                "the stage's first-step shape inference, run on stand-in tensors",
                absent=("2.11.0",), fallback="`_shape_inference` (2.11's name for it)"),
    PrivateName("torch.distributed.pipelining.stage.PipelineStage._shape_inference",
                "the stage's first-step shape inference on torch 2.11",
                absent=("2.13.0", "2.14.1"), fallback="`_forward_metadata_inference`"),
    PrivateName("torch.distributed.pipelining.stage.PipelineStage._get_init_p2p_neighbors_ops",
                "the first step's link warm-up, without sends to this rank (2.11, gloo)"),
    PrivateName("torch.distributed.pipelining.schedules.PipelineScheduleSingle._compute_loss",
                "timing the loss inside a schedule (bench/pipeline_bubble.py)"),
    PrivateName("torch.distributed.tensor.parallel.ParallelStyle._apply",
                "the method a custom tensor-parallel style implements (MoE layers)"),
    PrivateName("torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper",
                "full and selective activation checkpointing of a block"),
    PrivateName("torch.distributed.tensor.experimental._attention."
                "_enable_context_parallel_dispatcher",
                "torch's context-parallel SDPA (parallel.cp_impl=torch, CUDA only)"),
    PrivateName("torch.distributed.tensor.experimental._attention.set_rotate_method",
                "the K/V rotation of torch's context-parallel SDPA"),
    PrivateName("torch.ops._c10d_functional",
                "the functional collectives selective checkpointing keeps"),
    PrivateName("torch.ops.aten._scaled_dot_product_flash_attention",
                "the SDPA kernels selective checkpointing keeps"),
    PrivateName("torch.ops.aten._scaled_dot_product_efficient_attention",
                "SDPA kernel kept by selective checkpointing; chunked attention on CUDA"),
    PrivateName("torch.ops.aten._scaled_dot_product_efficient_attention_backward",
                "chunked attention's backward on CUDA"),
    PrivateName("torch.ops.aten._scaled_dot_product_cudnn_attention",
                "the SDPA kernels selective checkpointing keeps"),
    PrivateName("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu",
                "SDPA kernel kept by selective checkpointing; chunked attention on CPU"),
    PrivateName("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward",
                "chunked attention's backward on CPU"),
    PrivateName("torch._ops.OpOverload", "the type of an op in a checkpoint policy"),
    PrivateName("torch._grouped_mm", "the MoE experts as one grouped GEMM",
                fallback="the loop over experts (`grouped_mm` is None)"),
    PrivateName("torch._C._current_graph_task_id",
                "whether autograd's engine is running (MoE statistics skip recomputes)"),
    PrivateName("torch._C._distributed_c10d._dump_nccl_trace",
                "NCCL's flight-recorder record of a hung rank (the hang watchdog)",
                checked=("2.11.0", "2.13.0"), absent=("2.13.0",),
                fallback="`_dump_fr_trace` (the CPU wheels of 2.13 are built without NCCL)"),
    PrivateName("torch._C._distributed_c10d._dump_fr_trace",
                "the flight recorder's record where NCCL's is absent (the hang watchdog)",
                checked=("2.11.0", "2.13.0")),
    PrivateName("torch.cuda.memory._record_memory_history",
                "CUDA memory snapshots of a profiled window"),
    PrivateName("torch.cuda.memory._dump_snapshot", "CUDA memory snapshots of a profiled window"),
    PrivateName("torch.distributed._tools.mem_tracker.MemTracker",
                "peak bytes of live tensors (bench/loss.py, the memory tests)"),
    PrivateName("torch._guards.active_fake_mode",
                "telling DTensor's fake-tensor propagation from real ops (`mem_tracker`)"),
    PrivateName("torch.utils._python_dispatch.is_traceable_wrapper_subclass",
                "the local shards of a DTensor or FSDP parameter (bench/parallel_layouts.py)"),
    PrivateName("torch.utils.checkpoint._VersionWrapper",
                "what selective checkpointing caches (bench/plan_memory.py)"),
    PrivateName("torch.Tensor._base", "the tensor a view was made from (bench/plan_memory.py)"),
    PrivateName("torch._subclasses.fake_tensor.FakeTensorMode",
                "fake CUDA tensors for the CUDA-without-a-GPU checks (bench/fake_cuda.py)"),
    PrivateName("torch._subclasses.fake_tensor.FakeTensor",
                "telling a fake tensor from a real one"),
    PrivateName("torch._subclasses.fake_tensor.unset_fake_temporarily",
                "host memory kept real under the fake mode (bench/fake_cuda.py)"),
    PrivateName("torch._subclasses.fake_tensor.DataDependentOutputException",
                "a host read of a fake tensor: the host sync a GPU step would wait on"),
    PrivateName("torch._subclasses.fake_tensor.FakeTensorDeviceMismatchError",
                "a fake op given tensors on two devices (`is_fake_device_mismatch`)",
                absent=("2.11.0",), fallback="a RuntimeError naming the device propagation"),
    PrivateName("torch._subclasses.fake_tensor.init_gpu_context",
                "kept from initialising a device for fake CUDA tensors "
                "(`no_gpu_context_for_fake_tensors`)"),
    PrivateName("torch.utils._python_dispatch.TorchDispatchMode",
                "watching every op of a fake step: collectives' devices, matmul dtypes"),
    PrivateName("torch.utils._pytree.tree_leaves", "the tensors among an op's arguments"),
    PrivateName("torch.distributed._state_dict_utils._create_cpu_state_dict",
                "host buffers (pinned on CUDA) a snapshot's state is copied into",
                checked=("2.11.0", "2.13.0")),
    PrivateName("torch.distributed._state_dict_utils._copy_state_dict",
                "copying a snapshot's state (DTensor shards included) into its host buffers",
                checked=("2.11.0", "2.13.0")),
    PrivateName("torch._C._dispatch_get_all_op_names",
                "the scaleforge operators registered with the dispatcher"),
    PrivateName("torch._C._dispatch_has_kernel_for_dispatch_key",
                "whether each scaleforge operator has a CUDA kernel"),
)


def torch_release() -> str:
    """The installed torch's release without its local tag: "2.11.0" for 2.11.0+cu130."""
    return torch.__version__.split("+")[0]


# --- Process groups and meshes -----------------------------------------------------------

def group_options(backend: str, timeout: datetime.timedelta) -> C10dBackend.Options:
    """Process-group options of `backend` ("nccl" or "gloo") carrying the collective
    `timeout`."""
    # torch's stubs call gloo's options class `Options`; at run time that name is the base
    # Backend.Options and gloo's own is `_Options`.
    options = (dist.ProcessGroupNCCL.Options() if backend == "nccl"
               else dist.ProcessGroupGloo._Options())  # type: ignore[attr-defined]
    options._timeout = timeout
    return options


MeshBackend = str | C10dBackend.Options | tuple[str, C10dBackend.Options]


def flatten_mesh(mesh: DeviceMesh, name: str, backend: MeshBackend) -> DeviceMesh:
    """`mesh`'s dimensions as one, named `name` in its root mesh (`root[name]` finds it),
    with its process groups made with `backend`."""
    return mesh._flatten(name, backend_override=backend)


def unflatten_mesh(mesh: DeviceMesh, dim: str, sizes: tuple[int, ...], names: tuple[str, ...],
                   backend: MeshBackend) -> DeviceMesh:
    """`mesh` with its dimension `dim` cut into dimensions `names` of `sizes` (last inner),
    their process groups made with `backend`."""
    # By index: torch 2.11 raises "dim ... is not in ..." for a name that is in the mesh.
    assert mesh.mesh_dim_names is not None, "unflatten_mesh needs a mesh with named dims"
    index = mesh.mesh_dim_names.index(dim)
    return mesh._unflatten(index, sizes, names,
                           backend_override=dict.fromkeys(names, backend))


# --- Pipelining --------------------------------------------------------------------------

# The stage method torch runs once, on the first step, to learn the stages' input and
# output shapes (on stand-in tensors): 2.13's name, else 2.11's.
SHAPE_INFERENCE = ("_forward_metadata_inference"
                   if hasattr(TorchPipelineStage, "_forward_metadata_inference")
                   else "_shape_inference")


class PipelineStage(TorchPipelineStage):
    """torch's PipelineStage with a hook around its first-step shape inference:
    `shape_inference` is entered while torch runs the stage on stand-in tensors to learn
    shapes, whichever torch version does it (see the module doc)."""

    def shape_inference(self) -> contextlib.AbstractContextManager[None]:
        """Context entered around torch's shape inference; a subclass's to change."""
        return contextlib.nullcontext()

    @property
    def has_backward(self) -> bool:
        """Whether the schedule runs backward through this stage (set by every step and
        eval)."""
        return TorchPipelineStage.has_backward.fget(self)  # type: ignore[attr-defined]

    @has_backward.setter
    def has_backward(self, has_backward: bool) -> None:
        TorchPipelineStage.has_backward.fset(self, has_backward)  # type: ignore[attr-defined]
        if not has_backward:
            return
        # torch 2.11 makes the receive buffers of activations once, on the schedule's first
        # call, and lets them require grad only if that call had backward: after an eval
        # first, every step's input gradient would be None ("for chunk 0 has gradients
        # None"). A step makes them require grad here, as torch would have.
        for buffers in getattr(self, "args_recv_info", {}).values():
            for info in buffers:
                buffer = getattr(info, "buffer", None)
                if isinstance(buffer, torch.Tensor) and buffer.is_leaf:
                    buffer.requires_grad_(True)

    def _get_init_p2p_neighbors_ops(self) -> list[dist.P2POp]:
        # torch 2.11 warms up the links to the neighbouring stages with a send and a receive
        # each way, also to a neighbour on this rank (V schedules hold two adjacent stages):
        # gloo has no link to itself ("Pair is not connected"). Those are left out.
        ops: list[dist.P2POp] = super()._get_init_p2p_neighbors_ops()
        return [op for op in ops if op.group_peer != self.group_rank]

    if SHAPE_INFERENCE == "_forward_metadata_inference":
        def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
            with self.shape_inference():
                return getattr(super(), SHAPE_INFERENCE)(*args, **kwargs)
    else:
        def _shape_inference(self, *args: Any, **kwargs: Any) -> Any:
            with self.shape_inference():
                return getattr(super(), SHAPE_INFERENCE)(*args, **kwargs)


def wrap_loss_computation(schedule: Any, wrap: Callable[[Callable], Callable]) -> None:
    """Replace `schedule`'s loss computation (called once per micro-batch on the last stage)
    with `wrap` of it."""
    schedule._compute_loss = wrap(schedule._compute_loss)


# --- Tensor parallelism, checkpointing, context parallelism -----------------------------

class ParallelStyle(TorchParallelStyle):
    """A custom tensor-parallel style: implement `apply(module, mesh)` (torch calls its
    private `_apply`)."""

    def apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """Parallelize `module` over `device_mesh` in place; return it."""
        raise NotImplementedError

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return self.apply(module, device_mesh)


C10D_FUNCTIONAL = torch.ops._c10d_functional
SDPA_FLASH = torch.ops.aten._scaled_dot_product_flash_attention
SDPA_EFFICIENT = torch.ops.aten._scaled_dot_product_efficient_attention
SDPA_EFFICIENT_BACKWARD = torch.ops.aten._scaled_dot_product_efficient_attention_backward
SDPA_CUDNN = torch.ops.aten._scaled_dot_product_cudnn_attention
SDPA_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
SDPA_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def enable_torch_context_parallel(rotate: str) -> None:
    """Turn on torch's context-parallel SDPA for DTensors sharded by sequence (for the whole
    process), rotating K/V shards by `rotate` ("alltoall" or "allgather")."""
    # Imported here: an experimental private module, needed on CUDA only.
    from torch.distributed.tensor.experimental._attention import (
        _enable_context_parallel_dispatcher,
        set_rotate_method,
    )

    _enable_context_parallel_dispatcher()
    set_rotate_method(rotate)


# --- Kernels and autograd ----------------------------------------------------------------

# (a (n, k), b (groups, k, m), offs=int32 group ends) -> (n, m); None where torch lacks it.
grouped_mm: Callable[..., torch.Tensor] | None = (
    torch._grouped_mm if hasattr(torch, "_grouped_mm") else None)


def in_autograd_backward() -> bool:
    """Whether autograd's engine is running a backward in this thread (activation
    checkpointing's recomputation runs there)."""
    return torch._C._current_graph_task_id() != -1


# --- Profiling and measurement -----------------------------------------------------------

def dump_flight_recorder() -> bytes | None:
    """This process's flight-recorder record of its recent collectives (a pickle, as torch's
    `fr_trace` tool reads it): NCCL's where torch was built with it, else the generic one;
    None where the build has neither or the dump fails."""
    try:
        if hasattr(torch._C._distributed_c10d, "_dump_nccl_trace"):
            return torch._C._distributed_c10d._dump_nccl_trace()
        if hasattr(torch._C._distributed_c10d, "_dump_fr_trace"):
            return torch._C._distributed_c10d._dump_fr_trace()
    except RuntimeError:
        pass
    return None

def copy_to_host(state: dict[str, Any], buffers: dict[str, Any] | None,
                 pin_memory: bool) -> dict[str, Any]:
    """`state` (nested dicts of tensors and DTensors) copied into host memory: into
    `buffers`, made by an earlier call for a state of the same keys, shapes and dtypes, or
    into new ones (pinned with `pin_memory`); returns the copy (DTensors stay DTensors, with
    host shards). torch.distributed.checkpoint's `DefaultStager` would do it, but torch
    2.11's fails on every tensor (KeyError: <class 'type'>)."""
    if buffers is None:
        buffers = _create_cpu_state_dict(state, pin_memory=pin_memory)
    return _copy_state_dict(state, buffers)


def record_cuda_memory_history(enabled: bool) -> None:
    """Start (True) or stop (False) recording CUDA allocations for a memory snapshot."""
    if enabled:
        torch.cuda.memory._record_memory_history()
    else:
        torch.cuda.memory._record_memory_history(enabled=None)


def dump_cuda_memory_snapshot(path: str) -> None:
    """Write the recorded CUDA allocations to `path` (a pickle for pytorch.org/memory_viz)."""
    torch.cuda.memory._dump_snapshot(path)


def mem_tracker() -> Any:
    """torch's MemTracker (a context that counts the bytes of live tensor storages), not
    counting the fake tensors DTensor's sharding propagation makes.

    DTensor works out an op's output layout on fake tensors of the global shape the first
    time it meets the op; torch 2.13's MemTracker leaves those out, 2.11's counts them as
    if they held memory (a vocabulary-parallel head then seems to hold the whole logits).
    This one skips every op run under another fake mode than the one at its entry, as
    2.13's does, on every version."""
    from torch._guards import active_fake_mode
    from torch.distributed._tools.mem_tracker import MemTracker

    class RealMemoryTracker(MemTracker):
        def __enter__(self) -> RealMemoryTracker:
            self.fake_mode_on_entry = active_fake_mode()
            super().__enter__()
            return self

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            if active_fake_mode() is not self.fake_mode_on_entry:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return RealMemoryTracker()


def wrapped_tensors(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """The tensors a wrapper subclass (DTensor, FSDP's parameters, an async collective's
    result) wraps, as its `__tensor_flatten__` names them; None for a plain tensor."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(tensor):
        return None
    names, _ = tensor.__tensor_flatten__()
    return [value for name in names if isinstance(value := getattr(tensor, name), torch.Tensor)]


def view_base(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor `tensor` is a view of, or `tensor` itself."""
    return tensor._base if tensor._base is not None else tensor


@contextlib.contextmanager
def checkpoint_cache_hook(on_cache: Callable[[Any, Any], None]) -> Iterator[None]:
    """Call `on_cache(wrapper, value)` for each op output selective activation checkpointing
    caches for backward, while in this block."""
    wrapper = torch.utils.checkpoint._VersionWrapper
    original = wrapper.__init__

    def cache(cached: Any, value: Any) -> None:
        original(cached, value)
        on_cache(cached, value)

    wrapper.__init__ = cache  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        wrapper.__init__ = original  # type: ignore[method-assign]


# --- Fake CUDA tensors and the dispatcher (bench/fake_cuda.py: CUDA without a GPU) --------

def is_fake_device_mismatch(error: BaseException) -> bool:
    """Whether `error` is a fake-tensor op given tensors on two devices (torch 2.13+ raise
    FakeTensorDeviceMismatchError; 2.11 a RuntimeError saying "Unhandled FakeTensor Device
    Propagation")."""
    mismatch = getattr(fake_tensor, "FakeTensorDeviceMismatchError", None)
    if mismatch is not None and isinstance(error, mismatch):
        return True
    return "Unhandled FakeTensor Device Propagation" in str(error)


@contextlib.contextmanager
def no_gpu_context_for_fake_tensors() -> Iterator[None]:
    """While entered, making a fake CUDA tensor does not initialise the device (torch 2.11
    does where torch.cuda says it is available; 2.13+ ask the accelerator itself)."""
    original = fake_tensor.init_gpu_context

    def no_context(device: torch.device) -> None:
        pass

    # An lru_cache wrapper in torch, a plain function here.
    fake_tensor.init_gpu_context = no_context  # type: ignore[assignment]
    try:
        yield
    finally:
        fake_tensor.init_gpu_context = original


def operator_names(namespace: str) -> list[str]:
    """The operators registered under `namespace` ("ns::name"), from torch's dispatcher."""
    return sorted(name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith(f"{namespace}::"))


def has_kernel_for(operator: str, dispatch_key: str) -> bool:
    """Whether `operator` ("ns::name") has a kernel registered for `dispatch_key` ("CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(operator, dispatch_key)
