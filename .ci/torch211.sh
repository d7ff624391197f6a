#!/usr/bin/env bash
# CI under the GPU machines' torch: torch 2.11.0 (PyPI's CUDA build, which runs on this CPU)
# in a second venv, and there the tests of everything that leans on torch's distributed
# internals: pipelining, DeviceMesh, DTensor and tensor parallelism, FSDP2, expert
# parallelism, the loss, the launcher, and the compat module's own checks.
#
# The venv lives in the machine's cache ($SCALEFORGE_VENV211, default
# ~/.cache/scaleforge/venv211), so a machine that keeps it skips the download (a few GB);
# .venv211 in the repository links to it, and the next CI step runs in it too:
# .venv211/bin/python is its interpreter, with this checkout installed.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
VENV=${SCALEFORGE_VENV211:-${XDG_CACHE_HOME:-$HOME/.cache}/scaleforge/venv211}
has_torch211() {
    "$VENV/bin/python" -c 'import sys, torch
sys.exit(torch.__version__.split("+")[0] != "2.11.0")' 2>/dev/null
}
if ! has_torch211; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet torch==2.11.0
fi
ln -sfn "$VENV" .venv211
# The project and its tools, with torch held at 2.11.0.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.11.0" > "$CONSTRAINTS"
.venv211/bin/python -m pip install --quiet -c "$CONSTRAINTS" -e '.[dev]'
.venv211/bin/python -c 'import torch, scaleforge.core.trainer; print("torch", torch.__version__)'
echo "torch 2.11 venv ready in $((SECONDS - start)) s"
.venv211/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_torch_compat.py tests/test_layering.py \
    tests/test_pipeline.py tests/test_expert_parallel.py tests/test_loss.py \
    tests/test_parallel_topology.py tests/test_parallel_grads.py tests/test_parallel_layouts.py \
    tests/test_gradient_accumulation.py tests/test_sharded_start.py tests/test_parallel_launch.py
echo "torch 2.11 step: $((SECONDS - start)) s"
