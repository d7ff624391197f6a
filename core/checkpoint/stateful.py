"""The parts of a run the checkpointer saves besides the model and optimizer, as `Stateful`
objects (`state_dict()` / `load_state_dict()`, torch.distributed.checkpoint's protocol).

The data loader, the non-finite guard and the loss-spike detector are Stateful themselves;
the generators' state and the fp16 loss scale get the small wrappers below, whose state
dicts hold tensors only (a checkpoint holds no pickled objects).
"""

from __future__ import annotations

import torch


class RNGState:
    """torch's random generators of this process: the CPU one and, on CUDA, `device`'s."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"cpu": state} and, on CUDA, {"cuda": state}: uint8 tensors."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the generators to a state_dict(); the next draws are the ones that followed."""
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


class LossScaleState:
    """The dynamic part of an fp16 GradScaler: its loss scale and growth tracker (the
    factors and interval come from the code, not the checkpoint)."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"scale": float32 scalar, "growth_tracker": int64 scalar (steps since the last
        change of the scale)}."""
        return {
            "scale": torch.tensor(float(self.scaler.get_scale()), dtype=torch.float32),
            "growth_tracker": torch.tensor(
                self.scaler.state_dict()["_growth_tracker"], dtype=torch.int64
            ),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue with the saved scale and growth tracker."""
        self.scaler.load_state_dict(
            {
                **self.scaler.state_dict(),
                "scale": float(state["scale"]),
                "_growth_tracker": int(state["growth_tracker"]),
            }
        )
