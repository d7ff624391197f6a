#!/usr/bin/env bash
# CI: the GPU proof rehearsed on this CPU machine, exactly as bench/gpu_check.sh runs on a GPU
# machine (wheels into their own folder, the project as links, timing, collectives, kernels,
# tests), its GPU-only parts replaced by CPU twins: under torch 2.13 (.venv) and torch 2.11
# (.venv211, made by the torch 2.11 step before this one). The wheels come from PyPI through
# bench/prepare_gpu_wheels.sh, as they would for the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/prepare_gpu_wheels.sh .whl > /dev/null
for venv in .venv .venv211; do
    if [ ! -x "$venv/bin/python" ]; then
        [ "$venv" = .venv ] && { echo "gpu_rehearse: no .venv (make install first)" >&2; exit 1; }
        echo "gpu_rehearse: SKIPPED under torch 2.11: no $venv (the torch 2.11 CI step makes it)"
        continue
    fi
    echo "gpu_rehearse: $($venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
    PYTHON=$venv/bin/python bash bench/gpu_check.sh --rehearse "build/gpu_rehearse/${venv#.}"
done
