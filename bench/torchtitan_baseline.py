"""torchtitan 0.3.0's Llama 3 as a timing baseline, driven directly (its trainer's configs
name tokenizer and dataset assets that a bench machine does not have).

`torchtitan_step(flavor, batch, compile_blocks, device)` builds the flavor's model ("1B" is
our llama_1b: 1,235,814,400 parameters, the same shape) on the meta device, applies
torchtitan's own `parallelize_llama` on a one-rank mesh (no TP, per-block compile when
asked, FSDP2 at degree 1 for its bf16 mixed-precision policy), materialises it with
torchtitan's initialisation and returns a training step over one fixed batch: forward with
positions 0..T-1 in every row and the flex causal mask torchtitan builds from them, fp32
cross-entropy, backward, global-norm clipping, fused AdamW. Needs an initialised process
group (gloo on CPU, NCCL on CUDA) and torchtitan's dependencies (bench/prepare_gpu_wheels.sh).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

TORCHTITAN_VERSION = "0.3.0"
# Ours -> torchtitan: llama_1b is torchtitan's "1B", llama_7b has no torchtitan flavour.
FLAVOURS = {"llama_1b": "1B"}


def torchtitan_model_config(flavor: str, seq_len: int) -> Any:
    """torchtitan's Llama 3 config `flavor` with flex attention, RoPE cache sized to
    `seq_len`."""
    import dataclasses

    from torchtitan.models.llama3 import llama3_configs

    config = llama3_configs[flavor](attn_backend="flex")
    for layer in config.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=seq_len)
    return config


def build_torchtitan_model(flavor: str, seq_len: int, compile_blocks: bool,
                           device: torch.device) -> torch.nn.Module:
    """torchtitan's model parallelised by its `parallelize_llama` on a one-rank mesh and
    initialised on `device`."""
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3 import parallelize_llama

    config = torchtitan_model_config(flavor, seq_len)
    with torch.device("meta"):
        model = config.build()
    parallelism = ParallelismConfig()
    dims = ParallelDims.from_config(parallelism, world_size=1)
    parallelize_llama(
        model, parallel_dims=dims, training=TrainingConfig(seq_len=seq_len),
        parallelism=parallelism,
        compile_config=CompileConfig(enable=compile_blocks, components=["model"]),
        ac_config=None, dump_folder=tempfile.mkdtemp(prefix="torchtitan-"),
    )
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=device)
    model.train()
    return model


def torchtitan_step(flavor: str, batch: tuple[torch.Tensor, torch.Tensor], compile_blocks: bool,
                    device: torch.device, lr: float = 3e-4, grad_clip: float = 1.0
                    ) -> Callable[[], None]:
    """One torchtitan training step on `batch` (inputs, targets), each (B, T) on `device`."""
    inputs, targets = batch
    model: Any = build_torchtitan_model(flavor, inputs.size(1), compile_blocks, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=device.type == "cuda" or None)
    positions = torch.arange(inputs.size(1), device=device).expand_as(inputs)
    masks = model.get_attention_masks(positions=positions)

    def step() -> None:
        logits = model(inputs, positions=positions, attention_masks=masks)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
