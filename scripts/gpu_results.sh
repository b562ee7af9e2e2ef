#!/usr/bin/env bash
# Issue 15's two tuned studies on one GPU, at once, as Ray tasks on a Ray cluster started here: SmolLM2-135M
# (paper-cpu-tuned) and Gemma 3 270M base (gemma3-cpu-tuned), three seeds each, under today's defaults. Small
# models leave a big GPU idle between kernel launches, so seven runs share it (a seventh of the GPU, 2 CPUs each).
# fp32 as on a CPU (precision auto would pick bf16 on a GPU). Their own folders, apart from the CPU studies of
# scripts/cpu_studies.sh: a comparison pairs runs of one machine kind. Publish with scripts/publish_study.sh.
# (The studies of docs/results/paper-cpu*/ were made by an earlier version of this script, with the recipe of
# that time; their compare.log and README say how.)
#
#   bash scripts/gpu_results.sh            # LIMIT_S=N stops both after N seconds; rerun to resume
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/alpaca/alpaca_sample.json}
STUDIES=${STUDIES:-studies}
LIMIT=${LIMIT_S:-0}
OLORAPLUS=${OLORAPLUS:-oloraplus}
run() { if [ "$LIMIT" -gt 0 ]; then timeout "$LIMIT" "$@"; else "$@"; fi; }
COMMON=(--data "$DATA" --precision fp32)
RAY=(--ray auto --ray_gpus_per_run 0.14 --ray_cpus_per_run 2)
mkdir -p "$STUDIES"
ray start --head --include-dashboard=false > /dev/null
trap 'ray stop > /dev/null' EXIT
for study in smollm2-135m-tuned:paper-cpu-tuned gemma3-270m-tuned:gemma3-cpu-tuned; do
  dir=$STUDIES/gpu-${study%%:*}
  run $OLORAPLUS compare --preset "${study#*:}" "${RAY[@]}" --study_dir "$dir" "${COMMON[@]}" >> "$dir.log" 2>&1 &
done
wait
