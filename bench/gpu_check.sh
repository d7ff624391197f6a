#!/usr/bin/env bash
# The GPU proof in one command, for a single-GPU machine without network (torch 2.11 + CUDA
# 13, Triton, nvcc, pytest there; the missing Python packages come as wheels prepared
# elsewhere by bench/prepare_gpu_wheels.sh into .whl/). Finishes within 8 minutes on one
# H200 (GPU_CHECK_LIMIT_S, default 460 s for everything after the install):
#   1. installs the project without touching the machine's torch: the wheels (--no-deps)
#      into a folder of their own, the project as a scaleforge/ tree of links to its
#      folders, both on PYTHONPATH;
#   2. runs the kernels' GPU check when the project has one (scaleforge.bench.kernels
#      --cuda-check, which builds csrc's CUDA kernels on first use);
#   3. runs the tests marked `cuda` (bf16/fp16 steps, every attention backend, FSDP over
#      NCCL at world size 1, checkpoint save and exact resume on the GPU);
#   4. times llama_1b (and a 7B shape if time is left) against torchtitan 0.3.0:
#      python -m scaleforge.bench.gpu_check (see its docstring).
# OUT_DIR gets gpu_check.json and gpu_check.md, plus the logs of steps 2 and 3.
#
#   bench/gpu_check.sh OUT_DIR     # on the GPU machine
#   bench/gpu_check.sh --dry       # anywhere with the project installed (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}

if [ "${1:-}" = "--dry" ]; then
    bash -n "$0" || exit 1
    "$PYTHON" -m scaleforge.bench.gpu_check --dry || exit 1
    if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        echo "dry: wheels to carry: $(ls "$WHEELS" | tr '\n' ' ')"
    else
        echo "dry: no wheels in $WHEELS yet (bench/prepare_gpu_wheels.sh prepares them)"
    fi
    exit 0
fi
if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_check.sh OUT_DIR | --dry" >&2
    exit 2
fi
OUT=$(realpath -m "$1")
mkdir -p "$OUT"
LIMIT=${GPU_CHECK_LIMIT_S:-460}
log() { echo "[gpu_check ${SECONDS}s] $*"; }

# 1. install
SITE=$(mktemp -d /tmp/scaleforge-site.XXXX)
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "$WHEELS"/*.whl || { log "wheel install failed"; exit 1; }
else
    log "no wheels in $WHEELS: run bench/prepare_gpu_wheels.sh where pip reaches PyPI"
fi
mkdir -p "$SITE/scaleforge"
for init in */__init__.py; do
    folder=${init%/__init__.py}
    [ "$folder" = tests ] || ln -sfn "$PWD/$folder" "$SITE/scaleforge/$folder"
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
INSTALL=$("$PYTHON" -c "import torch, scaleforge.core.trainer; print('torch', torch.__version__,
'on', torch.cuda.get_device_name(0))" 2>&1 | tail -1) || { log "import failed: $INSTALL"; exit 1; }
log "installed: $INSTALL"
START=$SECONDS

# 2. the kernels' GPU check, when the kernels exist
KERNELS="no kernels module (scaleforge.bench.kernels) in this checkout"
if "$PYTHON" -c "import importlib.util, sys
sys.exit(importlib.util.find_spec('scaleforge.bench.kernels') is None)" 2> /dev/null; then
    timeout 120 "$PYTHON" -m scaleforge.bench.kernels --cuda-check > "$OUT/kernels.log" 2>&1
    KERNELS="exit $? (kernels.log: $(tail -1 "$OUT/kernels.log"))"
fi
log "kernels: $KERNELS"

# 3. the tests marked cuda (only the files that hold them: collection imports every file)
mapfile -t CUDA_TESTS < <(grep -l "mark.cuda" tests/test_*.py)
timeout 170 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}" \
    > "$OUT/pytest_cuda.log" 2>&1
PYTEST="exit $? ($(tail -1 "$OUT/pytest_cuda.log"))"
log "pytest -m cuda: $PYTEST"

# 4. speed, in what is left of the limit
"$PYTHON" - "$OUT" "$INSTALL" "$KERNELS" "$PYTEST" <<'PY'
import json, sys
from pathlib import Path
out, install, kernels, pytest = sys.argv[1:]
steps = {"install": install, "kernels": kernels, "pytest -m cuda": pytest}
(Path(out) / "gpu_check.json").write_text(json.dumps({"steps": steps}, indent=2))
PY
BUDGET=$((LIMIT - (SECONDS - START) - 15))
log "speed runs for ${BUDGET}s"
"$PYTHON" -m scaleforge.bench.gpu_check --out "$OUT" --budget-s "$BUDGET"
log "done: $OUT/gpu_check.json, $OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
