"""Fused kernels as torch custom operators: `import scaleforge.csrc` builds the C++ (and,
with a CUDA torch and nvcc, CUDA) library on first use (extension.py), registers
torch.ops.scaleforge.{rms_norm, rope, swiglu, linear_cross_entropy} and their backward,
fake and DTensor-sharding rules (ops.py, sharding.py), and exports the Python functions.

Raises KernelBuildError (one line: the missing compiler, ninja or nvcc) when the library
cannot be built here. README.md beside this file: the kernels, the build, the figures.
"""

from scaleforge.csrc.extension import load

load()

# The operators exist only after load().
from scaleforge.csrc import sharding  # noqa: E402, F401  (registers the DTensor rules)
from scaleforge.csrc.ops import (  # noqa: E402
    IGNORE_INDEX,
    linear_cross_entropy,
    rms_norm,
    rope,
    swiglu,
)

__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "rms_norm", "rope", "swiglu"]
