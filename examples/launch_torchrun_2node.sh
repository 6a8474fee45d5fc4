#!/usr/bin/env bash
# Two-node torchrun launch of `python -m megacpt.train` (env:// rendezvous).
#
# Run the SAME command on both nodes, changing only NODE_RANK:
#   node 0:  MASTER_ADDR=node0.example NODE_RANK=0 examples/launch_torchrun_2node.sh
#   node 1:  MASTER_ADDR=node0.example NODE_RANK=1 examples/launch_torchrun_2node.sh
# MASTER_ADDR must be node 0's address as node 1 sees it; MASTER_PORT must be open between them.
#
# Default layout for 2 x 8 GPUs = 16 ranks: tensor parallel 2 (inside a node: tp ranks are
# adjacent global ranks, so a tp group never crosses the node boundary), pipeline 2, data
# parallel 16 / (2 x 2) = 4, with sequence parallelism and the ZeRO-1 distributed optimizer.
# See README.md ("Communication volume per step", `python -m megacpt.parallel.volume`) for the
# bytes each axis moves per token before choosing another one.
#
# Smoke-test the launch itself (tiny model, random tokens, no data files): MOCK=1.
# Single node: NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=8.
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to the hostname or IP of node 0}"
: "${NODE_RANK:?set NODE_RANK (0 on the first node, 1 on the second)}"
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-2}
PP=${PP:-2}
# NCCL picks the fastest interface itself; pin one when nodes have several (e.g. ib0, eth0).
# export NCCL_SOCKET_IFNAME=ib0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [[ "${MOCK:-0}" == 1 ]]; then
  MODEL_ARGS=(--model-size debug-m --seq-length 256 --vocab-size 1024)
  DATA_ARGS=(--mock-data --data-path 0.7 zh 0.3 en)
  TRAIN_ARGS=(--micro-batch-size 2 --global-batch-size 64 --train-iters 20 --log-interval 5)
else
  DATA_DIR=${DATA_DIR:-data}
  MODEL_ARGS=(--model-size "${MODEL_SIZE:-1393M}" --seq-length 2048 --bf16
              --tokenizer-model "${TOKENIZER:-$DATA_DIR/tokenizer.model}")
  # continual pre-training from an English model with 30% English replay (the paper's CPT)
  DATA_ARGS=(--init-from "${INIT_FROM:-ckpt/en}"
             --data-path 0.7 "zh=$DATA_DIR/zh_text_document" 0.3 "en=$DATA_DIR/en_text_document"
             --valid-data-path "zh=$DATA_DIR/zh_valid_text_document"
             "en=$DATA_DIR/en_valid_text_document")
  TRAIN_ARGS=(--micro-batch-size 2 --global-batch-size 1024 --tokens-per-param 20
              --save "${SAVE:-ckpt/zh_cpt}" --save-interval 1000
              --log-dir "${LOG_DIR:-runs/zh_cpt}")
fi

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megacpt.train \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --sequence-parallel --use-distributed-optimizer \
  "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@"
