"""trainer.compile: each block is compiled, names are unchanged and training matches eager."""

from __future__ import annotations

import pytest
import torch

from micro_runs import micro_config, synthetic_data
from scaleforge.core.trainer import Trainer


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path):
    runs = {}
    for compiled in (False, True):
        cfg = micro_config(tmp_path, f"trainer.compile={str(compiled).lower()}")
        trainer = Trainer(cfg, tmp_path / str(compiled), data=synthetic_data(cfg))
        runs[compiled] = [trainer.train_step(trainer.train_batches)[0].item() for _ in range(3)]
        if compiled:
            assert trainer.model_parts[0].layers["0"]._compiled_call_impl is not None
            assert "layers.0.attention.wq.weight" in trainer.model_parts[0].state_dict()
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-5,
                               atol=0)
