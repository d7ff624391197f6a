"""Mixture-of-Experts feed-forward for the llama family (Mixtral, DeepSeekMoE / DeepSeek-V3).

A MoE layer replaces a block's SwiGLU with `num_experts` SwiGLU experts of width
`expert_hidden`, a router and, optionally, `shared_experts` experts every token passes
through (DeepSeekMoE; held as one SwiGLU of width shared_experts x expert_hidden):

    scores  = softmax(x R^T) or sigmoid(x R^T)                 (N, E), fp32
    chosen  = top_k(scores + expert_bias)                      (N, k) token-choice routing
    weights = scores[chosen], over k renormalised (normalize_weights)
    y       = shared(x) + sum_j weights_j * expert_{chosen_j}(x)

`expert_bias` (DeepSeek-V3's aux-loss-free balancing) steers only the choice, never the
weights, and is updated outside the gradient after each optimizer step: b_i += rate *
sign(mean load - load_i) (`update_expert_bias`, called by parallel/expert_load.py with
the load summed over data-parallel ranks). The auxiliary loss (Switch / GShard) is
coef x E x sum_i f_i P_i with f_i the fraction of this micro-batch's assignments to expert
i and P_i its mean score; its gradient is added in backward (`_AddAuxLossGrad`), scaled by
`aux_loss_scale` (1 / micro-batches, set by the trainer) like the language-model loss, so
the reported loss stays the cross-entropy alone.

Dispatch: the (token, choice) assignments are sorted by expert (stable), the tokens gathered
in that order and the experts run as one grouped GEMM over the groups (`torch._grouped_mm`
where it works: CPU, CUDA bf16 on Hopper; a loop over experts otherwise, `grouped_mm`),
then the outputs are weighted (in the residual stream's dtype) and summed back per token
(`index_add_`). The experts compute in autocast's dtype when autocast is on (bf16: under
bf16 autocast the residual stream stays fp32, and fp32 experts would miss the bf16 grouped
GEMM); the sorted tokens are cast before they are dispatched, so expert parallelism's
all-to-all carries them in that dtype too. For the grouped GEMM each expert's group is
padded with zero rows to a multiple of `GROUP_ALIGNMENT` rows (CUDA's kernel needs every
group to start 16 bytes apart along the token dim, which the weight gradient's GEMM
reduces over: 8 bf16 rows, torchtitan's TOKEN_GROUP_ALIGN_SIZE_M), on the device without
a host sync (`pad_groups`). Dropless by default; a
`capacity_factor` keeps at most ceil(cf x N x k / E) assignments per expert (in token
order) and counts the rest as dropped.

Parallelism reaches the layer through one value, `MoE.parallel` (`MoEParallel`), which
parallel/ replaces and the defaults of which run the layer on one device: its dispatcher
moves the sorted tokens to the ranks holding their experts and back
(parallel/expert_parallel.py; the local one moves nothing), `weight` gives the tensor this
rank computes with for an expert or shared-expert weight (this rank's experts under expert
parallelism, this rank's slices of their width under expert tensor parallelism,
parallel/expert_tensor_parallel.py, where the layer's output is then this rank's partial
sum, which the parallel code reduces), and `router`, `gradient_copies` and
`sum_over_sequence` serve the router and the auxiliary loss (models/moe_parallel.py).

Host syncs: none in the dropless grouped-GEMM path (the group offsets stay on the device;
tests/test_host_syncs.py). The loop over experts reads the group sizes on the host, a
capacity factor reads the number kept, and expert parallelism reads the all-to-all split
sizes once per layer: the reads a token-choice MoE needs (as Megatron's and torchtitan's).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaleforge.errors import ConfigError, check_choice
from scaleforge.models.moe_parallel import MoEParallel, itself
from scaleforge.torch_compat import grouped_mm, in_autograd_backward

SCORE_FUNCS = ("softmax", "sigmoid")
GROUPED_MM = ("auto", "grouped", "loop")
# Rows each expert's group is padded to a multiple of for torch._grouped_mm (8 bf16 rows are
# 16 bytes; torchtitan pads alike, and to at least one multiple, for bf16).
GROUP_ALIGNMENT = 8
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Expert weight names, each (E, out, in) like a stack of nn.Linear weights: w1 gate, w3 up,
# w2 down (the residual projection).
EXPERT_WEIGHTS = ("w1", "w3", "w2")


@dataclass
class MoEConfig:
    """`model.moe.*`: num_experts 0 is a dense model.

    A layer i is MoE when i >= first_dense_layers and (i - first_dense_layers + 1) is a
    multiple of every_n_layers (1: every layer after the dense ones; 2: every second, as
    Llama 4). Dense layers keep the model's SwiGLU (model.ffn_hidden). expert_hidden null
    takes the model's MLP width. capacity_factor null is dropless. grouped_mm: auto uses
    torch._grouped_mm where it runs (`use_grouped_mm`) and the loop elsewhere.
    """

    num_experts: int = 0  # routed experts per MoE layer; 0: a dense model
    top_k: int = 2  # experts each token is sent to
    shared_experts: int = 0  # experts every token goes through (DeepSeek)
    expert_hidden: int | None = None  # an expert's MLP width; null: the model's
    every_n_layers: int = 1  # a MoE layer every this many (after the dense ones)
    first_dense_layers: int = 0  # leading dense layers (DeepSeek)
    score_func: str = "softmax"  # router scores: softmax or sigmoid
    normalize_weights: bool = True  # top-k weights rescaled to sum to 1
    aux_loss_coef: float = 0.0  # Switch/GShard load-balancing loss weight; 0: off
    bias_update_rate: float = 0.0  # aux-loss-free balancing bias step; 0: off
    capacity_factor: float | None = None  # tokens per expert cap; null: dropless
    grouped_mm: str = "auto"  # experts as torch._grouped_mm, a loop, or auto

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        if not self.enabled or layer < self.first_dense_layers:
            return False
        return (layer - self.first_dense_layers + 1) % self.every_n_layers == 0

    def check(self, prefix: str, n_layers: int) -> None:
        """Raise ConfigError naming the first bad `prefix.field` (whether the model's family
        has MoE blocks at all is its spec's to say: models/config.py asks it)."""
        if self.num_experts < 0:
            raise ConfigError(f"{prefix}.num_experts={self.num_experts} must be >= 0 (0: dense)")
        if not self.enabled:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"{prefix}.top_k={self.top_k} must be between 1 and {prefix}.num_experts="
                f"{self.num_experts}"
            )
        for name in ("shared_experts", "first_dense_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be >= 0")
        if self.every_n_layers < 1:
            raise ConfigError(f"{prefix}.every_n_layers={self.every_n_layers} must be >= 1")
        if not any(self.is_moe_layer(i) for i in range(n_layers)):
            raise ConfigError(
                f"{prefix}.first_dense_layers={self.first_dense_layers} and every_n_layers="
                f"{self.every_n_layers} leave no MoE layer among model.n_layers={n_layers}; "
                "lower them"
            )
        if self.expert_hidden is not None and self.expert_hidden <= 0:
            raise ConfigError(f"{prefix}.expert_hidden={self.expert_hidden} must be positive")
        check_choice(f"{prefix}.score_func", self.score_func, SCORE_FUNCS)
        check_choice(f"{prefix}.grouped_mm", self.grouped_mm, GROUPED_MM)
        for name in ("aux_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(
                f"{prefix}.capacity_factor={self.capacity_factor} must be positive, or null "
                "for dropless routing"
            )


def use_grouped_mm(setting: str, x: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs the experts: `grouped` always, `loop` never; `auto`
    on the CPU (torch 2.13: fp32 and bf16, forward and backward; 0.5-0.9x the loop's time,
    bench/moe_gemm.py) and on CUDA in bf16 from compute capability 9.0 (Hopper), the
    kernel's requirement; the loop elsewhere, and on a torch without it (torch_compat)."""
    if grouped_mm is None:
        return False
    if setting != "auto":
        return setting == "grouped"
    if x.device.type == "cpu":
        return True
    return (x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


class Experts(nn.Module):
    """`num_experts` SwiGLU experts stacked: w1, w3 (E, hidden, d), w2 (E, d, hidden).

    Under expert parallelism the weights are sharded on dim 0 and each rank runs its local
    experts (the `local` parts `MoEParallel.weight` gives), so forward takes this rank's
    groups only.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, grouped_mm: str):
        super().__init__()
        self.grouped_mm = grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, hidden))

    def forward(self, x: torch.Tensor, counts: torch.Tensor,
                local: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x (n, d) grouped by expert, counts (E_local,) -> (n, d); `local`: a weight -> the
        tensor this rank computes with (`MoEParallel.weight`; None: the weight itself)."""
        local = local or itself
        w1, w3, w2 = (local(w).to(x.dtype) for w in (self.w1, self.w3, self.w2))
        if use_grouped_mm(self.grouped_mm, x):
            padded, offsets, rows = pad_groups(x, counts)

            def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                assert grouped_mm is not None  # use_grouped_mm is False without it
                return grouped_mm(a, w.transpose(-2, -1), offs=offsets)

            return mm(F.silu(mm(padded, w1)) * mm(padded, w3), w2)[rows]
        outputs = []
        for e, rows in enumerate(x.split(counts.tolist())):  # host sync: the group sizes
            outputs.append(F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e]))
        return torch.cat(outputs) if outputs else x.new_zeros(0, w2.size(1))


def pad_groups(x: torch.Tensor, counts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, d) in groups of `counts` (E,) rows -> (the groups each padded with zero rows to
    a multiple of GROUP_ALIGNMENT rows, at least one, in a buffer of n + E x GROUP_ALIGNMENT
    rows; the padded groups' end offsets (E,) int32 for torch._grouped_mm; the position of
    each row of x in the buffer (n,)). Shapes depend on n and E only: no host sync. Rows
    past the last offset belong to no group and are never read back."""
    n, experts = x.size(0), counts.numel()
    align = GROUP_ALIGNMENT
    sizes = (counts.clamp(min=align) + align - 1) // align * align  # padded group sizes
    ends = sizes.cumsum(0)
    expert = torch.repeat_interleave(torch.arange(experts, device=x.device), counts,
                                     output_size=n)  # each row's group
    first = counts.cumsum(0) - counts  # each group's first row in x
    rows = (ends - sizes - first)[expert] + torch.arange(n, device=x.device)
    buffer = x.new_zeros(n + experts * GROUP_ALIGNMENT, x.size(1)).index_copy(0, rows, x)
    return buffer, ends.to(torch.int32), rows


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's for x's device when autocast is on
    there (bf16 experts under bf16 autocast, whatever the residual stream's dtype), else
    x's own."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _AddAuxLossGrad(torch.autograd.Function):
    """Identity on `out` that gives `aux` the gradient `scale` in backward: the auxiliary
    loss joins the training objective without changing the loss the model returns."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


class MoE(nn.Module):
    """The routed experts (and shared ones) of one layer; see the module docstring.

    Buffers: `expert_bias` (E,) is training state (saved in checkpoints); `load` (E,),
    `dropped` and `aux_loss` () accumulate this step's routing statistics (not saved)
    and are read and zeroed after the step by parallel/expert_load.py.
    """

    expert_bias: torch.Tensor
    load: torch.Tensor
    dropped: torch.Tensor
    aux_loss: torch.Tensor

    def __init__(self, cfg: Any, shared: nn.Module | None):
        super().__init__()
        moe: MoEConfig = cfg.moe
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.score_func, self.normalize_weights = moe.score_func, moe.normalize_weights
        self.aux_loss_coef, self.capacity_factor = moe.aux_loss_coef, moe.capacity_factor
        self.aux_loss_scale = 1.0  # 1 / micro-batches per step (set_aux_loss_scale)
        self.recording = True  # add to the statistics (off: statistics_paused)
        self.router = nn.Linear(cfg.d_model, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, cfg.d_model, expert_hidden(cfg), moe.grouped_mm)
        self.shared = shared
        self.parallel = MoEParallel()  # replaced by parallel/ (module docstring)
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts))
        self.register_buffer("load", torch.zeros(moe.num_experts), persistent=False)
        self.register_buffer("dropped", torch.zeros(()), persistent=False)
        self.register_buffer("aux_loss", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        tokens = x.reshape(-1, d)  # (N, d)
        hooks = self.parallel
        scores = F.linear(tokens, hooks.router(self.router.weight)).float()  # (N, E)
        scores = scores.softmax(-1) if self.score_func == "softmax" else scores.sigmoid()
        with torch.no_grad():
            chosen = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, chosen)
        if self.normalize_weights and self.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        flat = chosen.flatten()  # (N*k,) expert of each assignment
        order = flat.argsort(stable=True)
        # A scatter, not bincount: CUDA's bincount reads the largest index on the host.
        counts = flat.new_zeros(self.num_experts).scatter_add_(0, flat, torch.ones_like(flat))
        routed = counts
        if self.capacity_factor is not None:
            order, counts = self._drop_overflow(flat, order, counts, self.capacity_factor)
        sorted_x = tokens[order // self.top_k]  # (n, d) grouped by expert
        sorted_x = sorted_x.to(compute_dtype(sorted_x))
        local_x, local_counts, state = hooks.dispatcher.dispatch(sorted_x, counts)
        y = hooks.dispatcher.combine(self.experts(local_x, local_counts, hooks.weight), state)
        y = y.to(tokens.dtype) * weights.flatten()[order, None].to(tokens.dtype)
        out = torch.zeros_like(tokens).index_add_(0, order // self.top_k, y)
        if self.shared is not None:
            out = out + self._shared_experts(tokens)
        if self.training and self.aux_loss_coef > 0:
            # Switch: E * sum_i f_i P_i, f the assignment fractions, P the mean (normalised)
            # scores. Sequences split over ranks: f of the whole sequences, P of this rank's
            # tokens; the mean of the ranks' losses is the whole sequences' (equal chunks).
            probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, True)
            all_routed = hooks.sum_over_sequence(routed.float())
            fraction = all_routed / all_routed.sum()
            aux = self.aux_loss_coef * self.num_experts * (fraction * probs.mean(0)).sum()
            out = _AddAuxLossGrad.apply(out, aux, self.aux_loss_scale / hooks.gradient_copies)
            self._record(aux=aux.detach())
        self._record(load=routed.float(), dropped=float(flat.numel()) - counts.sum())
        return out.view(B, T, d)

    def _shared_experts(self, tokens: torch.Tensor) -> torch.Tensor:
        """The shared experts' SwiGLU of tokens (N, d) -> (N, d), with the weights this rank
        computes with when they are sharded (`MoEParallel.weight`): under expert tensor
        parallelism they are sharded like the routed experts' (w1, w3 by columns, w2 by
        rows) and this rank's pieces give its partial sum over tp."""
        assert self.shared is not None
        local = self.parallel.weight
        if local is None:
            return self.shared(tokens)
        w1, w3, w2 = (local(getattr(self.shared, name).weight) for name in ("w1", "w3", "w2"))
        return F.linear(F.silu(F.linear(tokens, w1)) * F.linear(tokens, w3), w2)

    def _drop_overflow(self, flat: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
                       factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the first ceil(factor x assignments / experts) assignments of each expert,
        in token order (a host sync: the number kept)."""
        capacity = math.ceil(factor * flat.numel() / self.num_experts)
        starts = counts.cumsum(0) - counts  # first sorted position of each expert
        position = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
        return order[position < capacity], counts.clamp(max=capacity)

    @torch.no_grad()
    def _record(self, load: torch.Tensor | None = None, dropped: torch.Tensor | None = None,
                aux: torch.Tensor | None = None) -> None:
        """Add to this step's statistics: training forwards only, not the recomputation
        activation checkpointing runs inside backward (a graph task is then running)."""
        if not (self.training and self.recording) or in_autograd_backward():
            return
        if load is not None:
            self.load += load
        if dropped is not None:
            self.dropped += dropped
        if aux is not None:
            self.aux_loss += aux


def expert_hidden(cfg: Any) -> int:
    """One expert's SwiGLU width: model.moe.expert_hidden, else the model's MLP width."""
    hidden = cfg.moe.expert_hidden
    return int(hidden) if hidden is not None else int(cfg.mlp_hidden)


def moe_layers(model: nn.Module) -> dict[int, MoE]:
    """The MoE modules of `model` (a Transformer, a pipeline stage or a pipeline's
    model_parts) by layer index (from the `layers.<i>` in their names)."""
    return {int(found.group(1)): module for name, module in model.named_modules()
            if isinstance(module, MoE) and (found := _LAYER.search(name))}


@contextlib.contextmanager
def statistics_paused(model: nn.Module) -> Iterator[None]:
    """Within the block, `model`'s MoE layers route without counting (a forward on
    stand-in tensors, such as a pipeline stage's shape inference)."""
    layers = moe_layers(model).values()
    for module in layers:
        module.recording = False
    try:
        yield
    finally:
        for module in layers:
            module.recording = True


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The factor of the auxiliary loss's gradient: 1 / micro-batches per step, as the
    language-model loss of each micro-batch is divided."""
    for module in moe_layers(model).values():
        module.aux_loss_scale = scale


@torch.no_grad()
def update_expert_bias(module: MoE, load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free step: raise the bias of underloaded experts, lower it for
    overloaded ones, by `rate` each (`load`: the step's tokens per expert, all ranks)."""
    module.expert_bias += rate * torch.sign(load.mean() - load)


@torch.no_grad()
def reset_moe_state(model: nn.Module) -> None:
    """Zero every MoE layer's expert bias and statistics (after `to_empty`)."""
    for module in moe_layers(model).values():
        for buffer in (module.expert_bias, module.load, module.dropped, module.aux_loss):
            buffer.zero_()
