#!/usr/bin/env bash
# Everything a lent GPU machine should run for this project, in one device call
# (about 6-8 minutes): install fastvae over the image's CuPy/Numba/h5py/PyTorch,
# the gpu-marked tests, and `fastvae bench --gpu` (cupy eager on cuBLAS and on its
# own GEMM kernel, cupy CUDA graph, PyTorch eager and torch.compile on the same
# GPU). Results land in $OUT
# (the device tool's folder; bench/results/gpu_session here otherwise):
# setup.log, pytest_gpu.log, bench_gpu.log, gpu.jsonl, gpu.md. Copy gpu.* into
# bench/results and the table into the README's GPU section.
#
#   bash bench/gpu_session.sh [seconds per measurement, default 2]
set -u -o pipefail
OUT=${OUT:-bench/results/gpu_session}
SECONDS_PER=${1:-2}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/setup.log"
# the editable install maps kernels/ to fastvae.kernels: without it the CUDA source is not found
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/setup.log" 2>&1; then
    cat "$OUT/setup.log"
    echo "gpu_session: pip install -e . failed" >&2
    exit 1
fi
$PY -c "import cupy, numba, h5py, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" 2>&1 \
    | tee -a "$OUT/setup.log"
$PY -m fastvae backends 2>&1 | tee -a "$OUT/setup.log"

timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 330 $PY -m fastvae bench --gpu --seconds "$SECONDS_PER" --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log"
