"""What a training step's matmuls and attention kernels cost alone: recorded in real steps, replayed without them.

Why: torch.profiler counts small ops at several times their cost (profiled steps ran about 2x slower), so its
shares overstate what lies outside the kernels: two changes aimed at those ops measured nothing
(docs/benchmarks.md, "Zen 4: where bf16 training's time goes without the profiler"). This records every
matmul and CPU flash attention kernel (forward and backward) of `--steps` training steps of SmolLM2-135M with
an OLoRA adapter on packed Alpaca batches, as `oloraplus train` runs them, then in each round times the same
steps again and replays each recorded kernel on fresh tensors of its shapes, strides and dtype. It prints the replayed seconds and rate
of the frozen base's matmuls, the adapters' (a dimension of at most 64) and the LM head's, the attention
kernels', and what is left of the real steps' time. Fresh tensors miss the caches the real step has warm, so
a replay errs on the slow side:

    python benchmarks/replay_train_kernels.py --precision bf16
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from common import DEFAULT_DATA, machine_line, matmul_kind  # noqa: E402

from oloraplus.adapters import attach_adapter  # noqa: E402
from oloraplus.data import tokenize_records  # noqa: E402
from oloraplus.loss import batch_token_losses  # noqa: E402
from oloraplus.models import load_base  # noqa: E402
from oloraplus.packing import PackCollator, split_packed, use_packed_attention  # noqa: E402
from oloraplus.precision import autocast_context, lean_process, store_frozen_weights_bf16  # noqa: E402
from oloraplus.records import load_records  # noqa: E402

aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.addmm.default)
ATTENTION = (
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
)


class RecordKernels(TorchDispatchMode):
    """Each matmul and attention call's op and its arguments' shapes, strides and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS or func in ATTENTION:
            self.calls.append((func, [_describe(a) for a in args], {k: _describe(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype)
    return ("value", value)


def _fresh(described):
    if described[0] == "value":
        return described[1]
    _, shape, stride, dtype = described
    tensor = torch.empty_strided(shape, stride, dtype=dtype)
    return tensor.normal_(0, 0.5) if dtype.is_floating_point else tensor.zero_()


def kind_and_flops(func, args) -> tuple[str, int]:
    """base / adapter / head (common.matmul_kind), and the call's FLOPs."""
    x, w = (args[1], args[2]) if func is aten.addmm.default else (args[0], args[1])
    m, k, n = x.shape[0], x.shape[1], w.shape[1]
    return matmul_kind(m, k, n), 2 * m * k * n


def replay(calls) -> dict[str, list[float]]:
    """Seconds (and FLOPs for matmuls) per kind, each kernel run once on fresh tensors."""
    totals: dict[str, list[float]] = {}
    for func, args, kwargs in calls:
        a, k = [_fresh(d) for d in args], {name: _fresh(d) for name, d in kwargs.items()}
        t0 = time.perf_counter()
        func(*a, **k)
        seconds = time.perf_counter() - t0
        kind, flops = kind_and_flops(func, a) if func in MATMULS else ("attention", 0)
        entry = totals.setdefault(kind, [0.0, 0.0])
        entry[0] += seconds
        entry[1] += flops
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=6, help="training steps recorded and timed each round [6]")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--micro_batch_tokens", type=int, default=512, help="packs of at most this many tokens [512]")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    bf16 = a.precision == "bf16"
    lean_process()
    model, tokenizer = load_base(a.model)
    records = load_records(a.data)
    chosen = random.Random(a.seed).sample(range(len(records)), a.batch_size * (a.steps + 1))
    examples, _ = tokenize_records(tokenizer, [records[i] for i in chosen], 512)
    model = attach_adapter(model, "olora", 16, 16.0, 0.0, None)
    if bf16:
        store_frozen_weights_bf16(model)
    use_packed_attention(model)
    model.train()
    collate = PackCollator()
    steps = [
        split_packed(collate(examples[i : i + a.batch_size]), a.micro_batch_tokens)
        for i in range(0, len(examples), a.batch_size)
    ]
    warm_up, steps = steps[0], steps[1:]

    def step(packs) -> None:  # as OLoRAPlusTrainer: each pack's loss over the whole batch's labelled tokens
        model.zero_grad(set_to_none=True)
        labelled = sum(int((pack["labels"] != -100).sum()) for pack in packs)
        for pack in packs:
            with autocast_context(model, bf16):
                token_loss, _ = batch_token_losses(model, pack)
            (token_loss.sum() / labelled).backward()

    step(warm_up)
    recorder = RecordKernels()
    with recorder:
        for packs in steps:
            step(packs)
    print(f"{machine_line()}; {a.precision}, {len(steps)} steps of {a.batch_size}, {len(recorder.calls)} kernels")
    for r in range(a.rounds):
        t0 = time.perf_counter()
        for packs in steps:
            step(packs)
        real = time.perf_counter() - t0
        totals = replay(recorder.calls)
        parts = [
            f"{kind} {s:.2f} s ({s / real:.0%})" + (f" at {f / s / 1e9:.0f} GFLOP/s" if f else "")
            for kind, (s, f) in sorted(totals.items(), key=lambda kv: -kv[1][0])
        ]
        rest = real - sum(s for s, _ in totals.values())
        print(
            f"round {r + 1}: real steps {real:.2f} s; replayed: " + ", ".join(parts) + f"; the rest {rest:.2f} s "
            f"({rest / real:.0%})",
            flush=True,
        )


if __name__ == "__main__":
    main()
