#!/usr/bin/env bash
# Copy a study's finished runs into docs/results/NAME as evidence: no adapters, checkpoints or claims (large, and
# rebuilt by rerunning), the Alpaca records' texts stripped from predictions.jsonl (CC BY-NC: never committed),
# then the report written anew there without quoting the data file. The study folder itself is left as it is,
# so the study goes on there.
#
#   bash scripts/publish_study.sh STUDY_DIR NAME
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?study folder}
name=${2:?name under docs/results}
OLORAPLUS=${OLORAPLUS:-.venv/bin/oloraplus}
dst=docs/results/$name
rm -rf "$dst"
cp -a "$src" "$dst"
for run in "$dst"/runs/*/; do  # a run still training (no metrics.json yet) is the study folder's, not evidence
  [ -f "$run/metrics.json" ] || rm -rf "$run"
done
find "$dst" -depth \( -name adapter -o -name 'checkpoint-*' -o -name .claims -o -name .incoming \) -type d -exec rm -rf {} +
.venv/bin/python benchmarks/strip_record_texts.py "$dst"
"$OLORAPLUS" report "$dst" --no_record_texts
