#!/usr/bin/env bash
# CI: the slow tests (`pytest -m slow`: 4-process layouts, resharded checkpoints, torchrun
# restarts), after `make lint typecheck test` installed the venv. The 20 slowest are listed.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q -m slow --durations=20
