"""Training forward + backward with the packed attention as one autograd node (per-example-attention.patch)
against the autograd graph of slices and concatenations it replaced, interleaved on the same packs, bf16 autocast.

Tried on 2026-12-08 and not kept (docs/benchmarks.md, "Zen 4: where bf16 training's time goes without the
profiler"). From the repository root: git apply docs/results/bench-lean-zen4/tried-training/per-example-attention.patch, then
    python docs/results/bench-lean-zen4/tried-training/bench_attention_node.py 4
"""

import random
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "src")
from common import DEFAULT_DATA

from oloraplus import packing
from oloraplus.adapters import attach_adapter
from oloraplus.data import tokenize_records
from oloraplus.loss import batch_token_losses
from oloraplus.models import load_base
from oloraplus.packing import PackCollator, split_packed, use_packed_attention
from oloraplus.precision import autocast_context, lean_process, store_frozen_weights_bf16
from oloraplus.records import load_records

lean_process()
model, tok = load_base("smollm2-135m")
recs = load_records(DEFAULT_DATA)
chosen = random.Random(0).sample(range(len(recs)), 64)
ex, _ = tokenize_records(tok, [recs[i] for i in chosen], 512)
model = attach_adapter(model, "olora", 16, 16.0, 0.0, None)
store_frozen_weights_bf16(model)
use_packed_attention(model)
model.train()
batches = [p for i in range(0, 64, 8) for p in split_packed(PackCollator()(ex[i : i + 8]), 512)]
labelled = [int((b["labels"] != -100).sum()) for b in batches]
packed = sum(int(b["input_ids"].numel()) for b in batches)
real = packing._PerExampleAttention.apply


def old_apply(q, k, v, segs, prefix, scale):
    from functools import partial

    import torch.nn.functional as F

    sdpa = partial(F.scaled_dot_product_attention, dropout_p=0.0, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return packing._causal_per_example(sdpa, q, k, v, list(segs), prefix)


def step(b, n):
    model.zero_grad(set_to_none=True)
    with autocast_context(model, True):
        tl, _ = batch_token_losses(model, b)
    (tl.sum() / n).backward()


V = {"old": old_apply, "new": real}
rates = {k: [] for k in V}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    sec = dict.fromkeys(V, 0.0)
    for k, (b, n) in enumerate(zip(batches, labelled)):
        for name in list(V) if (r + k) % 2 == 0 else list(reversed(V)):
            packing._PerExampleAttention.apply = V[name]
            t = time.perf_counter()
            step(b, n)
            sec[name] += time.perf_counter() - t
    for name in V:
        rates[name].append(packed / sec[name])
    print(r, {n: f"{rates[n][-1]:.1f}" for n in V}, flush=True)
m = {n: statistics.median(v) for n, v in rates.items()}
print("median", m, f"new/old {m['new'] / m['old']:.3f}x")
