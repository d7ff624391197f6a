"""Model families: what a family hands the rest of the package, and the registry of them.

A family is a folder `models/<family>/` whose `__init__.py` defines one `FamilySpec`;
`models/families.py` registers each with one line. Shared code never asks which family it
has: it asks the spec (`family_spec(cfg.family)`) for what differs, as torchtitan's
`ModelSpec` hands its trainer one record per model:

- `check`: the family's own rules over the config's fields (the shared ones are checked by
  models/config.py);
- `mlp_hidden`: the dense MLP width a config of None derives;
- the block's parts, each built from the config: `make_norm`, `make_attention`, `make_mlp`
  (models/transformer.py puts them in its pre-norm skeleton); `learned_positions` (a
  position embedding table) and `rope_dim` (the width of the RoPE tables, None: no RoPE);
  `moe` says whether a block's MLP may be a Mixture-of-Experts (models/moe.py);
- `tp_plan`: the block's tensor-parallel plan as data, module path -> a `TP_STYLES` name,
  which parallel/tensor_parallel.py turns into DTensor styles (models/ imports no parallel/);
- `hf_module`: the module holding the family's `HF_ADAPTER` (models/hf_adapter.py), imported
  only when converting, so a run does not pay for importing `transformers`;
- `counts` (`FamilyCounts`): parameters, FLOPs, activations and HBM traffic of a block,
  which models/param_count.py, core/flops.py and planner/ read.

An unknown family name fails at start with one line (`family_spec`), never another
family's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch.nn as nn

from scaleforge.errors import ConfigError

if TYPE_CHECKING:
    from scaleforge.models.config import TransformerConfig

# The tensor-parallel styles a family's plan may name (parallel/tensor_parallel.py):
# sequence_parallel  a norm over this rank's sequence shard; weight replicated
# gather_sequence    the module's first input all-gathered on the sequence (Replicate)
# colwise / rowwise  Megatron's column- and row-parallel linears (rowwise reduce-scatters
#                    its output to the sequence shard)
# head_norm          a per-head norm over this rank's heads (dim 2)
# replicate          a module whose weights every tp rank holds whole, on the whole
#                    sequence; its output stays a replicated DTensor
# replicate_local    the same, its output a local tensor whose gradient is summed over tp
#                    (read by the rank's own heads only)
# moe                a Mixture-of-Experts feed-forward (parallel/expert_tensor_parallel.py)
TP_STYLES = ("sequence_parallel", "gather_sequence", "colwise", "rowwise", "head_norm",
             "replicate", "replicate_local", "moe")


class RankSetting(Protocol):
    """How a micro-batch runs on one rank, as the activation and traffic counts read it
    (planner/activations.ActivationSetting is one)."""

    @property
    def tp(self) -> int: ...
    @property
    def cp(self) -> int: ...
    @property
    def compute_bytes(self) -> int: ...  # bytes of a matmul's inputs and outputs
    @property
    def residual_bytes(self) -> int: ...  # bytes of the residual stream
    @property
    def autocast(self) -> bool: ...  # each linear casts its input once


@dataclass(frozen=True)
class FamilyCounts:
    """A family's closed-form counts; `cfg` is the model config, `x` a RankSetting.

    attention_params(cfg, biases) / mlp_params(cfg, biases): one layer's attention and
      dense MLP parameters (biases=False: the matmul weights alone);
    norm_params(cfg): one norm over d_model; position_params(cfg): a learned position table;
    attention_flops_per_key(cfg): forward FLOPs of one query against one key over a
      layer's heads (scores and the weighted values);
    norm_bytes(cfg, x, consumers): activation bytes per token of a norm and of the
      gathered input of the `consumers` linears that read it;
    attention_bytes(cfg, x) / mlp_bytes(cfg, x): activation bytes per token of a block's
      attention and dense MLP, their norms included, on one tp rank;
    attention_output_bytes(cfg, x): what a selective checkpoint keeps of attention;
    matmul_widths(cfg, x): output width per token of each projection of a block on one tp
      rank, in forward order;
    forward_traffic_bytes(cfg, x): HBM bytes per token of a block's memory-bound forward;
    kv_width(cfg): channels of K and V together per token that a layer's attention reads
      (what context parallelism all-gathers).
    """

    attention_params: Callable[[TransformerConfig, bool], int]
    mlp_params: Callable[[TransformerConfig, bool], int]
    norm_params: Callable[[TransformerConfig], int]
    position_params: Callable[[TransformerConfig], int]
    attention_flops_per_key: Callable[[TransformerConfig], int]
    norm_bytes: Callable[[TransformerConfig, RankSetting, int], float]
    attention_bytes: Callable[[TransformerConfig, RankSetting], float]
    mlp_bytes: Callable[[TransformerConfig, RankSetting], float]
    attention_output_bytes: Callable[[TransformerConfig, RankSetting], float]
    matmul_widths: Callable[[TransformerConfig, RankSetting], list[float]]
    forward_traffic_bytes: Callable[[TransformerConfig, RankSetting], float]
    kv_width: Callable[[TransformerConfig], int]


@dataclass(frozen=True)
class FamilySpec:
    """One model family (the module docstring says what each field is for)."""

    name: str
    summary: str  # one line, for messages
    check: Callable[[TransformerConfig, str], None]
    mlp_hidden: Callable[[TransformerConfig], int]
    make_norm: Callable[[TransformerConfig], nn.Module]
    make_attention: Callable[[TransformerConfig], nn.Module]
    make_mlp: Callable[[TransformerConfig], nn.Module]
    learned_positions: bool
    rope_dim: Callable[[TransformerConfig], int | None]
    moe: bool
    tp_plan: Callable[[TransformerConfig, bool], dict[str, str]]
    hf_module: str
    counts: FamilyCounts


_REGISTRY: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> None:
    """Make `spec` the family `spec.name` (models/families.py calls this once per family)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec


def family_names() -> tuple[str, ...]:
    """The registered families' names."""
    _load_families()
    return tuple(_REGISTRY)


def family_spec(name: str, setting: str = "model.family") -> FamilySpec:
    """The spec of family `name`; ConfigError in one line naming `setting` if none is
    registered under that name."""
    _load_families()
    if name not in _REGISTRY:
        raise ConfigError(
            f"{setting}={name!r} is not a registered model family; use one of "
            f"{', '.join(_REGISTRY)} (a new family registers in models/families.py)"
        )
    return _REGISTRY[name]


def _load_families() -> None:
    # Imported here, not at the top: the families import the config and the layers, which
    # import this module.
    import scaleforge.models.families  # noqa: F401
