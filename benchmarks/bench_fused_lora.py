"""PEFT's LoRA layers against fused_lora's, training steps side by side in one process on the same packed batches.

Why: fused_lora.py replaces PEFT's plain fp32 LoRA forward and backward with one op per layer, to cut the
passes over each layer's [tokens x out] output that the adapter adds. This times forward + backward of
SmolLM2-135M with an OLoRA adapter (r 16, alpha 16, every projection) on packed batches of real Alpaca
examples, as `oloraplus train` builds them, each batch once with PEFT's layers and once with the fused
class, back to back, and prints the packed tokens/s of each (a shared prompt prefix counted once), their ratio,
and whether the fused loss and gradients are PEFT's bits:

    python benchmarks/bench_fused_lora.py --n_train 64 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from common import DEFAULT_DATA  # noqa: E402

from oloraplus.adapters import attach_adapter  # noqa: E402
from oloraplus.data import tokenize_records  # noqa: E402
from oloraplus.fused_lora import use_fused_lora  # noqa: E402
from oloraplus.loss import batch_token_losses  # noqa: E402
from oloraplus.models import load_base  # noqa: E402
from oloraplus.packing import PackCollator, can_pack, use_packed_attention  # noqa: E402
from oloraplus.precision import cpu_info, lean_process  # noqa: E402
from oloraplus.records import load_records  # noqa: E402

VARIANTS = {"peft": False, "fused": True}


def step(model, batch, tokens: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward as OLoRAPlusTrainer runs it (token losses summed over the batch's labelled tokens)."""
    model.zero_grad(set_to_none=True)
    token_loss, _ = batch_token_losses(model, batch)
    loss = token_loss.sum() / tokens
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n_train", type=int, default=64, help="training examples, drawn at random from the data [64]")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every batch once each way [3]")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    lean_process()
    info = cpu_info()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}), "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    model, tokenizer = load_base(a.model)
    records = load_records(a.data)
    chosen = random.Random(a.seed).sample(range(len(records)), a.n_train)
    examples, _ = tokenize_records(tokenizer, [records[i] for i in chosen], a.max_length)
    model = attach_adapter(model, "olora", a.rank, a.alpha, 0.0, None)
    if can_pack(model, a.max_length):
        use_packed_attention(model)
    collate = PackCollator()
    batches = [collate(examples[i : i + a.batch_size]) for i in range(0, len(examples), a.batch_size)]
    labelled = [int((b["labels"] != -100).sum()) for b in batches]
    packed = sum(int(b["input_ids"].numel()) for b in batches)
    model.train()

    # the same first batch both ways: the fused loss and gradients against PEFT's
    results = {}
    for name, fused in VARIANTS.items():
        use_fused_lora(model, fused)
        loss, grads = step(model, batches[0], labelled[0])
        results[name] = (loss, {k: g.clone() for k, g in grads.items()})
    (loss_p, grads_p), (loss_f, grads_f) = results["peft"], results["fused"]
    same = sum(torch.equal(grads_f[k], grads_p[k]) for k in grads_p)
    gap = max(float((grads_f[k] - grads_p[k]).abs().max() / grads_p[k].abs().max()) for k in grads_p)
    print(
        f"{len(examples)} examples, {len(batches)} packed batches of {a.batch_size}, {packed:,} tokens a round; "
        f"first batch: loss peft {loss_p.item():.10f}, fused {loss_f.item():.10f} "
        f"({'the same bits' if torch.equal(loss_p, loss_f) else 'differ'}); "
        f"gradients: {same} of {len(grads_p)} the same bits, largest gap {gap:.1e} of a tensor's largest entry"
    )
    del results, grads_p, grads_f

    # each batch runs both ways back to back, who goes first alternating: the host's speed drifts by more
    # than the gap over a round (seen on Zen 3), much less over one batch
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(a.rounds):
        seconds = dict.fromkeys(VARIANTS, 0.0)
        for k, (batch, tokens) in enumerate(zip(batches, labelled)):
            order = list(VARIANTS) if (r + k) % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                use_fused_lora(model, VARIANTS[name])
                t0 = time.perf_counter()
                step(model, batch, tokens)
                seconds[name] += time.perf_counter() - t0
        for name in VARIANTS:
            rates[name].append(packed / seconds[name])
        print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in VARIANTS) + " packed tokens/s")
    med = {n: statistics.median(v) for n, v in rates.items()}
    print(
        f"median packed tokens/s (forward + backward): peft {med['peft']:.1f}, fused {med['fused']:.1f} "
        f"-> fused/peft {med['fused'] / med['peft']:.3f}x; "
        f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
