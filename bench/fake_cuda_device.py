"""torch.cuda answering as on a machine with H100s, for bench/fake_cuda.py's fake CUDA world:
`cuda_answered(n)` patches the device queries (availability, count, name, capability (9, 0),
bf16 support), the allocator's statistics, the generator state, and stands in for the streams
and events FSDP orders its collectives with; generators draw on the host and
`nn.Module.to_empty` sets new fake Parameters instead of swapping their contents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch import nn

from scaleforge.torch_compat import no_gpu_context_for_fake_tensors

DEVICE_NAME = "NVIDIA H100 80GB HBM3"
CAPABILITY = (9, 0)


def _host_generator(real: type) -> Callable[..., torch.Generator]:
    def generator(device: Any = "cpu") -> torch.Generator:
        return real("cpu")

    return generator


def _to_empty_without_swap(module: nn.Module, *, device: torch.device | str,
                           recurse: bool = True) -> nn.Module:
    """nn.Module.to_empty for fake parameters: new Parameters set in place of the old (a
    parameter shared by two modules stays shared), where torch's `_apply` swaps a fake
    parameter's contents, which a fake tensor refuses ("Cannot swap t1 because it has
    weakref associated with it")."""
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules() if recurse else [module]:
        for name, param in list(sub.named_parameters(recurse=False)):
            if id(param) not in made:
                made[id(param)] = nn.Parameter(torch.empty_like(param, device=device),
                                               requires_grad=param.requires_grad)
            setattr(sub, name, made[id(param)])
        for name, buffer in list(sub.named_buffers(recurse=False)):
            setattr(sub, name, torch.empty_like(buffer, device=device))
    return module


class StandInEvent:
    """A CUDA event without a device (FSDP orders its streams with events): recorded and
    waited on at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> StandInEvent:
        return self

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class StandInStream(StandInEvent):
    """A CUDA stream without a device (FSDP's all-gather and reduce-scatter streams): all
    work is on one stream, so every wait is already met."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: StandInEvent | None = None) -> StandInEvent:
        return event or StandInEvent()

    def is_capturing(self) -> bool:
        """No CUDA graph is being captured (the optimizer asks)."""
        return False


@contextlib.contextmanager
def cuda_answered(device_count: int) -> Iterator[None]:
    """torch.cuda answering as on a machine with `device_count` H100s (module doc)."""
    patches: list[Any] = [
        mock.patch.object(torch.cuda, "is_available", lambda: True),
        mock.patch.object(torch.cuda, "device_count", lambda: device_count),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "set_device", lambda device: None),
        mock.patch.object(torch.cuda, "get_device_name", lambda device=None: DEVICE_NAME),
        mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: CAPABILITY),
        mock.patch.object(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True),
        # The caching allocator's statistics (throughput and memory metrics): none here.
        mock.patch.object(torch.cuda, "reset_peak_memory_stats", lambda device=None: None),
        mock.patch.object(torch.cuda, "max_memory_allocated", lambda device=None: 0),
        mock.patch.object(torch.cuda, "max_memory_reserved", lambda device=None: 0),
        mock.patch.object(torch.cuda, "synchronize", lambda device=None: None),
        # The CUDA generator's state (torch.random.fork_rng around pipeline set-up): none.
        mock.patch.object(torch.cuda, "get_rng_state",
                          lambda device="cuda": torch.zeros(16, dtype=torch.uint8)),
        mock.patch.object(torch.cuda, "set_rng_state", lambda state, device="cuda": None),
        # Streams and events, which FSDP uses to overlap its collectives with compute.
        mock.patch.object(torch.cuda, "Stream", StandInStream),
        mock.patch.object(torch.cuda, "Event", StandInEvent),
        mock.patch.object(torch.cuda, "current_stream", lambda device=None: StandInStream()),
        mock.patch.object(torch.cuda, "default_stream", lambda device=None: StandInStream()),
        mock.patch.object(torch.cuda, "stream", lambda stream: contextlib.nullcontext()),
        mock.patch.object(torch.accelerator, "current_stream",
                          lambda device=None: StandInStream()),
        # No CUDA graph is being captured (torch 2.11's optimizer asks torch.cuda).
        mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False),
        mock.patch.object(torch, "Generator", _host_generator(torch.Generator)),
        mock.patch.object(nn.Module, "to_empty", _to_empty_without_swap),
        # A fake CUDA tensor's first making initialises the device when torch.cuda says
        # it is available (torch 2.11; 2.14 asks the accelerator itself): not here.
        no_gpu_context_for_fake_tensors(),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield
