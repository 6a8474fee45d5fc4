#!/usr/bin/env bash
# Continual pre-training of Llama-3.2-1B into a new language with replay of English, from the
# HuggingFace checkpoint and web corpora as they come (FineWeb-style parquet, Dolma /
# RedPajama-style .jsonl.zst). Edit the variables below (or set them in the environment) and
# run it on every node; it is a recipe, not run in CI.
#
#   0. extend      (only with NEW_TOKENS > 0) add NEW_TOKENS target-language tokens to the
#                  byte-level BPE tokenizer.json as merges after Llama 3's (existing ids
#                  unchanged), new embedding rows the mean of their source split; the
#                  extended checkpoint and tokenizer replace HF_MODEL in the steps below
#   1. preprocess  target-language and English corpora with the model's own tokenizer
#                  (tokenizer.json, --tokenizer-type HuggingFaceTokenizer) into indexed
#                  binaries, plus held-out validation sets
#   2. cpt         --init-from the HF directory: the architecture (16 layers, hidden 2048,
#                  GQA 32/8, head dim 64, vocab 128256, tied embeddings, RoPE theta 500000
#                  with llama3 scaling, RMSNorm eps 1e-5) comes from its config.json, no
#                  shape flags; 75% target language, 25% English replay
#   3. export      the CPT model as a HuggingFace LlamaForCausalLM directory (tied, llama3
#                  rope_scaling kept) with its tokenizer.json / tokenizer_config.json, so
#                  transformers' AutoTokenizer and vLLM load it as is
#
# Recipe: seq 4096, bf16, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, cosine LR from
# 1e-4 to 1e-5 with 1% re-warm-up (fresh optimizer: CPT), 2M-token batches (512 x 4096),
# TRAIN_TOKENS tokens (default 20B, ~16 tokens per parameter), validation on ~2M held-out tokens
# per language. 1.24B parameters fit one 80 GB GPU with ZeRO-1 over dp; TP/PP for more speed.
# `python -m megacpt.parallel.volume --model-size Llama-3.2-1B` prints the communication per
# layout; `--model-size Llama-3.2-1B` gives the same shape without a checkpoint (scratch).
#
#   STEPS="preprocess cpt export" examples/cpt_llama3.2_1b.sh          # all (default)
#   NEW_TOKENS=8192 STEPS="extend preprocess cpt export" examples/cpt_llama3.2_1b.sh
#   STEPS="cpt" NNODES=4 NODE_RANK=$R MASTER_ADDR=node0 examples/cpt_llama3.2_1b.sh
#   DRY_RUN=1 examples/cpt_llama3.2_1b.sh                               # print commands
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HF_MODEL=${HF_MODEL:-/models/Llama-3.2-1B}     # huggingface-cli download meta-llama/Llama-3.2-1B
LANG_NAME=${LANG_NAME:-sw}                     # the new language's dataset name
# ----- inputs: files, globs or directories of .parquet / .jsonl[.gz|.zst] / .txt -----
NEW_TRAIN=${NEW_TRAIN:-/data/culturax/sw/*.parquet}        # column "text"
NEW_VALID=${NEW_VALID:-/data/sw_valid.jsonl.zst}
EN_TRAIN=${EN_TRAIN:-/data/fineweb/sample/10BT/*.parquet}  # replay data
EN_VALID=${EN_VALID:-/data/en_valid.jsonl}
REPLAY=${REPLAY:-0.25}                         # share of English in the training blend
NEW_TOKENS=${NEW_TOKENS:-0}                    # > 0: extend the vocabulary first (step extend)
EXTEND_CORPUS=${EXTEND_CORPUS:-/data/sw_sample.jsonl}  # a target-language sample (read in memory)
TRAIN_TOKENS=${TRAIN_TOKENS:-20000000000}
WORK=${WORK:-runs/cpt_llama3.2_1b_$LANG_NAME}
STEPS=${STEPS:-preprocess cpt export}
# ----- cluster -----
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}
PP=${PP:-1}                                    # pp > 1: the tied embedding is kept in sync
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}              # x 4096 tokens = 2M-token batches
WORKERS=${WORKERS:-32}
EXTRA=(${EXTRA:-})                             # e.g. --wandb-project cpt --recompute-activations
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

DATA=$WORK/data
CKPT=$WORK/checkpoints/cpt_replay$REPLAY

SOURCE=$HF_MODEL                               # the model and tokenizer the run starts from
if (( NEW_TOKENS > 0 )); then SOURCE=$WORK/extended; fi

run() {  # print, then run unless DRY_RUN=1
  echo "+ $*"
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

if has_step extend && (( NEW_TOKENS > 0 )); then
  run python "$REPO/tools/extend_vocab.py" --from-hf "$HF_MODEL" --tokenizer-model "$HF_MODEL" \
    --corpus "$EXTEND_CORPUS" --json-keys text --new-pieces "$NEW_TOKENS" --save-dir "$SOURCE"
fi

if has_step preprocess; then
  for pair in "${LANG_NAME}_train:$NEW_TRAIN" "en_train:$EN_TRAIN" \
              "${LANG_NAME}_valid:$NEW_VALID" "en_valid:$EN_VALID"; do
    # the glob is expanded by preprocess_data.py (sorted), so quote it
    run python "$REPO/tools/preprocess_data.py" --input "${pair#*:}" --json-keys text \
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$SOURCE" \
      --output-prefix "$DATA/${pair%%:*}" --append-eod --workers "$WORKERS"
  done
fi

if has_step cpt; then
  NEW_SHARE=$(python -c "print(1 - $REPLAY)")
  TRAIN=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
         --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m megacpt.train
         --init-from "$SOURCE"
         --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$SOURCE"
         --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
         --use-distributed-optimizer --bf16 --seq-length 4096
         --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
         --train-tokens "$TRAIN_TOKENS" --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine
         --lr-warmup-fraction 0.01 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
         --clip-grad 1.0 --split 1,0,0 --eval-interval 500 --eval-iters 64
         --cross-entropy-chunk-tokens 8192
         --data-path "$NEW_SHARE" "$LANG_NAME=$DATA/${LANG_NAME}_train_text_document"
                     "$REPLAY" "en=$DATA/en_train_text_document" --target "$LANG_NAME"
         --valid-data-path "$LANG_NAME=$DATA/${LANG_NAME}_valid_text_document"
                           "en=$DATA/en_valid_text_document"
         --save "$CKPT" --load "$CKPT" --save-interval 500 --log-dir "$WORK/logs"
         --log-interval 10 --num-workers 2 --data-cache-path "$DATA/index-cache"
         --run-kind cpt)
  if (( TP > 1 )); then TRAIN+=(--sequence-parallel); fi
  # --load resumes this run after a preemption; --init-from only applies to its first start
  run "${TRAIN[@]}" "${EXTRA[@]}"
fi

if has_step export && [[ "$NODE_RANK" == 0 ]]; then
  run python "$REPO/tools/convert_checkpoint.py" --load-dir "$CKPT" \
    --to-hf "$WORK/hf/cpt_replay$REPLAY" --dtype bf16
fi
