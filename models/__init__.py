"""Decoder-only transformers as plain single-device PyTorch modules.

`build(cfg, device)` returns an initialised `Transformer`; `num_params(cfg)` counts its
parameters from the config alone; `count_parameters(model)` counts a built one;
`uses_fused(cfg.kernels, device_type)` says whether the fused kernels run (models/kernels.py).
"""

from scaleforge.models.build import build
from scaleforge.models.config import TransformerConfig, as_transformer_config
from scaleforge.models.kernels import uses_fused
from scaleforge.models.param_count import count_parameters, num_params
from scaleforge.models.transformer import Transformer

__all__ = [
    "Transformer",
    "TransformerConfig",
    "as_transformer_config",
    "build",
    "count_parameters",
    "num_params",
    "uses_fused",
]
