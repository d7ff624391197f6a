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


def frozen_names(model: nn.Module) -> set[str]:
    """The single-process names of the parameters that do not train (LoRA's base weights,
    models/lora.py); empty when every parameter trains."""
    return {name for name, param in named_parameters(model) if not param.requires_grad}


def model_state(model: nn.Module, which: str = "all") -> dict[str, torch.Tensor]:
    """This rank's model state keyed by single-process names (DTensors where sharded); a
    tied output weight is left out (it is the token embedding).

    `which`: "all"; "trained", without the frozen parameters (what a checkpoint of a model
    with a frozen base holds: its adapters; the base is the run's trainer.init_from);
    "frozen", only those (what trainer.init_from fills when some are frozen). Where nothing
    is frozen, "trained" and "frozen" are the whole state too."""
    state: dict[str, torch.Tensor] = {}
    for part in model_parts(model):
        state.update(part.state_dict())
    state = drop_tied(state) if _is_tied(model) else state
    frozen = frozen_names(model)
    if not frozen or which == "all":
        return state
    keep = (lambda key: key not in frozen) if which == "trained" else frozen.__contains__
    return {key: value for key, value in state.items() if keep(key)}


def load_model_state(model: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    """Copy `loaded` (model_state keys) into every part's parameters: strict (every key of
    every part filled, a tied output weight from the embedding), or, when `loaded` is the
    "trained" or "frozen" share of a model with frozen parameters, the keys it holds."""
    for part in model_parts(model):
        keys = part.state_dict()
        partial = any(k not in loaded and TIED.get(k) not in loaded for k in keys)
        part.load_state_dict(
            {k: loaded[k] if k in loaded else loaded[TIED[k]] for k in keys
             if k in loaded or TIED.get(k) in loaded},
            strict=not (partial and frozen_names(model)),
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
