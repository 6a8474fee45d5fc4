#!/usr/bin/env bash
# Every GPU measurement megacpt owes, in ONE call that fits a ~8-minute device run.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [--budget-s 450] [--dry-run]
#
# Stages run most valuable first, each under its own `timeout`, while the budget lasts (a stage
# that would not get its minimum time is skipped and says so):
#   a1  e2e 1393M, seq 2048, bf16: megacpt (defaults) vs hf+liger vs hf: tokens/s, TFLOP/s,
#       MFU, peak memory, + a profile of megacpt            -> e2e.json
#   b1  RMSNorm and SwiGLU (split and fused gate-up) at the 1393M shapes (8192 tokens; hidden
#       1792 and 4096, ffn 9728) vs Liger and torch.compile, GB/s and fraction of a measured
#       copy bandwidth                                       -> rmsnorm.json, swiglu.json
#       (SwiGLU also against Liger's fused gate-up op)
#   c   pytest -m gpu (kernels, layouts, compile for the GPU) -> its log
#   d   attention backends (flash / cuDNN / SDPA / eager)     -> attention.json
#   a2  e2e with torch.compile: megacpt+compile vs hf+compile -> e2e_compile.json
#   b2  cross entropy and QKV split + rotary at 1393M shapes  -> cross_entropy.json, rope.json
# OUTDIR gets at most 8 files: the 7 JSON above (benchmarks/common.py format) and logs.tar.gz
# (every stage's log, the environment, a summary). The summary is also printed at the end.
#
# The device machine reaches no package registry: wheels it lacks (liger-kernel) go in the
# git-ignored .whl/ of this tree, which travels with the call, and are installed with
# `pip install --no-index`:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl liger-kernel
# The imports are checked before any stage runs (exit 2 naming what is missing).
#
# --dry-run: on CPU, every stage's command at the tiny size (--quick; Triton kernels under
# the interpreter), for the test suite (tests/test_gpu_suite.py), which keeps it from rotting.
set -uo pipefail
usage="usage: bash benchmarks/gpu_suite.sh OUTDIR [--budget-s SECONDS] [--dry-run]"
out=""; budget=450; dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) budget=${2:?$usage}; shift 2 ;;
    --budget-s=*) budget=${1#*=}; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1; $usage" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu_suite.sh: one OUTDIR only; $usage" >&2; exit 2; }
       out=$1; shift ;;
  esac
done
[ -n "$out" ] || { echo "$usage" >&2; exit 2; }
case "$budget" in ''|*[!0-9]*) echo "gpu_suite.sh: --budget-s must be whole seconds, got '$budget'" >&2; exit 2 ;; esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
logs=$(mktemp -d)/logs
mkdir -p "$logs"
t_start=$SECONDS
summary="$logs/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

finish() {
  $PY benchmarks/suite_summary.py "$out" 2>&1 | tee -a "$summary"
  note "gpu_suite: done in $((SECONDS - t_start)) s (budget $budget s)"
  tar czf "$out/logs.tar.gz" -C "$(dirname "$logs")" logs
}
trap finish EXIT

# ---- environment: wheels, megacpt, imports -------------------------------------------------
if [ "$dry" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/megacpt-site .whl/*.whl >"$logs/wheels.log" 2>&1 \
    && export PYTHONPATH=/tmp/megacpt-site${PYTHONPATH:+:$PYTHONPATH} \
    || note "wheel install failed (see wheels.log)"
fi
if [ "$dry" = 0 ] && ! $PY -c "import megacpt.kernels" >/dev/null 2>&1; then
  # megacpt.kernels lives in kernels/ (setup.py package_dir): an install maps it; where pip
  # can't build offline, a link in this (throwaway) copy of the tree does the same
  if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$logs/install.log" 2>&1; then
    note "pip install -e . failed (see install.log); linking megacpt/kernels -> kernels"
    ln -sfn ../kernels megacpt/kernels && export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
if [ "$dry" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
$PY - <<'EOF' 2>&1 | tee "$logs/env.txt"
import importlib, platform, sys
need = ["torch", "triton", "transformers", "megacpt.kernels", "megacpt.model", "tqdm"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
import torch
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for opt in ("liger_kernel", "flash_attn"):
    try:
        importlib.import_module(opt)
        print(opt, "ok")
    except Exception as exc:  # noqa: BLE001
        print(f"{opt} unavailable ({type(exc).__name__}): its rows are recorded as errors")
if missing:
    print("gpu_suite: missing required imports: " + "; ".join(missing))
    sys.exit(2)
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { note "gpu_suite: import check failed (see above)"; exit 2; }
if [ "$dry" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$logs/env.txt" 2>&1
fi

# ---- stages ---------------------------------------------------------------------------------
stage() {  # stage NAME MIN_S MAX_S CMD...: run under timeout if the budget has MIN_S left
  local name=$1 min=$2 max=$3; shift 3
  local left=$((budget - (SECONDS - t_start) - 5))
  if [ "$left" -lt "$min" ]; then
    note "== $name: skipped (${left} s of budget left, needs ${min} s)"
    return
  fi
  local lim=$(( left < max ? left : max )) t0=$SECONDS
  note "== $name (limit ${lim} s): $*"
  timeout --signal=TERM --kill-after=10 "$lim" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  tail -n 8 "$logs/$name.log"
  note "== $name: rc $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (timed out)')"
}

if [ "$dry" = 1 ]; then
  Q="--quick"; E2E=(--quick --no-cpu-memory); PYTEST_PATHS=(tests/parallel/test_parallel_gpu.py)
  RMS=(--hidden 96); SWI=(--ops swiglu_fused); CE=(); ROPE=()
  # inductor builds take minutes on CPU: the dry run checks the stage's plumbing with
  # torch.compile turned into a no-op (its rows then time eager code)
  COMPILE_LIMIT=60; NOCOMPILE=TORCHDYNAMO_DISABLE=1
else
  Q=""; E2E=(--model-size 1393M --seq-length 2048 --micro-batch 4 --accum 4 --steps 3
             --warmup 2 --reps 1)
  PYTEST_PATHS=(tests)
  RMS=(--rows 8192 --hidden 1792 4096 --impls megacpt torch compile liger)
  SWI=(--rows 8192 --ffn 9728 --impls megacpt torch compile liger)
  CE=(--rows 8192)
  ROPE=(--sizes 1393M)
  COMPILE_LIMIT=150; NOCOMPILE=MEGACPT_SUITE=1
fi

stage a1_e2e 120 200 $PY benchmarks/bench_e2e.py "${E2E[@]}" --impls megacpt hf+liger hf \
  --profile 2 --time-limit-s 90 --trace-dir "$logs" --out "$out/e2e.json"
stage b1_rmsnorm 20 60 $PY benchmarks/bench_rmsnorm.py $Q "${RMS[@]}" --out "$out/rmsnorm.json"
stage b1_swiglu 20 60 $PY benchmarks/bench_swiglu.py $Q "${SWI[@]}" --out "$out/swiglu.json"
stage c_pytest_gpu 30 120 $PY -m pytest "${PYTEST_PATHS[@]}" -m gpu -q -x -p no:cacheprovider
stage d_attention 20 45 $PY benchmarks/bench_attention.py $Q --out "$out/attention.json"
stage a2_e2e_compile 90 180 env $NOCOMPILE $PY benchmarks/bench_e2e.py "${E2E[@]}" \
  --impls megacpt+compile hf+compile --time-limit-s "$COMPILE_LIMIT" --out "$out/e2e_compile.json"
stage b2_cross_entropy 20 45 $PY benchmarks/bench_cross_entropy.py $Q "${CE[@]}" \
  --out "$out/cross_entropy.json"
stage b2_rope 20 45 $PY benchmarks/bench_rope.py $Q "${ROPE[@]}" --out "$out/rope.json"
