#!/usr/bin/env bash
# `mpiexec -n N python -m megacpt.train ...`: MPI starts the ranks, mpi4py tells each its rank,
# world size and local rank, and rank 0's host becomes MASTER_ADDR
# (megacpt.parallel.context.init_distributed); NCCL (GPU) or gloo (CPU) does the rest.
#
# GPUs, one or more nodes (MPICH / Intel MPI hydra syntax; the `mpich` wheel's mpiexec):
#   HOSTS=node0,node1 NP=16 PPN=8 examples/launch_mpiexec.sh
# Open MPI equivalent of the launcher line:
#   mpirun -np 16 --map-by ppr:8:node -H node0:8,node1:8 -x MASTER_PORT -x OMP_NUM_THREADS \
#          python -m megacpt.train ...
# CPU smoke run of a tp 2 x dp 2 layout on random tokens (no GPU, no data files):
#   DEVICE=cpu MOCK=1 NP=4 examples/launch_mpiexec.sh
set -euo pipefail

NP=${NP:-8}
PPN=${PPN:-$NP}
HOSTS=${HOSTS:-localhost}
TP=${TP:-2}
PP=${PP:-1}
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

EXTRA=()
if [[ "${DEVICE:-cuda}" == cpu ]]; then
  EXTRA+=(--device cpu --distributed-backend gloo)
else
  EXTRA+=(--sequence-parallel --use-distributed-optimizer --bf16)
fi

if [[ "${MOCK:-0}" == 1 ]]; then
  MODEL_ARGS=(--model-size tiny --seq-length 64 --vocab-size 512)
  DATA_ARGS=(--mock-data --data-path 0.7 zh 0.3 en)
  TRAIN_ARGS=(--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --log-interval 5)
else
  DATA_DIR=${DATA_DIR:-data}
  MODEL_ARGS=(--model-size "${MODEL_SIZE:-1393M}" --seq-length 2048
              --tokenizer-model "${TOKENIZER:-$DATA_DIR/tokenizer.model}")
  DATA_ARGS=(--data-path 1.0 "zh=$DATA_DIR/zh_text_document"
             --valid-data-path "zh=$DATA_DIR/zh_valid_text_document")
  TRAIN_ARGS=(--micro-batch-size 2 --global-batch-size 1024 --tokens-per-param 20
              --save "${SAVE:-ckpt/zh}" --save-interval 1000 --log-dir "${LOG_DIR:-runs/zh}")
fi

exec mpiexec -n "$NP" -ppn "$PPN" -hosts "$HOSTS" \
  -genv MASTER_PORT "$MASTER_PORT" -genv OMP_NUM_THREADS "$OMP_NUM_THREADS" \
  python -m megacpt.train \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  "${EXTRA[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@"
