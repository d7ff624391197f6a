"""Two tensor-parallel styles torch's set lacks, for the names of models/family.TP_STYLES.

GatherSequence (`gather_sequence`): a module's first argument, the residual stream as a
DTensor sharded on the sequence (Shard(1); a plain tensor is taken as this rank's shard),
all-gathered to Replicate before forward, whatever else the module takes (attention's rope
tables and mask stay plain tensors). Backward reduce-scatters its gradient to the shard. It
is torch's PrepareModuleInput for the first argument only.

ReplicateParallel (`replicate`, `replicate_local`): a module every tp rank runs whole on the
whole sequence, its weights Replicate DTensors (so the optimizer sees DTensors only). Its
input is a replicated DTensor (a plain tensor is taken as the same on every rank). Its output
stays a replicated DTensor, or with `local_output` becomes a plain tensor whose gradient is
marked Partial: each rank's gradient then is only its own heads' share (multi-head latent
attention's shared RoPE key, read by every rank's heads), and DTensor sums the shares over
tp in backward, for the weights (Partial gradients, reduced when read, like the
sequence-parallel norms') and for the input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from scaleforge.torch_compat import ParallelStyle


class GatherSequence(ParallelStyle):
    """The first argument all-gathered on the sequence (see the module docstring)."""

    def apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """Hook `module` to all-gather its first argument over `device_mesh`."""
        def gather(_: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (Shard(1),), run_check=False)
            return (x.redistribute(placements=(Replicate(),)), *args[1:])

        module.register_forward_pre_hook(gather)
        return module


class ReplicateParallel(ParallelStyle):
    """Weights whole on every tp rank (see the module docstring)."""

    def __init__(self, local_output: bool = False):
        super().__init__()
        self.local_output = local_output

    def apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """Replicate `module`'s plain parameters over `device_mesh`; hook its input (and
        output)."""
        for owner in module.modules():
            for name, param in list(owner.named_parameters(recurse=False)):
                if not isinstance(param, DTensor):
                    placed = distribute_tensor(param, device_mesh, [Replicate()],
                                               src_data_rank=None)
                    setattr(owner, name, nn.Parameter(placed, param.requires_grad))

        def replicated_input(_: nn.Module, inputs: tuple) -> tuple:
            return tuple(
                DTensor.from_local(x, device_mesh, (Replicate(),), run_check=False)
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
                for x in inputs
            )

        def output(_: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            if self.local_output and isinstance(out, DTensor):
                return out.to_local(grad_placements=(Partial(),))
            return out

        module.register_forward_pre_hook(replicated_input)
        module.register_forward_hook(output)
        return module
