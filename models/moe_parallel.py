"""What parallel/ hands a Mixture-of-Experts layer (models/moe.py): one value, `MoEParallel`,
whose defaults run the layer whole on one device, and the dispatcher contract it holds.
parallel/expert_parallel.py and parallel/expert_tensor_parallel.py replace fields of a
layer's value (`dataclasses.replace(module.parallel, ...)`); the layer never asks which
parallelism it runs under.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Dispatcher(Protocol):
    """Moves expert-sorted tokens to the ranks holding their experts and back."""

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """x (n, d) sorted by global expert, counts (E,) -> (this rank's tokens (m, d) sorted
        by local expert, their counts per local expert, what `combine` needs)."""
        ...

    def combine(self, y: torch.Tensor, state: Any) -> torch.Tensor:
        """The experts' outputs (m, d) -> (n, d) in the order `dispatch` was given."""
        ...


class LocalDispatcher:
    """Every expert on this rank: nothing moves."""

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return x, counts, None

    def combine(self, y: torch.Tensor, state: Any) -> torch.Tensor:
        return y


def itself(value: torch.Tensor) -> torch.Tensor:
    return value


@dataclass
class MoEParallel:
    """What parallel/ hands a MoE layer; the defaults run it whole on one device.

    dispatcher         moves expert-sorted tokens to the ranks holding their experts and
                       back (expert parallelism's all-to-all)
    weight             an expert or shared-expert weight -> the tensor this rank computes
                       with (the local part of a sharded one); None: the weights are whole
                       and the shared experts run as their own module
    router             the router weight -> the tensor this rank routes with (under expert
                       tensor parallelism, with a backward that sums its gradient over tp)
    gradient_copies    how many ranks compute the auxiliary loss whole and have their
                       routing gradients summed: its gradient is divided by this
    sum_over_sequence  a tensor -> its sum over the ranks holding the other chunks of this
                       micro-batch's sequences (context parallelism), no gradient
    """

    dispatcher: Dispatcher = field(default_factory=LocalDispatcher)
    weight: Callable[[torch.Tensor], torch.Tensor] | None = None
    router: Callable[[torch.Tensor], torch.Tensor] = itself
    gradient_copies: int = 1
    sum_over_sequence: Callable[[torch.Tensor], torch.Tensor] = itself
