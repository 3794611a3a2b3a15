#!/usr/bin/env bash
# Device checks for a lent GPU machine, in one short run (see README "Benchmarks").
# Usage (repo root, with .venv carried or built): bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make install
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect-home}" PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
.venv/bin/python benchmarks/engine.py --device cuda --size 256 --evals 50 --rounds 3
.venv/bin/python benchmarks/engine.py --device cuda --size 512 --evals 50 --rounds 3
.venv/bin/python benchmarks/batch.py --size 256 --evals 100
.venv/bin/python -m pytest -q -m "not e2e" tests/nst_core
