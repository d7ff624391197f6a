"""Communication buffers and weight copies: memory besides parameters, gradients, optimizer
state and activations, as FSDP2 and autocast allocate it in the trainer.

With data parallelism (FSDP2, parallel/data_parallel.py):
- gathered weights, in the compute dtype (bf16 under the bf16 policy, fp32 in fp32): with
  `fsdp_reshard_after_forward` and dp_shard > 1, the block running plus the one prefetched
  (2 blocks) and the root unit (embeddings, final norm, head), which is never resharded
  after forward; all of the rank's weights otherwise (dp_shard 1, resharding off, or a
  pipeline: torch's stages keep weights gathered from the first backward to the step's
  end, `set_reshard_after_backward(False)`);
- gradients before their reduce-scatter: with several micro-batches per step the trainer
  and the pipeline turn gradient sync off until the last one, so FSDP accumulates every
  weight's unsharded gradient in fp32 (the reduce dtype); with one micro-batch, one
  block's at a time.
Without data parallelism and with bf16 autocast, autocast's bf16 copy of every weight,
kept for backward (2 bytes per parameter).

With `trainer.fp8` (parallel/float8.py): torchao's Float8Linear casts its fp32 weight to
float8 itself, per matmul (a transient 1-byte copy, freed after it), so autocast keeps no
bf16 copy of the converted weights; under tensorwise with an FSDP shard group above one
(dp_shard x cp), FSDP gathers those weights in float8, 1 byte each in place of the compute
dtype's (their scales: one fp32 number per weight, left out). torchao saves the matmul's
high-precision input for backward, as nn.Linear does, not a float8 copy: the activations
are fp8's as without it (measured, tests/test_plan.py).
"""

from __future__ import annotations

from scaleforge.planner.shards import GatheredElements


def buffer_bytes(
    gathered: GatheredElements,
    precision: str,
    dp_shard: int,
    dp_size: int,
    pp: int,
    micro_batches: int,
    reshard_after_forward: bool,
    fp8: str = "none",
    float8_fraction: float = 0.0,
) -> float:
    """Bytes of FSDP's gathered weights and unsharded gradients (or autocast's weight
    copies without data parallelism) on a rank whose FSDP units hold `gathered`; `fp8` is
    trainer.fp8 and `float8_fraction` the share of the rank's elements that it converts
    (`step_time.float8_gathered_fraction`: every block's projection weights)."""
    compute = 4 if precision == "fp32" else 2
    converted = gathered.total * float8_fraction if fp8 != "none" else 0.0
    if dp_size == 1:
        return 2.0 * (gathered.total - converted) if precision != "fp32" else 0.0
    keeps_all = pp > 1 or dp_shard == 1 or not reshard_after_forward
    weights = gathered.total if keeps_all else 2 * gathered.block + gathered.ends
    gradients = gathered.total if micro_batches > 1 else gathered.block
    in_float8 = 0.0
    if fp8 == "tensorwise" and dp_shard > 1 and gathered.total > gathered.ends:
        # the converted share of the gathered blocks (the ends hold none)
        in_float8 = (weights - gathered.ends) * converted / (gathered.total - gathered.ends)
    return float(compute * (weights - in_float8) + in_float8 + 4 * gradients)
