#!/usr/bin/env bash
# Prepare, on a networked machine, the Python wheels that bench/gpu_check.sh installs on a GPU
# machine without network (torch 2.11 + CUDA 13, Triton, nvcc, pytest, Python 3.12 there):
# every package the project's trainer, bench/gpu_check.py and bench/collectives_check.py
# import beyond torch and its own dependencies (hydra, omegaconf and antlr4, PyYAML, numpy,
# sentencepiece, tokenizers, tqdm, packaging: `import scaleforge.core.trainer` needs them
# all), and torchtitan 0.2.2 (the newest release that imports on torch 2.11) with what its
# Llama 3 model imports when loaded as bench/torchtitan_baseline.py loads it (the model and
# parallelize modules, not the dataset and tokenizer stack of its package). gpu_check.sh
# installs only those whose distribution the machine lacks. Pure-Python wheels for any
# platform; binary ones for CPython 3.12 (GPU_PYTHON) on x86_64 Linux; antlr4-python3-runtime
# has only a source release, so it is built into a wheel here. About 27 MB together; refused
# above the 64 MiB that can travel to the GPU machine.
#
#   bench/prepare_gpu_wheels.sh [WHEEL_DIR]     # default .whl (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
PIP=${PIP:-.venv/bin/pip}
LIMIT_MIB=64
mkdir -p "$WHEELS"
GPU_PYTHON=${GPU_PYTHON:-3.12}
# Pinned to what `make install` resolves here, and to torchtitan 0.2.2's imports.
PURE_PYTHON=(
    hydra-core==1.3.8 omegaconf==2.3.1 tqdm==4.70.1 packaging==26.4
    torchtitan==0.2.2 torchdata==0.11.0 tyro==1.0.17 docstring-parser==0.18.0
)
# torchao: trainer.fp8 and torchtitan's float8 converter (gpu_check's fp8 row); its
# cp310-abi3 wheel serves CPython 3.12; 0.18.0 checked to train fp8 under torch 2.11.
BINARY=(tokenizers==0.23.3 numpy==2.4.6 PyYAML==6.0.4 sentencepiece==0.2.3 torchao==0.18.0)
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --implementation py --platform any -d "$WHEELS" "${PURE_PYTHON[@]}"
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" \
    "${BINARY[@]}"
"$PIP" wheel --quiet --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
SIZE_KIB=$(du -sk "$WHEELS" | cut -f1)
ls "$WHEELS"
echo "$WHEELS: $((SIZE_KIB / 1024)) MiB"
if [ "$SIZE_KIB" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "more than the ${LIMIT_MIB} MiB that can travel to the GPU machine" >&2
    exit 1
fi
