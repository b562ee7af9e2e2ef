"""How a batch is laid out, isolated: padded vs one example per forward vs packed, same batches, same loss.

Forward + backward of the response-only loss over the same random-order batches of
SmolLM2-135M + an OLoRA adapter, no optimizer step (so every layout sees the same
weights and must give the same summed loss). Layouts:
  padded  right-padded batch (to a multiple of 8), SDPA with a padding mask
  single  one example per forward (no padding, small matmuls)
  packed  the batch's examples end to end, causal attention inside each (oloraplus.packing)
  shared  packed, the tokens all examples of the batch start with (the chat template's system
          prompt) computed once and attended to by each example: the default
Each layout runs in its own subprocess (peak RSS apart), one after the other.

    python benchmarks/bench_packing.py                      # 64 examples, batch 8, dropout 0
    python benchmarks/bench_packing.py --dropout 0.05       # what PEFT's dropout costs each layout
    python benchmarks/bench_packing.py --layouts packed,shared   # what sharing the prompt prefix saves
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from common import DEFAULT_DATA  # noqa: E402

LAYOUTS = ("padded", "single", "packed", "shared")


def worker(layout: str, args: argparse.Namespace) -> dict:

    from oloraplus import adapters
    from oloraplus.data import PadCollator, load_records, split_indices, tokenize_records
    from oloraplus.loss import batch_token_losses
    from oloraplus.models import load_base
    from oloraplus.packing import pack, split_packed, use_packed_attention
    from oloraplus.precision import keep_freed_memory_mapped

    if args.tuned_malloc:
        keep_freed_memory_mapped()
    model, tok = load_base(args.model)
    records = load_records(args.data)
    split = split_indices(len(records), args.n, 1, 0.0, 42, args.data)
    examples, _ = tokenize_records(tok, [records[i] for i in split.train], 512)
    random.Random(args.seed).shuffle(examples)
    model = adapters.attach_adapter(model, "olora", 16, 16, args.dropout, None).train()
    if layout in ("packed", "shared"):
        use_packed_attention(model)
    collate = PadCollator(tok.pad_token_id)
    total, padded = 0.0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(examples), args.batch_size):
        batch = examples[start : start + args.batch_size]
        n = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in batch)
        if layout == "padded":
            parts = [collate(batch)]
        elif layout == "single":
            parts = [collate([e]) for e in batch]
        else:
            parts = split_packed(pack(batch, share_prefix=layout == "shared"), args.pack_tokens)
        for part in parts:
            padded += part["input_ids"].numel()
            loss, _ = batch_token_losses(model, part)
            (loss.sum() / n).backward()
            total += loss.sum().item()
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    real = sum(e["length"] for e in examples)
    return {
        "layout": layout,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - c0,
        "real_tokens": real,
        "processed_tokens": padded,
        "summed_loss": total,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "sys_seconds": usage.ru_stime,
        "minor_faults": usage.ru_minflt,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="training examples [64]")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--pack_tokens", type=int, default=512, help="packed: most tokens per forward [512]")
    p.add_argument("--tuned_malloc", type=int, default=1, help="glibc keeps freed blocks (as oloraplus runs) [1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    print(
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; n={args.n}, batch {args.batch_size}, "
        f"dropout {args.dropout:g}, packs of {args.pack_tokens} tokens, tuned malloc {bool(args.tuned_malloc)}"
    )
    rows = []
    for layout in args.layouts.split(","):
        cmd = [sys.executable, __file__, "--worker", layout] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "layouts")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(
        f"{'layout':<8}{'seconds':>9}{'real tok/s':>12}{'processed':>11}{'peak RSS MiB':>14}{'sys s':>7}"
        f"{'summed loss':>14}{'speed vs ' + first['layout']:>17}"
    )
    for r in rows:
        print(
            f"{r['layout']:<8}{r['seconds']:>9.1f}{r['real_tokens'] / r['seconds']:>12.1f}{r['processed_tokens']:>11,}"
            f"{r['peak_rss_mib']:>14,.0f}{r['sys_seconds']:>7.1f}{r['summed_loss']:>14.4f}"
            f"{first['seconds'] / r['seconds']:>16.2f}x"
        )
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
