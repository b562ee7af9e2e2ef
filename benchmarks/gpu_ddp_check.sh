#!/usr/bin/env bash
# One run on several processes, on GPUs: DDP and FSDP2 against one process (run from anywhere;
# made to stay inside 5 minutes on one H200: every stage has a timeout cut from what is left).
# Not run yet: written on a machine without a GPU; what the CPU can check is in tests/test_torchrun.py.
#
#   1. a tiny random Llama + 60 synthetic records, built by tests/conftest.py (no download)
#   2. the reference: one process on cuda, fp32, batch 4
#   3. with 2+ GPUs: DDP (torchrun, NCCL) and FSDP2 (accelerate, examples/accelerate/fsdp.yaml),
#      2 processes x batch 2; with 1 GPU: FSDP2 on one process x batch 4 (its weights are still
#      DTensors, so the gathers run) -- DDP needs 2 GPUs, NCCL refuses two ranks on one
#   4. each against the reference: same weights after the OLoRA init and after training on every
#      rank, loss curve, test loss, answers, adapter, and no file written by a rank > 0
#
# CPU_DRY_RUN=1 runs the plumbing on a CPU instead (DDP over gloo, no FSDP: accelerate shards only on GPUs).
# Each launch runs tests/torchrun_probe.py (`oloraplus train` plus per-rank digests and file writes).
# Output: $OUT/gpu_ddp_check.log and gpu_ddp_check.json (or benchmarks/gpu_out/ without $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET_S:-280}
START=$SECONDS
OUT_DIR=${OUT:-benchmarks/gpu_out}
WORK=$(mktemp -d /tmp/oloraplus-ddp.XXXXXX)
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_ddp_check.log") 2>&1
left() { echo $(( BUDGET - (SECONDS - START) )); }
limit() { local t=$(( $(left) - $1 )); [ "$t" -gt "$2" ] && t=$2; [ "$t" -lt 20 ] && t=20; echo "$t"; }
stage() { echo; echo "=== $1 (t=$((SECONDS - START)) s, $(left) s left)"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi failed"
PY=${PYTHON:-python3}
"$PY" - <<'EOF' || { echo "this Python cannot run oloraplus on a GPU"; exit 1; }
import importlib.util, os, sys
import torch
missing = [m for m in ("transformers", "peft", "accelerate", "datasets", "sacrebleu", "rouge_score", "matplotlib",
                       "yaml", "safetensors", "tokenizers") if importlib.util.find_spec(m) is None]
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
if missing or not (torch.cuda.is_available() or os.environ.get("CPU_DRY_RUN") == "1"):
    sys.exit(f"missing: {missing}, cuda available: {torch.cuda.is_available()}")
EOF
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "${CPU_DRY_RUN:-0}" = 1 ] && GPUS=2
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore OMP_NUM_THREADS=1

stage "tiny model and records"
"$PY" - "$WORK" <<'EOF'
import json, sys
from conftest import _records, build_tiny_llama, build_tokenizer
tok = build_tokenizer()
model = build_tiny_llama(len(tok))
model.save_pretrained(f"{sys.argv[1]}/model")
tok.save_pretrained(f"{sys.argv[1]}/model")
open(f"{sys.argv[1]}/records.json", "w").write(json.dumps(_records()[:60]))
EOF
ARGS=(train --model "$WORK/model" --data "$WORK/records.json" --n_train 32 --val_fraction 0.25 --n_test 8
      --max_steps 6 --logging_steps 1 --lr 1e-3 --dropout 0 --precision fp32 --max_new_tokens 8 --eval_batch_size 2)
run() {  # run NAME BATCH LAUNCHER...: the probe under that launcher, BATCH examples per process per step
  local name=$1 batch=$2; shift 2
  stage "$name"
  mkdir -p "$WORK/$name"
  timeout "$(limit 30 90)" "$@" tests/torchrun_probe.py "$WORK/$name/probe" "$WORK/$name/run" "${ARGS[@]}" \
    --batch_size "$batch" --output_dir "$WORK/$name/run" > "$WORK/$name.log" 2>&1
  echo "$name: exit $?"
  tail -3 "$WORK/$name.log"
}
ACCELERATE=("$PY" -m accelerate.commands.launch --config_file examples/accelerate/fsdp.yaml)
run one 4 "$PY"
if [ "$GPUS" -ge 2 ]; then
  run ddp 2 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2
  [ "${CPU_DRY_RUN:-0}" = 1 ] || run fsdp 2 "${ACCELERATE[@]}" --num_processes 2
else
  echo "one GPU: no DDP (NCCL wants one GPU per rank); FSDP2 on one process"
  run fsdp 4 "${ACCELERATE[@]}" --num_processes 1
fi

stage "compare with one process"
"$PY" - "$WORK" "$OUT_DIR/gpu_ddp_check.json" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file

work, out = Path(sys.argv[1]), Path(sys.argv[2])
def rows(run): return [json.loads(l) for l in (run / "predictions.jsonl").read_text().splitlines()]
def losses(run): return [h["loss"] for h in json.loads((run / "history.json").read_text()) if "loss" in h]
def files(run): return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
ref = work / "one" / "run"
report = {}
for name in ("ddp", "fsdp"):
    run, probe = work / name / "run", work / name / "probe"
    if not (work / name).is_dir():  # not launched here (one GPU: no DDP; a CPU dry run: no FSDP)
        continue
    if not (run / "metrics.json").is_file():
        report[name] = {"ok": False, "why": f"no finished run (see {name}.log)"}
        continue
    ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("rank-*.json"))]
    a, b = load_file(run / "adapter/adapter_model.safetensors"), load_file(ref / "adapter/adapter_model.safetensors")
    m, mr = json.loads((run / "metrics.json").read_text()), json.loads((ref / "metrics.json").read_text())
    ours, theirs = losses(run), losses(ref)
    r = {
        "ranks": len(ranks),
        "init_equal_on_ranks": len({x["init_digest"] for x in ranks}) == 1,
        "trained_equal_on_ranks": len({x["digest"] for x in ranks}) == 1,
        "max_loss_rel_diff": max(abs(x - y) / abs(y) for x, y in zip(ours, theirs)) if len(ours) == len(theirs) else None,
        "eval_loss_rel_diff": abs(m["eval_loss"] - mr["eval_loss"]) / mr["eval_loss"],
        "answers_equal": sum(x["prediction"] == y["prediction"] for x, y in zip(rows(run), rows(ref))),
        "answers": len(rows(ref)),
        "adapter_max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in b) if a.keys() == b.keys() else None,
        "same_files": files(run) == files(ref),
        "rank_gt0_writes": sum(len(x["writes"]) for x in ranks[1:]),
        "split": [(x["loss_batches"], x["prompts"]) for x in ranks],
    }
    r["ok"] = bool(r["init_equal_on_ranks"] and r["trained_equal_on_ranks"] and r["max_loss_rel_diff"] is not None
                   and r["max_loss_rel_diff"] < 1e-4 and r["eval_loss_rel_diff"] < 1e-4 and r["same_files"]
                   and r["rank_gt0_writes"] == 0 and r["adapter_max_abs_diff"] is not None)
    report[name] = r
out.write_text(json.dumps(report, indent=2) + "\n")
for name, r in report.items():
    print(("PASS " if r["ok"] else "FAIL ") + name, json.dumps(r))
EOF
cp "$WORK"/*.log "$OUT_DIR"/ 2>/dev/null
stage "done"
