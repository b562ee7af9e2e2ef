#!/usr/bin/env bash
# The studies committed under docs/results/, on one GPU: paper-cpu (3 seeds) and paper-cpu-tuned at once, as Ray
# tasks on one Ray cluster started here; SmolLM2-135M leaves a big GPU idle between kernel launches, so seven runs
# share it (a seventh of the GPU and 2 CPUs each).
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
RAY=(--ray auto --ray_gpus_per_run 0.14 --ray_cpus_per_run 2)
mkdir -p docs/results/paper-cpu docs/results/paper-cpu-tuned
ray start --head --include-dashboard=false > /dev/null
trap 'ray stop > /dev/null' EXIT
run $OLORAPLUS compare --preset paper-cpu --seeds 0,1,2 "${RAY[@]}" --study_dir docs/results/paper-cpu \
  "${COMMON[@]}" >> docs/results/paper-cpu/compare.log 2>&1 &
run $OLORAPLUS compare --preset paper-cpu-tuned "${RAY[@]}" --study_dir docs/results/paper-cpu-tuned \
  "${COMMON[@]}" >> docs/results/paper-cpu-tuned/compare.log 2>&1 &
wait
