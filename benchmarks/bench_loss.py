"""Training step, stock causal-LM loss vs our response-only loss (`oloraplus.loss`), side by side.

Why: the stock forward runs the LM head (SmolLM2-135M: 49k-wide, 28M of 135M matmul
parameters) on every position, prompt and padding included, then masks most of the
logits away. Ours gathers the labelled positions first. This isolates that one change:
same model, same OLoRA adapter (dropout 0, so both sides compute the same function),
same length-grouped batches, forward + backward, the two losses alternating batch by
batch so that load on the machine hits both alike. It checks the losses agree and
prints the time ratio, and counts (does not measure) the float32 logits each side holds.

    python benchmarks/bench_loss.py                     # 64 training examples, batches of 8, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from common import DEFAULT_DATA  # noqa: E402

from oloraplus import adapters  # noqa: E402
from oloraplus.data import IGNORE_INDEX, PadCollator, load_records, split_indices, tokenize_records  # noqa: E402
from oloraplus.loss import response_token_losses  # noqa: E402
from oloraplus.models import load_base  # noqa: E402


def stock_loss(model, batch):
    return model(**batch).loss


def ours_loss(model, batch):
    token_loss, _ = response_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return token_loss.mean()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="training examples (the first N of our training split) [64]")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="passes over the batches, each side per batch [2]")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default) [0]")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    records = load_records(args.data)
    train = [records[i] for i in split_indices(len(records), args.n, 0, 0.0, 42, args.data).train]
    model, tok = load_base(args.model)
    model = adapters.attach_adapter(model, "olora", 16, 16.0, 0.0, None).train()
    examples, _ = tokenize_records(tok, train, 512)
    examples.sort(key=lambda e: e["length"])  # length-grouped, as our training batches are
    collate = PadCollator(tok.pad_token_id)
    batches = [collate(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]

    positions = sum(b["input_ids"].numel() for b in batches)
    labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    vocab = model.get_base_model().get_output_embeddings().out_features
    sides = {"stock": stock_loss, "ours": ours_loss}
    seconds = {k: 0.0 for k in sides}
    worst = 0.0
    ours_loss(model, batches[0]).backward()  # warm-up, untimed
    for _ in range(args.rounds):
        for batch in batches:
            losses = {}
            for name, fn in sides.items():
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = fn(model, batch)
                loss.backward()
                seconds[name] += time.perf_counter() - t0
                losses[name] = loss.item()
            worst = max(worst, abs(losses["ours"] - losses["stock"]) / abs(losses["stock"]))

    print(
        f"\n{len(examples)} examples in {len(batches)} batches of {args.batch_size}, {args.rounds} rounds, "
        f"forward + backward, OLoRA r=16 (dropout 0)"
    )
    print(f"positions {positions:,}, labelled (response) positions {labelled:,} ({labelled / positions:.1%})")
    print(
        f"stock loss: {seconds['stock']:.1f} s, ours: {seconds['ours']:.1f} s -> ours is "
        f"{seconds['stock'] / seconds['ours']:.2f}x as fast"
    )
    print(f"largest relative loss difference ours vs stock: {worst:.1e}")
    largest = max(batches, key=lambda b: b["input_ids"].numel())
    largest_labelled = int((largest["labels"][:, 1:] != IGNORE_INDEX).sum())
    print(
        f"fp32 logits of the largest batch (counted, one copy): stock {largest['input_ids'].numel() * vocab * 4 / 2**20:,.0f} MiB, "
        f"ours {largest_labelled * vocab * 4 / 2**20:,.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
