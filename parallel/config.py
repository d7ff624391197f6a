"""The layout settings (`parallel.*`) and the checks of their own fields.

How the layout fits the world size and the model (products, divisibility) is
`parallel.layout.check_layout`; the pipeline's rules are
`parallel.pipeline_schedules.validate_pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleforge.errors import ConfigError, check_choice
from scaleforge.parallel.pipeline_schedules import schedule_spec

BACKENDS = ("auto", "nccl", "gloo")
CP_IMPLS = ("allgather", "torch")


@dataclass
class ParallelConfig:
    """Process layout: tp x pp x dp_replicate x dp_shard x cp processes (= WORLD_SIZE).

    dp_shard=-1 takes the rest of the world. cp (context parallel) splits every sequence over
    cp ranks (parallel/context_parallel.py). See parallel/topology.py for the rules and the
    mesh order (pp outermost, tp innermost).
    """

    tp: int = 1  # tensor-parallel size (Megatron's column/row split)
    pp: int = 1  # pipeline-parallel stages
    dp_replicate: int = 1  # data-parallel replicas (HSDP's replicate axis)
    # FSDP shards per replica; -1 (default): the rest of the world, so torchrun with N
    # processes and no other size shards data parallel over all N (torchtitan's default).
    dp_shard: int = -1
    cp: int = 1  # context-parallel ranks each sequence is split over
    # How cp attends over the group: allgather (K/V all-gathered, any device) or torch
    # (torch's context-parallel SDPA, K/V shards passed round the ring; CUDA, causal only).
    cp_impl: str = "allgather"
    # Expert parallelism: MoE experts sharded over ep of the dp_shard x cp ranks, and
    # FSDP-sharded over the other dp_shard x cp / ep (parallel/expert_parallel.py).
    ep: int = 1  # expert-parallel size (MoE models): divides dp_shard x cp; 1: no ep
    # Expert tensor parallelism: 1 (every tp rank runs its experts whole) or tp (each
    # expert's and the shared experts' width split over the tp ranks, the MoE output
    # reduce-scattered back to sequence shards; parallel/expert_tensor_parallel.py).
    etp: int = 1  # expert tensor-parallel size: 1 or parallel.tp
    # Pipeline: schedule name and virtual stages per rank (interleaved and V schedules).
    pp_schedule: str = "1F1B"
    pp_stages_per_rank: int = 1  # virtual stages per rank
    # Layers of each of the pp x pp_stages_per_rank stages, e.g. [1, 3]; null splits evenly.
    pp_layers_per_stage: list[int] | None = None
    # auto: nccl when training on CUDA, gloo on CPU.
    backend: str = "auto"
    # Seconds a collective may wait before it fails (naming rank and group) instead of hanging.
    timeout_s: float = 600
    # FSDP: free gathered weights after forward (ZeRO-3); false keeps them (ZeRO-2-like).
    fsdp_reshard_after_forward: bool = True

    def check(self, prefix: str = "parallel") -> None:
        """Raise ConfigError (the setting, its value, the fix) for a size < 1 (other than
        dp_shard=-1), an unknown pipeline schedule, backend or cp_impl, a timeout <= 0."""
        self.check_sizes(prefix)
        schedule_spec(self.pp_schedule)
        check_choice(f"{prefix}.backend", self.backend, BACKENDS)
        check_choice(f"{prefix}.cp_impl", self.cp_impl, CP_IMPLS)
        if self.timeout_s <= 0:
            raise ConfigError(f"{prefix}.timeout_s={self.timeout_s} must be positive (seconds)")

    def check_sizes(self, prefix: str = "parallel") -> None:
        """Raise ConfigError for a size < 1 (other than dp_shard=-1)."""
        for name in ("tp", "pp", "dp_replicate", "cp", "ep", "etp", "pp_stages_per_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be at least 1")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ConfigError(
                f"{prefix}.dp_shard={self.dp_shard} must be at least 1, or -1 for the rest of "
                "the world"
            )
