"""Where greedy answering's time goes: torch.profiler over `generation.greedy_decode`, top ops by self CPU time.

Why: goal 3 of the lean-runs issue asks 5x the answer tokens/s with the same fp32 answers. This prints
how much of the time the matmuls hold, the rate they run at (FLOPs counted by the profiler), and the
answer tokens/s a decoder would reach if everything but its matmuls took no time: the ceiling that
identical fp32 answers leave on this CPU. SmolLM2-135M (fp32 unless --bf16), the longest prompts of
the data first, as a run answers them:

    python benchmarks/profile_decode.py --n 128 --max_new_tokens 128

`--run RUN` answers with a run's base + merged adapter and its test prompts, as the run did
(benchmarks/bench_decode_batch.py's prompts). `--steps A:B` profiles decode steps A to B-1 alone (the
prefills and every other step run unprofiled): one stretch of a whole 500-prompt decode at the rows it
really carries, where profiling all of it holds every event in memory (past 24 GB at 192 prompts).

    python benchmarks/profile_decode.py --run RUN --n 500 --steps 150:190 --rows 30
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

from bench_decode_batch import TimedForwards, answering_model, test_records  # noqa: E402
from common import DEFAULT_DATA  # noqa: E402

from oloraplus.config import EvalConfig  # noqa: E402
from oloraplus.data import load_records, prompt_ids  # noqa: E402
from oloraplus.generation import greedy_decode  # noqa: E402
from oloraplus.models import decoder_and_head  # noqa: E402
from oloraplus.precision import autocast_context, lean_process, store_frozen_weights_bf16  # noqa: E402

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
    p.add_argument("--n", type=int, default=128, help="prompts (the first n records; with --run the test split of n)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument(
        "--batch_size", type=int, default=EvalConfig().eval_batch_size, help="the eval batch size [the run's default]"
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, frozen weights stored in bf16")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--run", help="a run folder: its base + merged adapter, its test prompts [the base model]")
    p.add_argument("--steps", help="A:B, profile decode steps A to B-1 alone (counted from 1) [every step]")
    a = p.parse_args()
    lean_process()
    model, tok = answering_model(a.run)
    records = test_records(a.data, a.n) if a.run else load_records(a.data)[: a.n]
    model.eval().requires_grad_(False)
    if a.bf16:
        store_frozen_weights_bf16(model)
    prompts = sorted((prompt_ids(tok, r) for r in records), key=lambda q: -len(q))
    prof = profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True)
    first, end = map(int, a.steps.split(":")) if a.steps else (0, 0)
    forwards = TimedForwards(model)
    window = {"on": False, "prefills": 0}

    def start_window(_, args, kwargs):  # before the step's timing starts (prepended)
        if kwargs["input_ids"].shape[1] == 1 and len(forwards.decode_steps()) + 1 == first:
            prof.start()
            window["on"] = True

    def stop_window(_, args, kwargs, output):  # after the step's timing ends
        if window["on"] and len(forwards.decode_steps()) == end - 1:
            prof.stop()
            window["on"] = False

    def prefill(_, args, kwargs):  # a refill inside the window: its matmuls are in the profile too
        ids = kwargs.get("input_ids", args[0] if args else None)
        window["prefills"] += window["on"] and ids is not None and ids.shape[1] > 1

    hooks = [
        model.register_forward_pre_hook(start_window, with_kwargs=True, prepend=True),
        model.register_forward_hook(stop_window, with_kwargs=True),
        decoder_and_head(model)[0].register_forward_pre_hook(prefill, with_kwargs=True),
    ]
    with autocast_context(model, a.bf16):
        if not a.steps:
            prof.start()
        start = time.perf_counter()
        answers = greedy_decode(model, prompts, a.max_new_tokens, tok.eos_token_id, tok.pad_token_id, a.batch_size)
        seconds = time.perf_counter() - start
        if not a.steps:
            prof.stop()
    for hook in hooks:
        hook.remove()
    forwards.remove()
    tokens = sum(len(x) for x in answers)
    if a.steps:  # the window's own: the answer tokens its steps produced, in the time they took
        steps = forwards.decode_steps()[first - 1 : end - 1]
        rows, in_steps = sum(step[0] for step, _ in steps), sum(t for _, t in steps)
        print(
            f"decode steps {first} to {end - 1}: {rows / len(steps):.1f} rows a step, "
            f"{1000 * in_steps / len(steps):.1f} ms a step under the profiler, {window['prefills']} "
            f"prefills among them (profiled too, not timed); the whole decode {tokens} tokens in {seconds:.1f} s"
        )
        tokens, seconds = rows, in_steps
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
