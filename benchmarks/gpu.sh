#!/usr/bin/env bash
# Device checks for a lent GPU machine, in two commands (GPU_SH_PART=1, 2) of under 10 minutes each
# (README "Performance", "On a GPU").
#
# Needs only an interpreter with torch, torchvision, Pillow, numpy and pytest (the lent
# nvidia-h200: python3 is Python 3.12 with torch 2.11 and torchvision 0.26, and no network) plus
# the wheels `make gpu-wheels` puts in .whl/: pydantic and its dependencies, installed into a
# temporary --target folder only when `$PYTHON -c 'import pydantic'` fails. No .venv, no
# `make install`, no prefect or boto3: everything here is nst_core.
#
# On the lent machine, from this repository's root:
#   make gpu-wheels                       # here, once: .whl/ (ignored by git, about 3 MB)
#   device tool: run(carry=[".whl"], command="GPU_SH_PART=1 PYTHON=python3 bash benchmarks/gpu.sh", timeout_s=450)
#   and at once, on the still-warm machine, the same with GPU_SH_PART=2 GPU_SH_STEP_TIMEOUT=120.
#   On an H200 (2026-12-04, cuDNN autotuning then on) part 1 took 251 s and part 2 382 s with
#   two of its steps stopped at a 110 s limit; a lease is 15 minutes, start-up included.
# With $OUT set (the device tool sets it) the whole log also lands in $OUT/gpu.log.
#
# Environment:
#   PYTHON          interpreter (python3)
#   WHEELS          folder of the wheels (.whl)
#   NST_GPU_DEVICE  device of the benchmarks and of the engine tests (cuda); "cpu" runs the
#                   whole script path on a machine without a GPU
#   GPU_SH_QUICK=1  tiny sizes, few evaluations and a few tests: proves the path on a small CPU
#   GPU_SH_STEP_TIMEOUT  seconds one benchmark may take before it is stopped and counted failed (240)
#   GPU_SH_TEST_TIMEOUT  likewise for the engine tests (300)
#   GPU_SH_PART     1: engine cost, quality.py and the engine tests; 2: the rest; all (default).
#                   A lease's 15 minutes fit the two parts as two back-to-back calls on one machine
#
# Prints: the L-BFGS direction's device operations, time and error, torch's two-loop recursion
# against the compact form nst_core uses (benchmarks/lbfgs.py); engine cost per evaluation at
# 128-512 px (fp32) and 512 px (bf16): bare VGG pass, + Grams,
# stylize (goals: Grams share <= 10%, overhead <= 3%); the default against single-scale fp32 on
# every pair of the photo set and examples/ at 256 and 512 px, with today's exact tail (0.8) and the
# earlier 2/3 against one reference run each (benchmarks/quality.py; goals: loss ratio <= 1.02 on
# every pair, geometric-mean time ratio <= 0.5); 512 px x 500 evaluations wall time for fp32, TF32, bf16
# (single scale) and the default (goal <= 5 s on an H200); the speed.py ratio (goal <= 0.5);
# channels_last vs contiguous; pairs per hour with N = 1, 2, 4 ... 32 pairs per device step and
# auto at 512 px against N = 1 (goal: >= 4x at some N; benchmarks/throughput.py); cuDNN autotuning
# on and off over six aspect ratios (benchmarks/autotune.py: keep what wins); peak CUDA memory
# of a 4096 px output untiled and tiled with a 24 GB card's budget (goal <= 20 GB;
# benchmarks/tiling.py memory); the engine tests with NST_TEST_DEVICE=$NST_GPU_DEVICE (in part 1).
# Every step runs even if one before it failed; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  exec > >(tee "$OUT/gpu.log") 2>&1
fi
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
PART="${GPU_SH_PART:-all}"
case "$PART" in
  1 | 2 | all) ;;
  *) echo "gpu.sh: GPU_SH_PART=$PART: use 1, 2 or all" >&2; exit 2 ;;
esac
WHEELS="${WHEELS:-.whl}"
DEV="${NST_GPU_DEVICE:-cuda}"
QUICK="${GPU_SH_QUICK:-0}"
GPU_SH_STEP_TIMEOUT="${GPU_SH_STEP_TIMEOUT:-240}"
GPU_SH_TEST_TIMEOUT="${GPU_SH_TEST_TIMEOUT:-300}"
START=$SECONDS

# pydantic (nst_core.params) from the carried wheels, only where the interpreter lacks it.
if ! "$PYTHON" -c 'import pydantic' 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu.sh: $PYTHON has no pydantic and $WHEELS/ holds no wheels: run 'make gpu-wheels' and carry .whl" >&2
    exit 2
  fi
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu-sh-site.XXXXXX")"
  trap 'rm -rf "$SITE"' EXIT
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$WHEELS"/*.whl || { echo "gpu.sh: installing $WHEELS/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')into $SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - "$DEV" <<'EOF' || exit 2
import sys

import pydantic
import torch
import torchvision

import nst_core

dev = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"pydantic {pydantic.VERSION}, nst_core from {nst_core.__file__}")
mods = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "boto3", "botocore"))
assert not mods, f"nst_core imported {mods}"
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit(f"gpu.sh: NST_GPU_DEVICE={dev} but torch sees no CUDA device (built for CUDA {torch.version.cuda}); "
                 "NST_GPU_DEVICE=cpu runs the script path without one")
    d = torch.device(dev)
    print(f"device {dev}: {torch.cuda.get_device_name(d)}, capability {torch.cuda.get_device_capability(d)}, "
          f"{torch.cuda.get_device_properties(d).total_memory / 2**30:.0f} GiB")
else:
    print(f"device {dev} (torch threads {torch.get_num_threads()})")
EOF

if [ "$QUICK" = 1 ]; then
  ENGINE_SIZES=(64) S2=96 EV=8 ROUNDS=2 Q_ARGS=(--sizes 64 --evaluations 12 --only chelsea:gravel) TS=64 TEV=12 FR=2 THR_NS=(1 2) THR_EV=2 TILE_SIZES=(256) TILE_GB=0.05 AT_SIZE=64 AT_EV=3
  TESTS=(tests/nst_core/test_optimize.py tests/nst_core/test_backend.py tests/tasks/test_steps.py
         -k "lbfgs_halves or tf32_off_cuda or targets_and_reported_losses or precision_follows or bf16_runs_keep or measures_a_steps_memory")
else
  ENGINE_SIZES=(128 192 256 512) S2=512 EV=48 ROUNDS=3 Q_ARGS=(--sizes 256 512 --evaluations 300 --exact-tail 0.6667 0.8) TS=512 TEV=500 FR=5 THR_NS=(1 2 4 8 16 32) THR_EV=50 TILE_SIZES=(4096) TILE_GB=19 AT_SIZE=512 AT_EV=100
  TESTS=(tests/nst_core/test_optimize.py tests/nst_core/test_losses.py tests/nst_core/test_backend.py tests/tasks/test_steps.py)
fi

FAILED=()
step() {  # step PART SECONDS NAME COMMAND...: timed, bounded, and counted; skipped outside GPU_SH_PART
  local part="$1" limit="$2" name="$3" t0=$SECONDS rc
  shift 3
  [ "$PART" = all ] || [ "$PART" = "$part" ] || return 0
  echo
  echo "== $name"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "-- $name: rc $rc, $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || FAILED+=("$name (rc $rc)")
}

step 1 "$GPU_SH_STEP_TIMEOUT" "L-BFGS direction, two-loop vs compact, ${ENGINE_SIZES[*]} px" "$PYTHON" benchmarks/lbfgs.py --device "$DEV" --sizes "${ENGINE_SIZES[@]}"
step 1 "$GPU_SH_STEP_TIMEOUT" "engine cost, ${ENGINE_SIZES[*]} px fp32" "$PYTHON" benchmarks/engine.py --device "$DEV" --sizes "${ENGINE_SIZES[@]}" --evals "$EV" --rounds "$ROUNDS"
step 1 "$GPU_SH_STEP_TIMEOUT" "engine cost, ${S2} px bf16" "$PYTHON" benchmarks/engine.py --device "$DEV" --sizes "$S2" --evals "$EV" --rounds "$ROUNDS" --precision bf16
step 1 "$GPU_SH_STEP_TIMEOUT" "default vs single-scale fp32 on real photographs, ${Q_ARGS[*]}" "$PYTHON" benchmarks/quality.py --device "$DEV" "${Q_ARGS[@]}"
step 1 "$GPU_SH_TEST_TIMEOUT" "engine tests on $DEV" env NST_TEST_DEVICE="$DEV" CUBLAS_WORKSPACE_CONFIG=:4096:8 "$PYTHON" -m pytest -q -p no:cacheprovider -ra "${TESTS[@]}"
step 2 "$GPU_SH_STEP_TIMEOUT" "wall time per precision, ${TS} px x ${TEV}" "$PYTHON" benchmarks/speed.py --device "$DEV" --table --size "$TS" --evals "$TEV"
step 2 "$GPU_SH_STEP_TIMEOUT" "default vs single-scale fp32, ${TS} px" "$PYTHON" benchmarks/speed.py --device "$DEV" --size "$TS" --evals "$TEV"
step 2 "$GPU_SH_STEP_TIMEOUT" "memory formats, ${TS} px" "$PYTHON" benchmarks/speed.py --device "$DEV" --formats --size "$TS" --rounds "$FR"
step 2 "$GPU_SH_STEP_TIMEOUT" "pairs per device step, ${TS} px x ${THR_EV}" "$PYTHON" benchmarks/throughput.py --device "$DEV" --sizes "$TS" --ns "${THR_NS[@]}" --iterations "$THR_EV"
step 2 "$GPU_SH_STEP_TIMEOUT" "cuDNN autotuning on/off, 6 aspect ratios, ${AT_SIZE} px x ${AT_EV}" "$PYTHON" benchmarks/autotune.py --device "$DEV" --size "$AT_SIZE" --iterations "$AT_EV"
# A 24 GB card's default budget is 80%: 19 GB. Untiled 4096 px runs too (it fits an H200), for the ratio.
step 2 "$GPU_SH_STEP_TIMEOUT" "tiled print size, ${TILE_SIZES[*]} px, budget ${TILE_GB} GB" "$PYTHON" benchmarks/tiling.py memory --device "$DEV" --sizes "${TILE_SIZES[@]}" --evaluations 8 --max-memory-gb "$TILE_GB"

echo
echo "gpu.sh: $((SECONDS - START)) s in all on $DEV"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps passed"
