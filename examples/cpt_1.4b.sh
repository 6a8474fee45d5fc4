#!/usr/bin/env bash
# The paper's 1.4B cross-lingual continual pre-training recipe, English -> Chinese
# (Zheng et al., "Breaking Language Barriers", EMNLP 2024). Edit the variables below (or set
# them in the environment) and run it on every node; it is a recipe, not run in CI.
#
#   1. tokenizer   bilingual SentencePiece BPE, 36,152 pieces, on both training corpora
#   2. preprocess  both languages into indexed binaries, plus held-out validation sets
#   3. source      pretrain the 1393M model on English for 20 tokens per parameter
#                  (or skip it and start from a HuggingFace LLaMA: HF_MODEL=..., below)
#   4. cpt         initialise from the source, train on Chinese with 30% English replay for
#                  20 tokens per parameter (fresh optimizer, LR re-warmed)
#   5. export      the CPT model as a HuggingFace LLaMA directory
#
# Recipe: LLaMA2 1393M (hidden 1792, ffn 9728, 14 heads, 26 layers; ~1.8B parameters as we
# count them, embeddings included), seq 2048, bf16, AdamW (0.9, 0.95), weight decay 0.1,
# clip 1.0, cosine LR from 2e-4 to 2e-5 with 5% linear warm-up, 2M-token batches
# (1024 x 2048), validation on ~10^6 held-out tokens per language (eval-iters x micro-batch
# x 2048 tokens).
#
#   STEPS="tokenizer preprocess source cpt export" examples/cpt_1.4b.sh   # all (default)
#   STEPS="cpt" NNODES=4 NODE_RANK=$R MASTER_ADDR=node0 examples/cpt_1.4b.sh
#   DRY_RUN=1 examples/cpt_1.4b.sh                                       # print commands
#
# Starting from a HuggingFace LLaMA instead of step 3 (its tokenizer, its shape):
#   HF_MODEL=/models/llama HF_SHAPE="--num-layers 24 --hidden-size 2048 ..." \
#   STEPS="tokenizer preprocess cpt export" examples/cpt_1.4b.sh
# where the tokenizer step then extends the HF vocabulary with EXTEND_VOCAB new Chinese
# pieces (tools/extend_vocab.py; 0 keeps the HF tokenizer as is).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# ----- inputs: JSON lines with a "text" field (.jsonl or .jsonl.gz) -----
EN_TRAIN=${EN_TRAIN:-/data/redpajama_en.jsonl}
ZH_TRAIN=${ZH_TRAIN:-/data/cc_wudao_zh.jsonl}
EN_VALID=${EN_VALID:-/data/en_valid.jsonl}
ZH_VALID=${ZH_VALID:-/data/zh_valid.jsonl}
WORK=${WORK:-runs/cpt_1.4b}                  # data, checkpoints and logs go here
STEPS=${STEPS:-tokenizer preprocess source cpt export}
HF_MODEL=${HF_MODEL:-}                       # a HuggingFace LLaMA directory, or empty
HF_SHAPE=${HF_SHAPE:-}                       # its shape as flags (with HF_MODEL)
EXTEND_VOCAB=${EXTEND_VOCAB:-8000}           # new pieces for the HF tokenizer (with HF_MODEL)
# ----- cluster -----
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}                                  # 1.8B fits one GPU; raise TP/PP for larger sizes
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}                # add --recompute-activations to EXTRA if OOM
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}           # x 2048 tokens = 2M-token batches
WORKERS=${WORKERS:-32}                       # preprocessing processes
EXTRA=(${EXTRA:-})                           # more trainer flags, e.g. --recompute-activations
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

DATA=$WORK/data
TOKENIZER=$DATA/tokenizer.model
SOURCE_CKPT=$WORK/checkpoints/en_source
CPT_CKPT=$WORK/checkpoints/zh_cpt_replay0.3
INIT_FROM=$SOURCE_CKPT
MODEL=(--model-size 1393M)
if [[ -n "$HF_MODEL" ]]; then
  read -r -a MODEL <<< "$HF_SHAPE"
  if [[ "$EXTEND_VOCAB" -gt 0 ]]; then
    INIT_FROM=$WORK/checkpoints/hf_extended; TOKENIZER=$INIT_FROM/tokenizer.model
  else
    INIT_FROM=$HF_MODEL; TOKENIZER=$HF_MODEL/tokenizer.model
  fi
fi

run() {  # print, then run unless DRY_RUN=1
  echo "+ $*"
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

TRAIN=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
       --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m megacpt.train
       "${MODEL[@]}" --tokenizer-model "$TOKENIZER"
       --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
       --use-distributed-optimizer --bf16 --seq-length 2048
       --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
       --tokens-per-param 20 --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine
       --lr-warmup-fraction 0.05 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
       --clip-grad 1.0 --split 1,0,0 --eval-interval 500 --eval-iters 128
       --valid-data-path "zh=$DATA/zh_valid_text_document" "en=$DATA/en_valid_text_document"
       --save-interval 500 --log-interval 10 --num-workers 2
       --data-cache-path "$DATA/index-cache")
if (( TP > 1 )); then TRAIN+=(--sequence-parallel); fi

if has_step tokenizer; then
  if [[ -z "$HF_MODEL" ]]; then
    run python "$REPO/tools/train_tokenizer.py" --input "$EN_TRAIN" "$ZH_TRAIN" \
      --vocab-size 36152 --character-coverage 0.9995 --model-prefix "$DATA/tokenizer"
  elif [[ "$EXTEND_VOCAB" -gt 0 ]]; then
    run python "$REPO/tools/extend_vocab.py" --tokenizer-model "$HF_MODEL/tokenizer.model" \
      --corpus "$ZH_TRAIN" --new-pieces "$EXTEND_VOCAB" --from-hf "$HF_MODEL" \
      --save-dir "$INIT_FROM"
  fi
fi

if has_step preprocess; then
  for pair in "en_train:$EN_TRAIN" "zh_train:$ZH_TRAIN" "en_valid:$EN_VALID" \
              "zh_valid:$ZH_VALID"; do
    run python "$REPO/tools/preprocess_data.py" --input "${pair#*:}" --json-keys text \
      --tokenizer-model "$TOKENIZER" --output-prefix "$DATA/${pair%%:*}" --append-eod \
      --workers "$WORKERS"
  done
fi

if has_step source; then
  [[ -z "$HF_MODEL" ]] || { echo "HF_MODEL is set: drop 'source' from STEPS" >&2; exit 2; }
  run "${TRAIN[@]}" --data-path 1.0 "en=$DATA/en_train_text_document" --target en \
    --save "$SOURCE_CKPT" --load "$SOURCE_CKPT" --log-dir "$WORK/logs/en_source" \
    --run-kind scratch "${EXTRA[@]}"
fi

if has_step cpt; then
  # 70% Chinese, 30% English replay; --load resumes this run after a preemption, --init-from
  # only applies to its first start
  run "${TRAIN[@]}" --init-from "$INIT_FROM" \
    --data-path 0.7 "zh=$DATA/zh_train_text_document" 0.3 "en=$DATA/en_train_text_document" \
    --target zh --save "$CPT_CKPT" --load "$CPT_CKPT" --log-dir "$WORK/logs/zh_cpt_replay0.3" \
    --run-kind cpt "${EXTRA[@]}"
fi

if has_step export && [[ "$NODE_RANK" == 0 ]]; then
  run python "$REPO/tools/convert_checkpoint.py" --load-dir "$CPT_CKPT" \
    --to-hf "$WORK/hf/zh_cpt_replay0.3" --dtype bf16
fi
