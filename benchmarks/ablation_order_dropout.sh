#!/usr/bin/env bash
# Goal 0 of the lean-runs issue: which of today's training defaults costs quality,
# the length-grouped batch order or the LoRA dropout? Three pipelines, paired by seed
# (same split, same test records, same model, OLoRA r16 a16 lr 2e-4, one epoch, batch 8):
#   grouped-dropout  : length-grouped batches, padded, dropout 0.05 (the defaults before packing)
#   random-dropout   : random order, packed (no padding, same gradient as padded), dropout 0.05
#   random-nodropout : random order, packed, dropout 0
#   random-nodropout-bf16 : the same in bf16 autocast (a CPU with native bf16 or a GPU): is bf16 neutral?
#   random-nodropout-bf16train : trained in bf16, test loss and answers in fp32 (auto's choice on an AVX512_BF16 CPU)
# Each pipeline is a resumable study folder; seeds run outer, pipelines inner, so a sitting
# that stops part-way holds whole seeds. Then benchmarks/ablation_report.py compares them.
#   SEEDS=0,1,2 NAMES=grouped-dropout,random-dropout,random-nodropout N_TRAIN=1000 N_TEST=200 bash benchmarks/ablation_order_dropout.sh
#   NAMES=random-nodropout,random-nodropout-bf16,random-nodropout-bf16train OUT=docs/results/ablation-precision bash benchmarks/ablation_order_dropout.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-docs/results/ablation-order-dropout}
SEEDS=${SEEDS:-0,1,2}
NAMES=${NAMES:-grouped-dropout,random-dropout,random-nodropout}
DATA=${DATA:-${OLORAPLUS_DATA:-../shared/data/alpaca/alpaca_sample.json}}
common=(--methods olora --data "$DATA" --n_train "${N_TRAIN:-1000}" --n_test "${N_TEST:-200}"
        --max_new_tokens "${NEW_TOKENS:-128}" --eval_batch_size 32 --lr 2e-4 --batch_size 8 --no_report)
declare -A flags=(
  [grouped-dropout]="--group_by_length true --packing false --dropout 0.05 --precision fp32"
  [random-dropout]="--group_by_length false --packing true --dropout 0.05 --precision fp32"
  [random-nodropout]="--group_by_length false --packing true --dropout 0 --precision fp32"
  [random-nodropout-bf16]="--group_by_length false --packing true --dropout 0 --precision bf16 --eval_precision bf16"
  [random-nodropout-bf16train]="--group_by_length false --packing true --dropout 0 --precision bf16 --eval_precision fp32"
)
for seed in ${SEEDS//,/ }; do
  for name in ${NAMES//,/ }; do
    echo "== seed $seed: $name ($(lscpu | sed -n 's/^Model name: *//p'), $(date -u +%H:%M:%S))"
    # shellcheck disable=SC2086
    "$BIN/oloraplus" compare "${common[@]}" ${flags[$name]} --seeds "$seed" --study_dir "$OUT/$name"
  done
done
"$BIN/python" benchmarks/ablation_report.py "$OUT"
