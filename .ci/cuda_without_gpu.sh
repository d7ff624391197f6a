#!/usr/bin/env bash
# CUDA without a GPU, in the torch 2.11 CUDA build that .ci/torch211.sh installed in
# .venv211/ (it runs on this CPU): the csrc CUDA extension (binding + kernels) built for
# sm_90 with the machine's nvcc, two ninja jobs, and loaded, each scaleforge operator with a
# CUDA kernel; one training step of every layout on fake CUDA tensors over the fake process
# group (python -m scaleforge.bench.cuda_without_gpu: one line per check, non-zero exit on
# a failure); then the tests showing each check fails on a planted bug.
# No `timeout` around the build: a build killed mid-way leaves torch's lock behind.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv211/bin/python
# torch guesses CUDA_HOME from the directory of nvcc on PATH; where that is a wrapper
# (/usr/local/bin/nvcc) the toolkit's headers are not beside it.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime_api.h ]; then
    export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
"$PY" -m scaleforge.bench.cuda_without_gpu
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_without_gpu.py
