#!/usr/bin/env bash
# The GPU measurements in one command (e.g. one call of a GPU machine):
#   bash benchmarks/gpu_session.sh OUTDIR [DATA]
# DATA: a folder holding acdc/ (pairs.csv and the volumes of patients 001-003 suffice); without
# it the bundled sample pair is timed and the training rows are skipped. PHASES (default
# speed,tests,compile,train) picks phases. Writes, each phase under its own time limit so that
# one slow phase cannot take the others' records with it:
#   OUTDIR/gpu.txt            the device and torch
#   OUTDIR/speed_cuda.json    speed table, eager: fast / balanced / paper, batch 1/4/16, the
#                             ACDC grid and the paper's 96x128x128 grid, with the floor ratio
#   OUTDIR/tests.log          the CUDA tests (device = CPU results, gradients, batches, tune)
#   OUTDIR/tests_compile.log  compiled (default and CUDA graphs) = eager on the device
#   OUTDIR/compile_cuda.json  torch.compile "reduce-overhead" (CUDA graphs), fast, 96x128x128
#   OUTDIR/training_cuda.json forward+backward / forward through the layer (checkpoint modes)
# Runs from a source checkout without installing (PYTHONPATH), so it also works where only
# torch, scipy, h5py and pytest are present. DEVICE=cpu SIZES=8x32x32 is a quick dry run of
# the script itself on a machine without a GPU.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR [DATA]}
data=${2:-}
device=${DEVICE:-cuda}
sizes=${SIZES:-acdc,paper}
batch=${BATCH:-1,4,16}
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -n "$data" ] && data=$(cd "$data" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} >"$out/gpu.txt" 2>&1
rc=0
acdc=()
[ -n "$data" ] && acdc=(--data "$data/acdc")
want() { [[ ",${PHASES:-speed,tests,compile,train}," == *",$1,"* ]]; }
if want speed; then
    timeout "${T_SPEED:-120}" python3 benchmarks/speed.py --json "$out/speed_cuda.json" \
        --device "$device" --sizes "$sizes" --presets fast,balanced,paper --batch "$batch" \
        --no-demons "${acdc[@]}" 2>&1 | tee "$out/speed.log" || rc=1
fi
if want tests; then  # the compile tests apart: a slow compilation cannot take the others' log
    tests=(python3 -m pytest -q -p no:cacheprovider -o addopts="" --tb=short -rfE)
    timeout "${T_TESTS:-120}" "${tests[@]}" -k "cuda or in_place" tests/test_cuda.py \
        tests/test_admm.py tests/test_validation.py 2>&1 | tee "$out/tests.log" || rc=1
    timeout "${T_TESTS:-120}" "${tests[@]}" -k cuda tests/test_compile.py 2>&1 \
        | tee "$out/tests_compile.log" || rc=1
fi
if want compile; then
    timeout "${T_COMPILE:-150}" python3 benchmarks/speed.py --json "$out/compile_cuda.json" \
        --device "$device" --sizes "${COMPILE_SIZES:-paper}" --presets fast --batch 1,16 \
        --compile reduce-overhead --no-demons "${acdc[@]}" 2>&1 | tee "$out/compile.log" || rc=1
fi
if want train && [ -n "$data" ]; then
    timeout "${T_TRAIN:-75}" python3 benchmarks/training.py --device "$device" --data "$data" \
        --brain "" --large "${LARGE-fast,balanced}" --rounds 3 \
        --json "$out/training_cuda.json" 2>&1 | tee "$out/training.log" || rc=1
fi
exit $rc
