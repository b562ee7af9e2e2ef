"""Where greedy answering's time goes: torch.profiler over `generation.greedy_decode`, top ops by self CPU time.

Why: goal 3 of the lean-runs issue asks 5x the answer tokens/s with the same fp32 answers. This prints
how much of the time the matmuls hold, the rate they run at (FLOPs counted by the profiler), and the
answer tokens/s a decoder would reach if everything but its matmuls took no time: the ceiling that
identical fp32 answers leave on this CPU. SmolLM2-135M (fp32 unless --bf16), the longest prompts of
the data first, as a run answers them:

    python benchmarks/profile_decode.py --n 128 --max_new_tokens 128 --batch_size 64
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from oloraplus.data import load_records, prompt_ids  # noqa: E402
from oloraplus.generation import greedy_decode  # noqa: E402
from oloraplus.models import load_base  # noqa: E402
from oloraplus.precision import autocast_context, lean_process, store_frozen_weights_bf16  # noqa: E402

DEFAULT_DATA = os.environ.get("OLORAPLUS_DATA") or str(
    REPO.parent / "shared" / "data" / "alpaca" / "alpaca_sample.json"
)
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
PACKED_LINEAR = "mkldnn::_linear_pointwise"  # generation.linears_in_onednn: the profiler counts no FLOPs for it


def packed_linear_flops(prof) -> float:
    """FLOPs of the oneDNN Linears, from their recorded shapes: input [..., in], packed weight [out, in]."""
    flops = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == PACKED_LINEAR:
            x, w = e.input_shapes[0], e.input_shapes[1]
            flops += 2 * e.count * math.prod(x) * w[0]
    return flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--n", type=int, default=128, help="prompts (the first n records)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=64, help="the eval batch size (the run's default)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, frozen weights stored in bf16")
    p.add_argument("--rows", type=int, default=15)
    a = p.parse_args()
    lean_process()
    model, tok = load_base("smollm2-135m")
    model.eval().requires_grad_(False)
    if a.bf16:
        store_frozen_weights_bf16(model)
    prompts = sorted((prompt_ids(tok, r) for r in load_records(a.data)[: a.n]), key=lambda q: -len(q))
    with (
        profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof,
        autocast_context(model, a.bf16),
    ):
        start = time.perf_counter()
        answers = greedy_decode(model, prompts, a.max_new_tokens, tok.eos_token_id, tok.pad_token_id, a.batch_size)
        seconds = time.perf_counter() - start
    tokens = sum(len(x) for x in answers)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = [e for e in events if e.key in MATMULS or e.key == PACKED_LINEAR]
    mm_s, mm_flops = sum(e.self_cpu_time_total for e in mm) / 1e6, sum(e.flops for e in mm) + packed_linear_flops(prof)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(
        f"{a.n} prompts, {tokens} answer tokens in {seconds:.1f} s under the profiler: {tokens / seconds:.1f} tokens/s"
    )
    print(f"matmuls: {mm_s:.1f} s of {total:.1f} s self CPU ({mm_s / total:.0%}), {mm_flops / mm_s / 1e9:.1f} GFLOP/s")
    print(f"if only the matmuls took time: {tokens / mm_s:.1f} answer tokens/s ({seconds / mm_s:.2f}x today's)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
