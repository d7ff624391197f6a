#!/usr/bin/env bash
# Prepare, on a networked machine, the Python wheels that bench/gpu_check.sh installs on a GPU
# machine without network (torch 2.11 + CUDA 13, Triton, nvcc, Python 3.12 there): the
# project's dependencies that such a machine lacks and torchtitan 0.3.0 with what its Llama 3
# model imports. Pure-Python wheels only (about 3 MB together); antlr4-python3-runtime has
# only a source release, so it is built into a wheel here.
#
#   bench/prepare_gpu_wheels.sh [WHEEL_DIR]     # default .whl (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
PIP=${PIP:-.venv/bin/pip}
mkdir -p "$WHEELS"
# Pinned to what `make install` resolves here, and to torchtitan 0.3.0's needs.
PURE_PYTHON=(
    hydra-core==1.3.8 omegaconf==2.3.1
    torchtitan==0.3.0 spmd_types==0.2.3 torch_checkpointing==0.1.1 torchdata==0.11.0
    tyro==1.0.17 docstring-parser typeguard
)
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --platform any -d "$WHEELS" "${PURE_PYTHON[@]}"
"$PIP" wheel --quiet --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
du -sh "$WHEELS"
ls "$WHEELS"
