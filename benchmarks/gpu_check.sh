#!/usr/bin/env bash
# GPU check for a session lent an NVIDIA H200 (run from anywhere; about 2 minutes when
# torch+CUDA is already installed; it stays inside 8 minutes: every stage has a timeout
# cut from what is left of the budget).
#
#   1. a Python with torch (CUDA), transformers, peft, safetensors: the machine's own, or a
#      venv in /tmp with --system-site-packages where pip installs only what is missing
#   2. benchmarks/gpu_train.py: OLoRA+ training tokens/s and MFU, TinyLlama-1.1B shape, bf16
#   3. benchmarks/bench_init.py --device cuda: thin-QR vs PEFT OLoRA init, whole model, r=16,64
#
# Output: everything printed also goes to $OUT/gpu_check.log (or benchmarks/gpu_out/ without
# $OUT), plus gpu_train.json and bench_init_cuda.json there.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET_S:-480}
START=$SECONDS
OUT_DIR=${OUT:-benchmarks/gpu_out}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
left() { echo $(( BUDGET - (SECONDS - START) )); }
# timeout for a stage: what is left minus a reserve for the stages after it, at most $2, at least 20 s
limit() { local t=$(( $(left) - $1 )); [ "$t" -gt "$2" ] && t=$2; [ "$t" -lt 20 ] && t=20; echo "$t"; }
stage() { echo; echo "=== $1 (t=$((SECONDS - START)) s, $(left) s left)"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)" || true

stage "python environment"
PY=${PYTHON:-python3}
missing() {  # prints the pip requirements this Python lacks
  "$1" - <<'EOF'
import importlib.util
need = []
try:
    import torch
    if not torch.cuda.is_available():
        need.append("torch")
except Exception:
    need.append("torch")
for mod, req in (("transformers", "transformers>=4.45"), ("peft", "peft>=0.13"), ("safetensors", "safetensors")):
    if importlib.util.find_spec(mod) is None:
        need.append(req)
print(" ".join(need))
EOF
}
NEED=$(missing "$PY")
if [ -n "$NEED" ]; then
  echo "missing for $PY: $NEED -> installing into /tmp/oloraplus-gpu-venv"
  "$PY" -m venv --system-site-packages /tmp/oloraplus-gpu-venv || { echo "venv failed"; exit 1; }
  PY=/tmp/oloraplus-gpu-venv/bin/python
  timeout "$(limit 150 330)" "$PY" -m pip install --quiet --disable-pip-version-check $NEED \
    || { echo "pip install failed or ran out of time"; exit 1; }
  NEED=$(missing "$PY")
  [ -z "$NEED" ] || { echo "still missing: $NEED"; exit 1; }
fi
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name(), '| transformers', transformers.__version__, '| peft', peft.__version__)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore

stage "OLoRA+ training throughput and MFU (gpu_train.py)"
timeout "$(limit 100 240)" "$PY" benchmarks/gpu_train.py --device cuda --layers 22 --batch_size 8 --seq_len 1024 \
  --steps 30 --json "$OUT_DIR/gpu_train.json" || echo "gpu_train.py failed or timed out (exit $?)"

stage "init: thin QR vs PEFT olora (bench_init.py, 22 layers)"
timeout "$(limit 10 200)" "$PY" benchmarks/bench_init.py --device cuda --layers 22 --ranks 16,64 --proposed \
  --json "$OUT_DIR/bench_init_cuda.json" || echo "bench_init.py failed or timed out (exit $?)"

stage "done"
