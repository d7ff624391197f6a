"""Model and optimizer state as a checkpoint holds it: keyed by parameter FQN.

    model.<fqn>          the single-process state-dict keys; DTensor shards under TP/FSDP
    optim.<fqn>.<name>   each entry of the optimizer's per-parameter state (AdamW:
                         exp_avg, exp_avg_sq, step), by the parameter's name

Keys are the names a single-process model has (the prefixes of activation-checkpoint and
compile wrappers stripped) and a tied output weight is stored once, under the token
embedding's name, so a checkpoint saved under one (tp, pp, dp) layout loads under any other.
Nothing here knows which optimizer runs: whatever per-parameter tensors it keeps are saved,
and `init_optimizer_state` lets the optimizer create them itself before a load.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Wrapper modules insert these into parameter names; state-dict keys never contain them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
# With tied embeddings the output projection is the token embedding: stored once, under
# the embedding's name, and loaded into both.
TIED = {"output.weight": "tok_embeddings.weight"}


def clean_fqn(name: str) -> str:
    """A parameter name without the prefixes of activation-checkpoint and compile wrappers
    (the name its state-dict key has)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def model_parts(model: nn.Module) -> list[nn.Module]:
    """The modules whose state dicts together make the model's: the stages of a pipeline
    (`Pipeline.model_parts`, an nn.ModuleList) or the model itself."""
    return list(model) if isinstance(model, nn.ModuleList) else [model]


def _is_tied(model: nn.Module) -> bool:
    return any(
        getattr(getattr(part, "cfg", None), "tie_embeddings", False) for part in model_parts(model)
    )


def drop_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the tied output weight where the token embedding is present."""
    return {k: v for k, v in state.items() if not (k in TIED and TIED[k] in state)}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's model state keyed by single-process names (DTensors where sharded); a
    tied output weight is left out (it is the token embedding)."""
    state: dict[str, torch.Tensor] = {}
    for part in model_parts(model):
        state.update(part.state_dict())
    return drop_tied(state) if _is_tied(model) else state


def load_model_state(model: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    """Copy `loaded` (model_state keys) into every part's parameters (strict: every key of
    every part is filled, a tied output weight from the embedding)."""
    for part in model_parts(model):
        part.load_state_dict(
            {k: loaded[k] if k in loaded else loaded[TIED[k]] for k in part.state_dict()},
            strict=True,
        )


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(single-process name, parameter) of this rank's parameters, each once."""
    seen: set[int] = set()
    for part in model_parts(model):
        for name, param in part.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield clean_fqn(name), param


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as {"<fqn>.<name>": tensor}, keyed by parameter
    name so it reshards like the weights. The tensors are the optimizer's own: loading into
    them restores it."""
    state: dict[str, torch.Tensor] = {}
    for name, param in named_parameters(model):
        for key, value in optimizer.state.get(param, {}).items():
            state[f"{name}.{key}"] = value
    return state


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Make any optimizer create its per-parameter state, to load a checkpoint into: one
    step with zero gradients and a learning rate of 0, which leaves the parameters as they
    were (what torch.distributed.checkpoint.state_dict does too). Does nothing when the
    state exists already."""
    if optimizer.state:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
    learning_rates = {}
    for index, group in enumerate(optimizer.param_groups):
        if "lr" in group:
            learning_rates[index] = group["lr"]
            group["lr"] = torch.zeros_like(group["lr"]) if torch.is_tensor(group["lr"]) else 0.0
    optimizer.step()
    for index, lr in learning_rates.items():
        optimizer.param_groups[index]["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
