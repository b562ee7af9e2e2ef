#!/usr/bin/env bash
# The whole paper-cpu protocol as a user runs it, three sides in one run, each a whole process
# under /usr/bin/time (wall time and peak RSS from start to end: load, train 1,000 examples for
# one epoch at batch 8, test loss on 500, 500 greedy answers of up to 128 tokens):
#   ours      `oloraplus train` of this checkout, with its defaults
#   before    `oloraplus train` of revision $BEFORE_REV (git archive; its own defaults)
#   baseline  PEFT's OLoRA + LoRA+ optimizer + stock Trainer on padded random batches, the model's
#             own loss on padded test batches, and peft_model.generate one prompt at a time
#             (benchmarks/baseline_protocol.py). Hours on a 2-core CPU: SIDES=ours,before skips it.
# Sizes can be cut: N_TRAIN=64 N_TEST=16 NEW_TOKENS=32 bash benchmarks/bench_protocol.sh
# PRECISION sets ours' (default auto, what a user gets: bf16 training on a CPU with AVX512_BF16 and no AMX, fp32
# elsewhere; evaluation in fp32 on every CPU). PRECISION_BEFORE sets before's (default fp32: its bf16 trained in
# fp32, docs/benchmarks.md, and on an AVX2 CPU fp32 is its auto). The earlier rows' fp32-only runs:
# PRECISION=fp32 SIDES=ours,before bash benchmarks/bench_protocol.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-1000}
N_TEST=${N_TEST:-500}
NEW_TOKENS=${NEW_TOKENS:-128}
BATCH=${BATCH:-8}
SIDES=${SIDES:-ours,before,baseline}
BEFORE_REV=${BEFORE_REV:-ea9ebf0}
PRECISION=${PRECISION:-auto}
PRECISION_BEFORE=${PRECISION_BEFORE:-fp32}
DATA=${DATA:-${OLORAPLUS_DATA:-../shared/data/alpaca/alpaca_sample.json}}
OUT_DIR=${OUT:-benchmarks/protocol_out}
args=(--data "$DATA" --n_train "$N_TRAIN" --n_test "$N_TEST" --max_new_tokens "$NEW_TOKENS" --batch_size "$BATCH"
      --method olora+ --lr_ratio 4 --precision "$PRECISION" --overwrite)
# shellcheck source=benchmarks/sides.sh
source benchmarks/sides.sh
prepare_sides "$OUT_DIR" "$BEFORE_REV"
for side in ${SIDES//,/ }; do
  echo "== $side ($(date -u +%H:%M:%S))"
  case $side in
    ours)     cmd=(env PYTHONPATH=src "$PY" -m oloraplus.cli train "${args[@]}" --output_dir "$OUT_DIR/ours") ;;
    before)   cmd=(env PYTHONPATH="$tmp/src" "$PY" -m oloraplus.cli train "${args[@]}" --precision "$PRECISION_BEFORE"
                   --output_dir "$OUT_DIR/before") ;;
    baseline) cmd=("$PY" benchmarks/baseline_protocol.py --data "$DATA" --n_train "$N_TRAIN" --n_test "$N_TEST"
                   --max_new_tokens "$NEW_TOKENS" --batch_size "$BATCH" --output_dir "$OUT_DIR/baseline") ;;
    *) echo "unknown side $side"; exit 2 ;;
  esac
  /usr/bin/time -f "$side wall %e s, peak RSS %M KiB, user %U s, system %S s" -o "$OUT_DIR/$side.time" "${cmd[@]}" \
    > "$OUT_DIR/$side.log" 2>&1 || { tail -20 "$OUT_DIR/$side.log"; exit 1; }
  cat "$OUT_DIR/$side.time"
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$OUT_DIR" "$SIDES" <<'PYEOF'
import json, re, sys
from pathlib import Path
out, sides = Path(sys.argv[1]), sys.argv[2].split(",")
rows = {}
for s in sides:
    wall, kib, user, system = map(float, re.findall(r"wall ([\d.]+) s, peak RSS (\d+) KiB, user ([\d.]+) s, system ([\d.]+)",
                                                    (out / f"{s}.time").read_text())[0])
    m = json.loads((out / s / "metrics.json").read_text())
    rows[s] = dict(wall=wall, rss_gib=kib / 2**20, kernel=system / (user + system), **m)
print(f"\n{'side':<10}{'train/eval precision':>21}{'wall min':>10}{'peak RSS GiB':>14}{'kernel':>8}{'train tok/s':>13}"
      f"{'answer tok/s':>14}{'test loss':>11}{'BLEU':>7}{'ROUGE-L':>9}")
for s, r in rows.items():
    precisions = f"{r.get('precision', 'fp32')}/{r.get('eval_precision', r.get('precision', 'fp32'))}"
    print(f"{s:<10}{precisions:>21}{r['wall'] / 60:>10.1f}{r['rss_gib']:>14.2f}{r['kernel']:>8.1%}"
          f"{r['train_tokens_per_s']:>13.1f}{r.get('generation_tokens_per_s', float('nan')):>14.1f}"
          f"{r['eval_loss']:>11.4f}{r['bleu']:>7.2f}{r['rougeL']:>9.4f}")
for s in rows:
    if s != "ours":
        print(f"ours vs {s}: wall {rows[s]['wall'] / rows['ours']['wall']:.2f}x faster, "
              f"peak RSS {rows['ours']['rss_gib'] / rows[s]['rss_gib']:.2f}x, "
              f"training {rows['ours']['train_tokens_per_s'] / rows[s]['train_tokens_per_s']:.2f}x, "
              f"answers {rows['ours'].get('generation_tokens_per_s', 0) / rows[s].get('generation_tokens_per_s', 1):.2f}x")
(out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
PYEOF
