#!/usr/bin/env bash
# MBTS="512 1024 0" bash docs/results/bench-lean-zen4/tried-training/micro_batch_tokens.sh  (bf16 on this CPU: auto)
# alternate micro_batch_tokens values, n_train 160
cd "$(dirname "$0")/../../../.."
mkdir -p "${OUT:-/tmp/mbt}"
for round in 1 2; do
 for m in $MBTS; do
  out=${OUT:-/tmp/mbt}/$m-$round
  /usr/bin/time -f "%M KiB" -o ${OUT:-/tmp/mbt}/$m-$round.time .venv/bin/oloraplus train --data ../shared/data/alpaca/alpaca_sample.json --n_train 160 --n_test 8 --max_new_tokens 4 --generate false --method olora+ --lr_ratio 4 --micro_batch_tokens $m --output_dir $out --overwrite $EXTRA > ${OUT:-/tmp/mbt}/$m-$round.log 2>&1
  python - "$out" "$m" "$round" <<'PY'
import json,sys
m=json.load(open(sys.argv[1]+"/metrics.json"))
print(sys.argv[2], sys.argv[3], {k:v for k,v in m.items() if "tok" in k or "loss" in k or "peak" in k or k.startswith("train_")})
PY
 done
done
