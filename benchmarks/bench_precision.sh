#!/usr/bin/env bash
# Training speed and memory by precision, side by side in one run, each side a whole `oloraplus train` process:
#   fp32        this checkout, --precision fp32
#   bf16        this checkout, --precision bf16 (frozen base stored in bf16, packed attention kept in fp32)
#   bf16-before revision $BEFORE_REV (default 1d141fd: bf16 attention under autocast), --precision bf16
# Prints real training tokens/s, training peak RSS and the test loss of each, and the ratios to fp32.
# Needs a CPU with native bf16 (AVX512_BF16 or AMX) or a GPU.
#   bash benchmarks/bench_precision.sh            N_TRAIN=200 by default; SIDES=fp32,bf16 skips the old side
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-200}
SIDES=${SIDES:-fp32,bf16,bf16-before}
BEFORE_REV=${BEFORE_REV:-1d141fd}
DATA=${DATA:-${OLORAPLUS_DATA:-../shared/data/alpaca/alpaca_sample.json}}
OUT_DIR=${OUT:-benchmarks/precision_out}
args=(--data "$DATA" --n_train "$N_TRAIN" --n_test 8 --max_new_tokens 8 --method olora+ --lr_ratio 4 --overwrite)
# shellcheck source=benchmarks/sides.sh
source benchmarks/sides.sh
prepare_sides "$OUT_DIR" "$BEFORE_REV"
for side in ${SIDES//,/ }; do
  case $side in
    fp32)        src=src precision=fp32 ;;
    bf16)        src=src precision=bf16 ;;
    bf16-before) src="$tmp/src" precision=bf16 ;;
    *) echo "unknown side $side"; exit 2 ;;
  esac
  echo "== $side ($(date -u +%H:%M:%S))"
  PYTHONPATH="$src" "$PY" -m oloraplus.cli train "${args[@]}" --precision "$precision" --output_dir "$OUT_DIR/$side" \
    > "$OUT_DIR/$side.log" 2>&1 || { tail -20 "$OUT_DIR/$side.log"; exit 1; }
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$OUT_DIR" "$SIDES" <<'PYEOF'
import json, sys
from pathlib import Path
out, sides = Path(sys.argv[1]), sys.argv[2].split(",")
rows = {s: json.loads((out / s / "metrics.json").read_text()) for s in sides}
print(f"\n{'side':<13}{'train tok/s':>12}{'train peak GB':>15}{'test loss':>12}")
for s, m in rows.items():
    print(f"{s:<13}{m['train_tokens_per_s']:>12.1f}{m['peak_rss_gb_training']:>15.2f}{m['eval_loss']:>12.6f}")
if "fp32" in rows:
    for s in sides:
        if s != "fp32":
            print(f"{s} vs fp32: training {rows[s]['train_tokens_per_s'] / rows['fp32']['train_tokens_per_s']:.2f}x "
                  f"faster, peak {rows[s]['peak_rss_gb_training'] / rows['fp32']['peak_rss_gb_training']:.2f}x")
PYEOF
