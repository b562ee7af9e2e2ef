#!/usr/bin/env bash
# The quick grid (3 runs on SmolLM2-135M) twice on this machine: one run after another (`compare`, torch on all
# cores), then as Ray tasks on a local cluster, 2 runs at a time on 1 core each (`--ray local`). Prints the CPU,
# each wall time, their ratio, and the largest eval-loss difference between the two studies (torch sums in another
# order on 1 thread than on 2, so the last digits may differ; the Ray tests compare equal thread counts exactly).
#   bash benchmarks/bench_ray_quick.sh            (about 15 min on 2 cores; both studies under $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-studies/bench-ray-quick}
DATA=${DATA:-${OLORAPLUS_DATA:-../shared/data/alpaca/alpaca_sample.json}}
WORKERS=${WORKERS:-2}
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
common=(--preset quick --data "$DATA" --precision fp32 --no_report)
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; ray $("$BIN/python" -c 'import ray; print(ray.__version__)')"
t0=$(date +%s.%N)
"$BIN/oloraplus" compare "${common[@]}" --study_dir "$OUT/sequential" > "$OUT.sequential.log" 2>&1
t1=$(date +%s.%N)
"$BIN/oloraplus" compare "${common[@]}" --study_dir "$OUT/ray" --ray local --ray_local_cpus "$WORKERS" \
  --ray_cpus_per_run 1 > "$OUT.ray.log" 2>&1
t2=$(date +%s.%N)
"$BIN/python" - "$OUT" "$t0" "$t1" "$t2" "$WORKERS" <<'EOF'
import json, sys
from pathlib import Path
out, t0, t1, t2, workers = Path(sys.argv[1]), *map(float, sys.argv[2:5]), sys.argv[5]
seq, ray = t1 - t0, t2 - t1
runs = sorted(p.parent.name for p in (out / "sequential").glob("runs/*/metrics.json"))
loss = lambda study, run: json.loads((out / study / "runs" / run / "metrics.json").read_text())["eval_loss"]
diff = max(abs(loss("sequential", r) - loss("ray", r)) for r in runs)
print(f"sequential: {seq:.0f} s; Ray, {workers} local workers: {ray:.0f} s; speed-up x{seq / ray:.2f}")
print(f"{len(runs)} runs each; largest eval-loss difference {diff:.2e}")
EOF
