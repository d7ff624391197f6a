"""The launch command of a planned layout: the torchrun line and the sf-train overrides that
run exactly that layout (sf-plan prints it for the chosen layout and writes it per layout
in plan.json as `command`)."""

from __future__ import annotations

import math
import shlex

from scaleforge.core.config import Config

# Settings a layout decides; a user's own override of one of them is replaced by the
# layout's value.
LAYOUT_KEYS = (
    "parallel.tp", "parallel.pp", "parallel.dp_replicate", "parallel.dp_shard", "parallel.cp",
    "parallel.ep", "parallel.etp", "parallel.pp_schedule", "parallel.pp_stages_per_rank",
    "parallel.fsdp_reshard_after_forward", "trainer.activation_checkpointing",
    "trainer.micro_batch_size", "trainer.eval_batches", "data.seq_len",
    "trainer.global_batch_tokens",
)


def layout_overrides(planned: Config, base: Config) -> list[str]:
    """The sf-train overrides of `planned` (a layout's config): every size of the layout,
    the batch it was planned at, and the settings the planner changed from `base`."""
    p, t = planned.parallel, planned.trainer
    overrides = [f"parallel.tp={p.tp}", f"parallel.pp={p.pp}",
                 f"parallel.dp_replicate={p.dp_replicate}", f"parallel.dp_shard={p.dp_shard}"]
    if p.cp > 1:
        overrides.append(f"parallel.cp={p.cp}")
    if p.pp > 1:
        overrides += [f"parallel.pp_schedule={p.pp_schedule}",
                      f"parallel.pp_stages_per_rank={p.pp_stages_per_rank}"]
    for key, value, before in (
        ("parallel.ep", p.ep, base.parallel.ep),
        ("parallel.etp", p.etp, base.parallel.etp),
        ("parallel.fsdp_reshard_after_forward", p.fsdp_reshard_after_forward,
         base.parallel.fsdp_reshard_after_forward),
        ("trainer.eval_batches", t.eval_batches, base.trainer.eval_batches),
    ):
        if value != before:
            overrides.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    overrides += [f"trainer.activation_checkpointing={t.activation_checkpointing}",
                  f"trainer.micro_batch_size={t.micro_batch_size}",
                  f"data.seq_len={planned.data.seq_len}",
                  f"trainer.global_batch_tokens={t.global_batch_tokens}"]
    return overrides


def launch_command(user_overrides: list[str], overrides: list[str], gpus: int,
                   gpus_per_node: int) -> str:
    """The torchrun line of one node that trains with `user_overrides` (the model and data
    settings sf-plan was given) and a layout's `overrides`: one torchrun per node, meeting
    at the first node's rendezvous endpoint (HOST) when the GPUs span several nodes."""
    kept = [o for o in user_overrides if o.lstrip("+~").partition("=")[0] not in LAYOUT_KEYS]
    if gpus <= gpus_per_node:
        launcher = ["torchrun", f"--nproc-per-node={gpus}"]
    else:  # the same number of processes on every node
        per_node = math.gcd(gpus, gpus_per_node)
        launcher = ["torchrun", f"--nnodes={gpus // per_node}", f"--nproc-per-node={per_node}",
                    "--rdzv-backend=c10d", "--rdzv-endpoint=HOST:29500"]
    words = [*launcher, "-m", "scaleforge.launch.train", *kept, *overrides]
    return " ".join(shlex.quote(word) for word in words)
