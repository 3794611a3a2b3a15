#!/usr/bin/env bash
# Device checks for a lent GPU machine, in one short run (see README "Performance").
# Usage (repo root, with .venv carried or built): bash benchmarks/gpu.sh
# Prints: engine overhead at 256/512 px; 512 px x 500 evaluations wall time for fp32, TF32, bf16
# (single scale) and the default (goal <= 5 s on an H200); the speed.py ratio (goal <= 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make install
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect-home}" PREFECT_SERVER_ANALYTICS_ENABLED=false
PY=.venv/bin/python
$PY -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
$PY benchmarks/engine.py --device cuda --size 256 --evals 50 --rounds 3
$PY benchmarks/engine.py --device cuda --size 512 --evals 50 --rounds 3 --precision bf16
$PY benchmarks/speed.py --device cuda --table --size 512 --evals 500
$PY benchmarks/speed.py --device cuda --size 512 --evals 500
$PY benchmarks/speed.py --device cuda --formats --size 512 --rounds 5
$PY -m pytest -q -p no:cacheprovider tests/nst_core/test_optimize.py tests/nst_core/test_losses.py
