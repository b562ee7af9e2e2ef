#!/usr/bin/env bash
# Whole paper-cpu protocol wall time, ours vs baseline: train on 1,000 Alpaca examples
# (one epoch, batch 8 = 125 steps), then generate answers for 500 test prompts
# (128 new tokens). Chains bench_train.py and bench_eval.py at full size and sums
# train (whole subprocess: load, init, train) + generation per side.
#
# Hours on a 2-core CPU (see docs/benchmarks.md). Sizes can be cut:
#   N_TRAIN=64 N_TEST=16 NEW_TOKENS=64 benchmarks/bench_protocol.sh
# REUSE=1 keeps a stage whose JSON is already in $OUT (a sitting too short for both
# stages can run them one after the other; each stage is still ours vs baseline side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N_TRAIN=${N_TRAIN:-1000}
N_TEST=${N_TEST:-500}
NEW_TOKENS=${NEW_TOKENS:-128}
BATCH=${BATCH:-8}
OUT_DIR=${OUT:-benchmarks/protocol_out}
mkdir -p "$OUT_DIR"
export PYTHONWARNINGS=ignore

if [[ ${REUSE:-0} == 1 && -s $OUT_DIR/train.json ]]; then
  echo "== training: reusing $OUT_DIR/train.json"
else
  echo "== training: $N_TRAIN examples, batch $BATCH, one epoch"
  "$PY" benchmarks/bench_train.py --n_train "$N_TRAIN" --batch_size "$BATCH" --json "$OUT_DIR/train.json" \
    | tee "$OUT_DIR/train.log"
fi
if [[ ${REUSE:-0} == 1 && -s $OUT_DIR/eval.json ]]; then
  echo "== generation: reusing $OUT_DIR/eval.json"
else
  echo "== generation: $N_TEST prompts, max_new_tokens $NEW_TOKENS"
  "$PY" benchmarks/bench_eval.py --n "$N_TEST" --max_new_tokens "$NEW_TOKENS" --json "$OUT_DIR/eval.json" \
    | tee "$OUT_DIR/eval.log"
fi

"$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
train = json.loads((out / "train.json").read_text())["results"]
ev = json.loads((out / "eval.json").read_text())
print(f"\nsizes: training {train['ours']['steps']} steps, {train['ours']['real_tokens']:,} real tokens; "
      f"generation {ev['args']['n']} test prompts x at most {ev['args']['max_new_tokens']} new tokens")
total = {k: train[k]["subprocess_seconds"] + ev[k]["seconds"] for k in ("ours", "baseline")}
print(f"\nprotocol wall time (train subprocess + generation):")
for k in ("ours", "baseline"):
    print(f"  {k:<9} {train[k]['subprocess_seconds']:9.0f} s + {ev[k]['seconds']:9.0f} s = {total[k]:9.0f} s")
print(f"  speedup {total['baseline'] / total['ours']:.2f}x")
EOF
