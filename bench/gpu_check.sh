#!/usr/bin/env bash
# The GPU proof in one command, for a single-GPU machine without network (torch 2.11 + CUDA
# 13, Triton, nvcc, pytest there; the missing Python packages come as wheels prepared
# elsewhere by bench/prepare_gpu_wheels.sh into .whl/, 64 MiB at most). Made for a window of
# 15 minutes, start-up included: the whole run ends within GPU_CHECK_LIMIT_S (default 540 s,
# 9 minutes, install included), and every step writes its outcome into OUT_DIR/gpu_check.json
# as it ends, so a run cut short still returns what it measured. Steps, the point of the run
# first:
#   1. install without touching the machine's torch: the wheels (--no-deps) of what the
#      machine lacks into a folder of their own, the project as a scaleforge/ tree of links
#      to its folders, both on PYTHONPATH; then one import of the trainer;
#   2. timing: ours against torchtitan 0.2.2, same model, tokens, bf16 autocast and SDPA,
#      compiled, then the same with float8 matmuls (ours trainer.fp8=tensorwise, torchtitan's
#      float8 converter; torchao from the wheels), then each side's best and the rest (python -m scaleforge.bench.gpu_check:
#      shapes by the card's memory, 3 repeats of N steps after warm-up, median and spread);
#   3. every collective kind of a training step once over NCCL at world size 1, through the
#      project's own code (python -m scaleforge.bench.collectives_check);
#   4. the kernels: the csrc build (a build killed by the timeout leaves no lock behind:
#      csrc/extension.py clears a dead build's FileBaton lock), then their GPU check;
#   5. the tests marked `cuda` (kernel tests skip alone if the build failed).
# OUT_DIR gets gpu_check.json, gpu_check.md (the table) and the logs of every step.
#
#   bench/gpu_check.sh OUT_DIR              # on the GPU machine
#   bench/gpu_check.sh --rehearse OUT_DIR   # the same on a CPU machine (CI runs it)
#   bench/gpu_check.sh --dry                # validate the GPU runs' configs anywhere
#
# --rehearse runs every step as above, each GPU-only part replaced by its CPU twin: the
# timing on the CPU at a tiny shape (gpu_check --rehearse; torchtitan's fp8 row is skipped
# there with its reason printed: its float8 converter refuses a CPU), the collectives over gloo with
# 2 ranks (--cpu), the kernels' CPU build and a smoke run in place of the --cuda-check, and
# the same pytest command (its tests skip without a GPU: collection is what it proves). It
# exits 1 if the install, a headline timing row, the collectives or the test collection
# fail. After a run on a GPU machine: commit OUT_DIR/gpu_check.json as
# bench/gpu/<date>-<device>.json and summarise it in bench/RESULTS.md ("GPU results").
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
REHEARSE=""
if [ "${1:-}" = "--rehearse" ]; then
    REHEARSE=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_check.sh [--rehearse] OUT_DIR | --dry" >&2
    exit 2
fi
OUT=$(realpath -m "$1")
mkdir -p "$OUT"
rm -f "$OUT/gpu_check.json" "$OUT/gpu_check.md"
# The CPU twins take longer on a 2-core machine than the GPU runs on a GPU.
LIMIT=${GPU_CHECK_LIMIT_S:-$([ -n "$REHEARSE" ] && echo 1200 || echo 540)}
END=$((SECONDS + LIMIT))
left() { echo $((END - SECONDS)); }
log() { echo "[gpu_check ${SECONDS}s${REHEARSE:+ rehearsal}] $*"; }
record() { "$PYTHON" -m scaleforge.bench.gpu_report --record "$OUT" "$1" "$2" || true; }
FAILED=""

# 1. install: the wheels of the distributions this Python lacks (its own numpy or PyYAML,
# say, stay in use)
SITE=$(mktemp -d /tmp/scaleforge-site.XXXX)
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    mapfile -t MISSING < <("$PYTHON" - "$WHEELS" <<'PY'
import importlib.metadata, re, sys
from pathlib import Path
def canonical(name): return re.sub(r"[-_.]+", "-", name).lower()
have = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()
        if d.metadata["Name"]}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    if canonical(wheel.name.split("-")[0]) not in have:
        print(wheel)
PY
)
    log "wheels to install: ${#MISSING[@]} ($(basename -a "${MISSING[@]}" 2> /dev/null | tr '\n' ' '))"
    if [ "${#MISSING[@]}" -gt 0 ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE" "${MISSING[@]}" || { log "wheel install failed"; exit 1; }
    fi
else
    log "no wheels in $WHEELS: run bench/prepare_gpu_wheels.sh where pip reaches PyPI"
fi
mkdir -p "$SITE/scaleforge"
for init in */__init__.py; do
    folder=${init%/__init__.py}
    [ "$folder" = tests ] || ln -sfn "$PWD/$folder" "$SITE/scaleforge/$folder"
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
DEVICE="torch.cuda.get_device_name(0)"
[ -n "$REHEARSE" ] && DEVICE="'cpu (rehearsal)'"
INSTALL=$("$PYTHON" -c "import torch, scaleforge.core.trainer
print('torch', torch.__version__, 'on', $DEVICE)" 2>&1 | tail -1) \
    || { log "import failed: $INSTALL"; record install "failed: $INSTALL"; exit 1; }
log "installed: $INSTALL"
record install "$INSTALL"

# 2. timing first: what the window is for. The rest gets 290 s (collectives 90, kernels
# 100, tests 100) of what is left.
BUDGET=$(( $(left) - 290 ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
log "timing for up to ${BUDGET}s"
"$PYTHON" -m scaleforge.bench.gpu_check --out "$OUT" --budget-s "$BUDGET" \
    ${REHEARSE:+--rehearse} > "$OUT/timing.log" 2>&1
STATUS=$?
cat "$OUT/timing.log"
[ "$STATUS" -eq 0 ] || FAILED="$FAILED timing"
record timing "exit $STATUS (timing.log)"

# 3. collectives (the CPU twin starts two processes on a 2-core machine: it gets longer)
COLLECTIVES_S=$([ -n "$REHEARSE" ] && echo 300 || echo 90)
timeout -k 5 "$COLLECTIVES_S" "$PYTHON" -m scaleforge.bench.collectives_check \
    --out "$OUT" ${REHEARSE:+--cpu} > "$OUT/collectives.log" 2>&1
STATUS=$?
[ "$STATUS" -eq 0 ] || FAILED="$FAILED collectives"
record collectives "exit $STATUS ($(tail -1 "$OUT/collectives.log"))"
log "collectives: exit $STATUS ($(tail -1 "$OUT/collectives.log"))"

# 4. kernels: the build alone first (safe to cut: csrc/extension.py clears the lock of a
# build that died), then the check
# (Rehearsing with a CUDA build of torch, the CUDA sources join the build: without a GPU
# torch cannot pick their architecture, so it is the GPU machines' sm_90; and where nvcc on
# PATH is a wrapper the toolkit's headers are not beside it. The same settings as CI's CUDA
# build step, .ci/cuda_without_gpu.sh, so that its built library is the one loaded here.)
if [ -n "$REHEARSE" ]; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
    if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime_api.h ]; then
        export CUDA_HOME=/usr/local/cuda
    fi
fi
KERNEL_S=$(( $(left) - 100 < 100 ? $(left) - 100 : 100 ))
[ "$KERNEL_S" -lt 10 ] && KERNEL_S=10
timeout -k 5 "$KERNEL_S" "$PYTHON" -c "import scaleforge.csrc, scaleforge.csrc.extension as e
print('kernels built and loaded from', e.load())" > "$OUT/kernels.log" 2>&1
STATUS=$?
if [ "$STATUS" -eq 0 ]; then
    CHECK=(--cuda-check)
    [ -n "$REHEARSE" ] && CHECK=(--smoke --device cpu)
    timeout -k 5 $(( $(left) - 100 > 20 ? $(left) - 100 : 20 )) \
        "$PYTHON" -m scaleforge.bench.kernels "${CHECK[@]}" >> "$OUT/kernels.log" 2>&1
    STATUS=$?
fi
KERNELS="exit $STATUS ($(tail -1 "$OUT/kernels.log"))"
record kernels "$KERNELS"
log "kernels: $KERNELS"

# 5. the tests marked cuda (only the files that hold them: collection imports every file);
# the kernel tests skip, alone, when the build above failed
mapfile -t CUDA_TESTS < <(grep -l "mark.cuda" tests/test_*.py)
SCALEFORGE_KERNELS_OPTIONAL=1 timeout -k 5 $(( $(left) > 30 ? $(left) : 30 )) \
    "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}" \
    > "$OUT/pytest_cuda.log" 2>&1
STATUS=$?
[ "$STATUS" -eq 0 ] || FAILED="$FAILED pytest"
record "pytest -m cuda" "exit $STATUS ($(tail -1 "$OUT/pytest_cuda.log"))"
log "pytest -m cuda: exit $STATUS ($(tail -1 "$OUT/pytest_cuda.log"))"

log "done in ${SECONDS}s: $OUT/gpu_check.json, $OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
if [ -n "$FAILED" ]; then
    log "failed:$FAILED"
    exit 1
fi
