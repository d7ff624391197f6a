"""The experts' load across ranks: the aux-loss-free bias update after each step and the
per-step MoE metrics.

Each MoE layer counts, during the step's training forwards, the (token, expert) assignments
its router made on this rank (`MoE.load`), the assignments a capacity factor dropped and its
auxiliary loss (models/moe.py). After the optimizer step, `ExpertLoad.step` sums the counts
of every layer at once (one all-reduce per step) over the ranks that route different
tokens: the data-parallel ranks and the context-parallel ones, each with its chunks of the
sequences (tensor-parallel ranks route the same tokens and pipeline stages hold different
layers, so neither is summed); it moves
DeepSeek-V3's expert bias by `model.moe.bias_update_rate` towards the mean load, and keeps
the step's figures for `metrics`. All of it stays on the device; `metrics` reads it on the
host at log time only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from scaleforge.models.config import TransformerConfig
from scaleforge.models.moe import moe_layers, set_aux_loss_scale, update_expert_bias
from scaleforge.parallel.collectives import sum_over_tokens
from scaleforge.parallel.topology import Topology


class ExpertLoad:
    """Per-step balancing and metrics of the MoE layers of `model` (a Transformer or a
    pipeline's model_parts); a no-op for a dense model."""

    def __init__(self, model: nn.Module, topology: Topology, cfg: TransformerConfig,
                 micro_batches: int):
        self.layers = moe_layers(model)
        self.topology = topology
        self.moe, self.n_layers, self.micro_batches = cfg.moe, cfg.n_layers, micro_batches
        set_aux_loss_scale(model, 1.0 / micro_batches)
        # The last step's figures per layer: max/mean load, dropped assignments, aux loss.
        self.last: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        """After the optimizer step: sum this step's loads over the data- and
        context-parallel ranks, update the expert bias, keep the figures, zero the
        counters."""
        if not self.layers:
            return
        # Every layer's counts in one tensor: one all-reduce per step for all of them.
        packed = sum_over_tokens(self.topology, torch.cat([
            torch.cat([module.load, module.dropped.view(1), module.aux_loss.view(1)])
            for module in self.layers.values()]))
        sizes = [module.load.numel() + 2 for module in self.layers.values()]
        for (index, module), counts in zip(self.layers.items(), packed.split(sizes),
                                           strict=True):
            load = counts[:-2]
            if self.moe.bias_update_rate > 0:
                update_expert_bias(module, load, self.moe.bias_update_rate)
            # Each rank's aux loss is already of whole sequences (models/moe.py): their mean.
            aux = counts[-1] / (self.topology.dp_size * self.topology.dims.cp
                                * self.micro_batches)
            self.last[index] = torch.stack([load.max() / load.mean().clamp(min=1), counts[-2], aux])
            for buffer in (module.load, module.dropped, module.aux_loss):
                buffer.zero_()

    def metrics(self) -> dict[str, float]:
        """The last step's `aux_loss` (summed over layers, mean over micro-batches and
        ranks), and per MoE layer i `expert_load.i` (max / mean tokens per expert, 1 is
        even) and `dropped_tokens.i` (assignments over capacity), with their maximum and
        sum over layers as `expert_load` and `dropped_tokens`. Empty for a dense model.
        Under pipeline parallelism the stages' layers are summed over the pp group (a
        collective on every pp rank)."""
        if not self.moe.enabled:
            return {}
        table = torch.zeros(self.n_layers, 3, device=self.topology.device)
        for index, figures in self.last.items():
            table[index] = figures
        if self.topology.pp_group is not None:
            dist.all_reduce(table, group=self.topology.pp_group)
        rows = table.tolist()
        layers = [i for i in range(len(rows)) if self.moe.is_moe_layer(i)]
        record = {"aux_loss": sum(rows[i][2] for i in layers),
                  "expert_load": max(rows[i][0] for i in layers),
                  "dropped_tokens": sum(rows[i][1] for i in layers)}
        for i in layers:
            record[f"expert_load.{i}"] = rows[i][0]
            record[f"dropped_tokens.{i}"] = rows[i][1]
        return record
