#!/usr/bin/env bash
# The GPU measurements (speed table and CUDA tests) in one command (e.g. one call of the device tool):
#   bash benchmarks/gpu_session.sh OUTDIR
# writes OUTDIR/{gpu.txt, speed_cuda.json, speed.log, tests.log}: the device, the speed table
# (fast and paper presets, batch 1/4/16, eager and torch.compile "reduce-overhead", i.e. CUDA
# graphs, with the floor ratio) and the CUDA tests. Runs from a source checkout without
# installing (PYTHONPATH), so it also works where only torch, h5py and pytest are present;
# without ../shared/data the bundled sample pair is timed. DEVICE=cpu SIZES=8x32x32 gives a
# quick dry run of the script itself on a machine without a GPU.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR}
device=${DEVICE:-cuda}
sizes=${SIZES:-acdc,paper}
batch=${BATCH:-1,4,16}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} >"$out/gpu.txt" 2>&1
rc=0
python3 benchmarks/speed.py --json "$out/speed_cuda.json" --device "$device" --sizes "$sizes" \
    --presets fast,paper --batch "$batch" --compile reduce-overhead --no-demons \
    2>&1 | tee "$out/speed.log" || rc=1
python3 -m pytest -q -p no:cacheprovider -o addopts="" -k "cuda or compile or in_place" \
    tests/test_cuda.py tests/test_compile.py tests/test_admm.py tests/test_validation.py \
    2>&1 | tee "$out/tests.log" || rc=1
exit $rc
