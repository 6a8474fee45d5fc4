#!/usr/bin/env bash
# Every GPU measurement megacpt owes, in three calls that each fit a 10-minute device run.
#
#   bash benchmarks/gpu_suite.sh kernels OUTDIR   # pytest -m gpu, kernel + attention benchmarks
#   bash benchmarks/gpu_suite.sh e2e OUTDIR       # 1393M end-to-end, all impls vs HF, profile
#   bash benchmarks/gpu_suite.sh scale OUTDIR     # micro-batch sweep, parallel-layer overhead
#
# Each stage writes its result JSON (benchmarks/common.py format) and a log to OUTDIR; copy
# the JSON into benchmarks/results/ and commit it. Liger-Kernel is optional: if a wheel lies
# in .whl/ (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux2014_x86_64 -d .whl liger-kernel) it is installed
# first, else the liger rows are skipped with a message. flash_attn is used when installed,
# else SDPA's flash/cuDNN kernels.
set -uo pipefail
stage=${1:?usage: gpu_suite.sh kernels|e2e|scale OUTDIR}
out=${2:?usage: gpu_suite.sh kernels|e2e|scale OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# megacpt.kernels lives in kernels/ (setup.py package_dir): an install maps it; where pip
# can't build offline, a link in this (throwaway) copy of the tree does the same
if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1; then
  echo "pip install -e . failed (see install.log); linking megacpt/kernels -> kernels instead"
  ln -sfn ../kernels megacpt/kernels && export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import megacpt.kernels, megacpt.model" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

run() {  # run NAME CMD...: log to OUTDIR/NAME.log, keep going on failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log" | tail -n 25
  echo "== $name: rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
}

case "$stage" in
  kernels)
    run gpu_tests $PY -m pytest tests -m gpu -q -x -p no:cacheprovider
    run rmsnorm $PY benchmarks/bench_rmsnorm.py --out "$out/rmsnorm.json"
    run swiglu $PY benchmarks/bench_swiglu.py --out "$out/swiglu.json"
    [ -f benchmarks/bench_cross_entropy.py ] && \
      run cross_entropy $PY benchmarks/bench_cross_entropy.py --out "$out/cross_entropy.json"
    [ -f benchmarks/bench_rope.py ] && \
      run rope $PY benchmarks/bench_rope.py --out "$out/rope.json"
    run attention $PY benchmarks/bench_attention.py --out "$out/attention.json"
    ;;
  e2e)
    run e2e $PY benchmarks/bench_e2e.py --model-size 1393M --micro-batch 4 --profile 3 \
        --out "$out/e2e.json"
    ;;
  scale)
    run e2e_mb $PY benchmarks/bench_e2e.py --model-size 1393M --micro-batch 2 8 \
        --impls megacpt megacpt+compile --out "$out/e2e_micro_batch.json"
    run e2e_nokernels $PY benchmarks/bench_e2e.py --model-size 1393M --micro-batch 4 \
        --impls megacpt-kernels --profile 2 --out "$out/e2e_torch_refs.json"
    run e2e_chunked_ce $PY benchmarks/bench_e2e.py --model-size 1393M --micro-batch 8 \
        --impls megacpt --cross-entropy-chunk-tokens 4096 --out "$out/e2e_chunked_ce.json"
    run overhead $PY benchmarks/bench_parallel_overhead.py --out "$out/parallel_overhead.json"
    ;;
  *) echo "unknown stage $stage (kernels | e2e | scale)"; exit 2 ;;
esac
