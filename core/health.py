"""Step health: what the trainer does when a step's loss or gradient is not finite, and a
loss-spike detector that only reports.

Every step the trainer reduces one small tensor over the world (`agree_on_step`): this
replica's loss, whether it is finite, and whether this process received a preemption
signal. Its result is identical on every rank, so every decision taken from it (skip the
update, stop, log a spike, stop for preemption) is taken at the same step by all ranks and
no rank is left waiting in a collective.

Host syncs: reading that result (`read_on_host`) is the only device-to-host read of a
training step, and the step's only wait for the device. Everything else the step computes
(losses, the grad norm, the clip coefficient, the optimizer update) stays queued on the
device; the loss and grad norm reach the host only on the steps that log them.
tests/test_host_syncs.py counts the reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scaleforge.core.config import TrainerConfig
from scaleforge.errors import TrainingDivergedError
from scaleforge.parallel.collectives import sum_over_world
from scaleforge.parallel.topology import Topology

# Weight of the newest loss in the spike detector's moving mean and variance: an EMA over
# about the last 100 steps (1 / (1 - 0.99)).
SPIKE_EMA_DECAY = 0.99


@dataclass(frozen=True)
class StepSignals:
    """The world's view of one step, equal on every rank.

    mean_loss: the loss averaged over data-parallel replicas (NaN if any was not finite).
    loss_finite: every replica's loss was finite.
    grad_norm_finite: the global gradient norm (already equal on every rank) was finite.
    preemption_requested: some rank received a preemption signal.
    """

    mean_loss: float
    loss_finite: bool
    grad_norm_finite: bool
    preemption_requested: bool


def read_on_host(values: torch.Tensor) -> list[float]:
    """The entries of the 1-D tensor `values` as Python floats: the training step's one
    device-to-host read (it waits for the device to finish the step's queued work). Every
    per-step decision on the host is taken from what passes here."""
    return values.tolist()


def agree_on_step(
    topology: Topology, loss: torch.Tensor, grad_norm: torch.Tensor, preemption_requested: bool
) -> StepSignals:
    """Reduce this rank's step outcome over the world: one all-reduce (SUM) of 3 floats,
    then the step's one device-to-host read (`read_on_host`), also in a single process.

    `loss` is this replica's mean loss (a scalar tensor, equal on the tp and pp ranks of a
    replica), `grad_norm` the global norm from `parallel.grad_clip.clip_grad_norm`. The sum
    of 0/1 flags is non-zero when any rank raised one, which is what a MAX would say; a sum
    also carries the loss, which the spike detector reads every step.
    """
    loss = loss.detach().float().reshape(())
    # Filled on the device: torch.tensor(flag, device=...) would copy from the host, which
    # on CUDA waits for the stream.
    preempted_flag = torch.full((), float(preemption_requested), device=loss.device)
    local = torch.stack([loss, (~torch.isfinite(loss)).float(), preempted_flag])
    total = sum_over_world(topology, local)
    # clip_grad_norm returns a CPU zero when no parameter has a gradient.
    norm = grad_norm.detach().float().reshape(1).to(total.device)
    loss_sum, nonfinite_losses, preempted, norm_value = read_on_host(torch.cat([total, norm]))
    return StepSignals(
        mean_loss=loss_sum / topology.world_size,
        loss_finite=nonfinite_losses == 0,
        grad_norm_finite=math.isfinite(norm_value),
        preemption_requested=preempted > 0,
    )


class NonFiniteGuard:
    """Decides what a step with a non-finite loss or gradient norm does.

    trainer.on_nonfinite=skip: the step's update is dropped (the caller discards the
    gradients; weights and optimizer state stay as they were) and the step still counts;
    `trainer.max_skipped_steps` consecutive skips raise TrainingDivergedError.
    trainer.on_nonfinite=stop: the first such step raises TrainingDivergedError.
    """

    def __init__(self, cfg: TrainerConfig, lr: float, grad_clip: float):
        self.on_nonfinite = cfg.on_nonfinite
        self.max_skipped_steps = cfg.max_skipped_steps
        self.precision = cfg.precision
        self.lr = lr
        self.grad_clip = grad_clip
        self.consecutive_skips = 0

    def check(self, step: int, signals: StepSignals, scaler_active: bool) -> str | None:
        """The name of the non-finite value ("loss" or "grad norm") when step `step` (1-based,
        as logged) must skip its update, None when it may apply it; raises
        TrainingDivergedError when the run must stop.

        With fp16 loss scaling (`scaler_active`) infinite gradients are the scaler's
        business (it skips the update and lowers the scale): only the loss counts then.
        """
        if not signals.loss_finite:
            value = "loss"
        elif not signals.grad_norm_finite and not scaler_active:
            value = "grad norm"
        else:
            self.consecutive_skips = 0
            return None
        if self.on_nonfinite == "stop":
            raise TrainingDivergedError(
                f"step {step}: the {value} is not finite (trainer.on_nonfinite=stop); "
                f"nothing was saved. {self._fixes()}"
            )
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_skipped_steps:
            raise TrainingDivergedError(
                f"step {step}: the {value} is not finite for the {self.consecutive_skips}th "
                f"step in a row (trainer.max_skipped_steps={self.max_skipped_steps}); "
                f"stopping. {self._fixes()}"
            )
        return value

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The count of skips in a row (checkpointed, so a resume keeps counting)."""
        return {"consecutive_skips": torch.tensor(self.consecutive_skips, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.consecutive_skips = int(state["consecutive_skips"])

    def _fixes(self) -> str:
        fixes = [f"lower optim.lr (now {self.lr:g})"]
        if self.grad_clip <= 0:
            fixes.append("enable clipping with optim.grad_clip=1.0 (now off)")
        if self.precision == "fp16":
            fixes.append("train in trainer.precision=bf16 instead of fp16")
        fixes.append("or resume from an earlier checkpoint with other data order or seed")
        return "To fix: " + ", ".join(fixes)


class LossSpikeDetector:
    """Flags a loss above mean + `zscore` x std of an exponential moving average of earlier
    losses (decay SPIKE_EMA_DECAY, variance bias-corrected), once `warmup_steps` finite
    losses have been seen.

    Reports only; training is unchanged. `zscore` = 0 disables it. Non-finite losses are
    ignored (NonFiniteGuard handles them). A flagged loss still enters the averages, so a
    lasting jump in the loss level stops being flagged after a while.
    """

    def __init__(self, zscore: float, warmup_steps: int, decay: float = SPIKE_EMA_DECAY):
        self.zscore = zscore
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.seen = 0
        self.mean = 0.0
        self.variance = 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running statistics (checkpointed, so a resumed run flags the same steps)."""
        return {
            "seen": torch.tensor(self.seen, dtype=torch.int64),
            "mean": torch.tensor(self.mean, dtype=torch.float64),
            "variance": torch.tensor(self.variance, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.seen = int(state["seen"])
        self.mean, self.variance = float(state["mean"]), float(state["variance"])

    def update(self, loss: float) -> bool:
        """Feed one step's loss; True when it is a spike."""
        if self.zscore == 0 or not math.isfinite(loss):
            return False
        if self.seen == 0:
            self.mean, self.variance, self.seen = loss, 0.0, 1
            return False
        deviation = loss - self.mean
        # The variance starts at 0; dividing by 1 - decay^updates removes that bias (as
        # Adam does for its moments), so short warm-ups do not under-estimate the spread.
        variance = self.variance / (1.0 - self.decay ** (self.seen - 1)) if self.seen > 1 else 0
        threshold = self.zscore * math.sqrt(variance)
        spike = self.seen >= self.warmup_steps and deviation > threshold
        # West's incremental EMA of mean and variance.
        weight = 1.0 - self.decay
        self.mean += weight * deviation
        self.variance = (1.0 - weight) * (self.variance + weight * deviation * deviation)
        self.seen += 1
        return spike
