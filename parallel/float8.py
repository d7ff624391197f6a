"""FP8 training (`trainer.fp8`): float8 matmuls in the transformer blocks' linear layers,
through torchao's float8 training API (the field's library; no scaling code of our own).

    none        every matmul in the run's precision (the default)
    tensorwise  one dynamic scale per tensor (input, weight, gradient): the fastest recipe,
                and the one whose weights FSDP all-gathers in float8 (half of bf16's bytes)
    rowwise     one dynamic scale per row (torchao's rowwise recipe, power-of-2 scales):
                more accurate with outliers, a little slower, weights gathered in bf16

What is converted: the `nn.Linear` layers inside `model.layers` (attention projections, MLP)
whose both dimensions, as this rank holds them after tensor parallelism, are multiples of
16 (what the float8 GEMM takes). What stays in high precision: the embeddings, the output
head (the logits' precision matters most and its vocabulary dimension is the widest), any
block linear with an odd shape, and LoRA's adapted projections (their own forward);
`describe_float8` lists both for the start line. A model with experts (MoE) is refused:
torchao's float8 grouped GEMM is not used here.

Conversion runs before tensor parallelism, activation checkpointing, compile and FSDP
(parallel/parallelize.py), as torchao and torchtitan order it. Float8Linear keeps its
weight in the model's dtype (fp32 master weights), with the same names as nn.Linear, so a
checkpoint moves between fp8 and bf16/fp32 runs unchanged. Under FSDP with a shard group
above one, tensorwise weights are all-gathered in float8 (`enable_fsdp_float8_all_gather`);
their scales are then computed together in one all-reduce after each optimizer step
(`precompute_scales`, which torchao provides for this).

torchao is imported only when a run asks for fp8 (`torchao_float8`), so the rest of the
package does not need it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import replace
from types import ModuleType

from torch import nn

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.parallel.topology import Topology
from scaleforge.torch_compat import torch_release

FP8_RECIPES = ("none", "tensorwise", "rowwise")
# torch._scaled_mm's float8 GEMM takes matrices whose dimensions are multiples of 16.
FP8_DIM_MULTIPLE = 16
INSTALL_HINT = "pip install torchao==0.18.0 (it is in the dev extra: pip install -e '.[dev]')"


def torchao_float8() -> ModuleType:
    """torchao.float8, imported now; ConfigError naming trainer.fp8 when torchao is missing.

    torchao logs a warning for each of its CUDA extensions a CPU-only torch cannot load;
    those are not errors for float8 training (which runs on torch._scaled_mm), so they are
    silenced during the import."""
    library_logger = logging.getLogger("torchao")
    level = library_logger.level
    library_logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module("torchao.float8")
    except ImportError as error:
        raise ConfigError(
            f"trainer.fp8 needs torchao's float8 training API, which failed to import "
            f"({error}): {INSTALL_HINT}, or set trainer.fp8=none"
        ) from error
    finally:
        library_logger.setLevel(level)


def torchao_version() -> str:
    """The installed torchao's version (for the start line)."""
    return importlib.metadata.version("torchao")


# The first torch whose CPU torch._scaled_mm takes row-wise scales (2.11's asserts per-tensor
# scales only; 2.13 checked to work; CUDA takes them on every supported version).
CPU_ROWWISE_TORCH = (2, 13)


def check_fp8(recipe: str, model: TransformerConfig, device_type: str = "cpu",
              compile_blocks: bool = False) -> None:
    """Raise ConfigError when `trainer.fp8=recipe` cannot run `model` on `device_type`:
    torchao missing, experts (MoE), whose grouped GEMM stays unconverted, rowwise on a CPU
    whose torch lacks row-wise scaled matmuls, or compiled blocks (`compile_blocks`,
    trainer.compile) on a CPU. `recipe` is a checked name.

    Compiled fp8 on a CPU: inductor's code for the blocks with torchao's casts gave a
    first-step loss 5.4e-4 (relative) off eager fp8's, 18x fp8's own difference from fp32
    over five steps, with the AVX2 kernels the tests use (llama_micro, torch 2.13; with
    AVX-512 kernels it matched to 4.6e-7, and a compiled float8 cast crashed in malloc once):
    not trusted, so refused; compiled fp8 is CUDA's (not yet run on a GPU here)."""
    if recipe == "none":
        return
    if compile_blocks and device_type == "cpu":
        raise ConfigError(
            f"trainer.compile=true with trainer.fp8={recipe} on a CPU: inductor's CPU code for "
            "torchao's float8 casts gave losses 5e-4 off eager fp8 (measured); set "
            "trainer.compile=false on a CPU (compiled fp8 is for CUDA)"
        )
    release = tuple(int(part) for part in torch_release().split(".")[:2])
    if recipe == "rowwise" and device_type == "cpu" and release < CPU_ROWWISE_TORCH:
        raise ConfigError(
            f"trainer.fp8=rowwise on a CPU needs torch >= 2.13 (torch {torch_release()}'s CPU "
            "scaled matmul takes per-tensor scales only); use trainer.fp8=tensorwise or CUDA"
        )
    if any(model.moe.is_moe_layer(layer) for layer in range(model.n_layers)):
        raise ConfigError(
            f"trainer.fp8={recipe} with model {model.name}'s experts (model.moe): the experts' "
            "grouped GEMM has no float8 path here; set trainer.fp8=none for MoE models"
        )
    torchao_float8()


def gathers_weights_in_float8(recipe: str, topology: Topology) -> bool:
    """Whether FSDP all-gathers float8 weights: tensorwise under a shard group above one
    (dp_shard x cp; plain replication gathers nothing)."""
    return recipe == "tensorwise" and topology.dims.dp_shard * topology.dims.cp > 1


def _is_fp8_linear(module: nn.Module, name: str, tp: int) -> bool:
    """Whether the layer `name` is converted: a plain nn.Linear of a block whose
    dimensions, split over `tp` ranks, are multiples of FP8_DIM_MULTIPLE. A subclass (LoRA's
    LoRALinear, models/lora.py) has a forward of its own that Float8Linear would drop, so it
    stays in high precision."""
    if not (type(module) is nn.Linear and name.startswith("layers.")):
        return False
    dims = (module.in_features, module.out_features)
    return all(dim % (FP8_DIM_MULTIPLE * tp) == 0 for dim in dims)


def apply_float8(model: nn.Module, recipe: str, tp: int = 1,
                 fsdp_float8_all_gather: bool = False) -> None:
    """Swap the blocks' eligible nn.Linear layers of `model` (a Transformer or a pipeline
    stage, before any parallelism) for torchao's Float8Linear with recipe `recipe`
    (tensorwise or rowwise); `tp` is the tensor-parallel size the layers will be split
    over; `fsdp_float8_all_gather` (tensorwise only) makes FSDP gather their weights in
    float8."""
    float8 = torchao_float8()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if fsdp_float8_all_gather and recipe == "tensorwise":
        config = replace(config, enable_fsdp_float8_all_gather=True)
    float8.convert_to_float8_training(
        model, config=config,
        module_filter_fn=lambda module, name: _is_fp8_linear(module, name, tp),
    )


def float8_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the Float8Linear layers, names of the linear layers and embeddings kept in
    high precision) of a converted `model`."""
    float8_linear = importlib.import_module("torchao.float8.float8_linear").Float8Linear
    converted, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, float8_linear):
            converted.append(name)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            kept.append(name)
    return converted, kept


def _by_kind(names: list[str]) -> str:
    """Layer names with the block index taken out: 'attention.wq x4, output x1'."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        if "layers" in parts:  # a block's layer: its name within the block
            kind = ".".join(parts[parts.index("layers") + 2:])
        else:  # around the blocks; a pipeline stage's index taken out
            kind = ".".join(parts[1:] if parts[0].isdigit() else parts)
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} x{count}" for kind, count in counts.items()) or "none"


def describe_float8(model: nn.Module, recipe: str, fsdp_float8_all_gather: bool) -> str:
    """The start line of a fp8 run: torchao's version, the recipe, the layers computing in
    float8 and those kept in high precision (by name within a block, with their counts)."""
    converted, kept = float8_layers(model)
    gather = "float8" if fsdp_float8_all_gather else "the run's precision"
    return (f"fp8: torchao {torchao_version()}, {recipe} recipe: float8 matmuls in "
            f"{len(converted)} block linears ({_by_kind(converted)}); kept in high "
            f"precision: {_by_kind(kept)}; FSDP gathers weights in {gather}")


def precompute_scales(model: nn.Module) -> None:
    """After an optimizer step under FSDP's float8 all-gather: every float8 weight's scale
    in one all-reduce (torchao's `precompute_float8_dynamic_scale_for_fsdp`)."""
    torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)
