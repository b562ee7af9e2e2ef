#!/usr/bin/env bash
# The studies committed under docs/results/, on one GPU: paper-cpu (3 seeds) and paper-cpu-tuned at once,
# several workers each. SmolLM2-135M leaves a big GPU idle between kernel launches, so workers share it.
# fp32 as on a CPU (precision auto would pick bf16 on a GPU), so a later sitting on a CPU resumes the same
# grid with the same flags; eval batches of 32 rather than the CPU preset's 16.
#
#   bash scripts/gpu_results.sh            # LIMIT_S=N stops both after N seconds; rerun to resume
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/alpaca/alpaca_sample.json}
LIMIT=${LIMIT_S:-0}
OLORAPLUS=${OLORAPLUS:-oloraplus}
run() { if [ "$LIMIT" -gt 0 ]; then timeout "$LIMIT" "$@"; else "$@"; fi; }
COMMON=(--data "$DATA" --precision fp32 --eval_batch_size 32)
mkdir -p docs/results/paper-cpu docs/results/paper-cpu-tuned
run $OLORAPLUS compare --preset paper-cpu --seeds 0,1,2 --workers 3 --study_dir docs/results/paper-cpu \
  "${COMMON[@]}" >> docs/results/paper-cpu/compare.log 2>&1 &
run $OLORAPLUS compare --preset paper-cpu-tuned --workers 4 --study_dir docs/results/paper-cpu-tuned \
  "${COMMON[@]}" >> docs/results/paper-cpu-tuned/compare.log 2>&1 &
wait
