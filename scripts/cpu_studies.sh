#!/usr/bin/env bash
# Issue 15's two tuned studies on a CPU, one after the other, under today's training defaults (the presets):
# SmolLM2-135M (paper-cpu-tuned), then the second family, Gemma 3 270M base (gemma3-cpu-tuned). A run is ~18 min
# on 2 Zen 3 cores for SmolLM2 (docs/results/bench-lean-cpu-dropout0), so the 30 test runs of one study take
# several sittings: stop it any time (Ctrl-C, or LIMIT_S=N), run this again and it goes on from each run's last
# checkpoint; finished runs are skipped. Give both commands the same --data string each time: a run folder made
# with another configuration (its data path included) is refused rather than mixed in.
#
#   nohup bash scripts/cpu_studies.sh >> studies/cpu_studies.log 2>&1 &
#   bash scripts/publish_study.sh studies/smollm2-135m-tuned smollm2-135m-tuned   # results into docs/results/
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/alpaca/alpaca_sample.json}
STUDIES=${STUDIES:-studies}
LIMIT=${LIMIT_S:-0}
OLORAPLUS=${OLORAPLUS:-.venv/bin/oloraplus}
run() { if [ "$LIMIT" -gt 0 ]; then timeout "$LIMIT" "$@"; else "$@"; fi; }
run "$OLORAPLUS" compare --preset paper-cpu-tuned --data "$DATA" --study_dir "$STUDIES/smollm2-135m-tuned" || exit
run "$OLORAPLUS" compare --preset gemma3-cpu-tuned --data "$DATA" --study_dir "$STUDIES/gemma3-270m-tuned"
