"""Greedy decoding at several batch sizes: this checkout's decoder against the one of an earlier revision.

Why: the answers are most of a run's evaluation time on a CPU, and how many rows a decode
step carries decides what it costs per token. The earlier decoder (by default the revision
before the running batch was refilled) drops finished rows but never refills, so its
batches empty out; ours refills them. Same model (SmolLM2-135M, fp32), same prompts, one
process; prints tokens/s per side and batch size, how many answers equal the earlier
decoder's, and per side the decode steps, the rows each carried, the share of padding in the cache
positions they attended over, and the seconds spent in decode steps against the rest (prefills and
the decoder's own work between steps). `--by_rows` adds, per side, the decode steps' time and
answer tokens/s by the rows they carried: where a schedule loses, and what a step costs at its rows.
`--splits 0,0.9` runs ours at each share `generation.SPLIT` (when a refill's prompts start a row group of their own).

    python benchmarks/bench_decode_batch.py --n 64 --batch_sizes 16,32,64 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from common import DEFAULT_DATA, machine_line  # noqa: E402

from oloraplus import generation  # noqa: E402
from oloraplus.data import load_records, split_indices  # noqa: E402
from oloraplus.models import load_base  # noqa: E402
from oloraplus.prepare import load_tuned  # noqa: E402


def decoder_of(rev: str):
    """generation.py as it was at `rev`, imported as its own module."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:src/oloraplus/generation.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "generation_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("generation_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="test prompts (the first N of our test split) [64]")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_sizes", default="16,32,64", help="our batch sizes [16,32,64]")
    p.add_argument("--before_rev", default="742440f", help="revision of the earlier decoder [742440f]")
    p.add_argument("--before_batch_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--run", help="a run folder: answer with its base + merged adapter, as the run did [the base model]")
    p.add_argument("--repeats", type=int, default=1, help="tries of every side, interleaved [1]")
    p.add_argument("--by_rows", action="store_true", help="per side, decode steps' time by the rows they carried")
    p.add_argument(
        "--splits", help="ours at each generation.SPLIT given (0: every refill one row group) [the checkout's]"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    test = test_records(args.data, args.n)
    model, tok = answering_model(args.run)
    before = decoder_of(args.before_rev)
    generation.generate_answers(model, tok, test[:2], 4, 2)  # warm-up
    sides = [("before", before, args.before_batch_size, None)]
    splits = [float(s) for s in args.splits.split(",")] if args.splits else [generation.SPLIT]
    sides += [("ours", generation, int(b), split) for b in args.batch_sizes.split(",") for split in splits]
    reference = None
    forwards = TimedForwards(model)
    for name, module, batch, split in sides * args.repeats:
        if split is not None:
            generation.SPLIT = split
            name = f"ours split {split:g}" if args.splits else name
        forwards.records.clear()
        t0 = time.perf_counter()
        answers, tokens = module.generate_answers(model, tok, test, args.max_new_tokens, batch)
        seconds = time.perf_counter() - t0
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference))
        timed = forwards.decode_steps()
        decode = [s for s, _ in timed]
        rows, held, real = (sum(s[k] for s in decode) for k in range(3))
        in_steps = sum(t for _, t in timed)
        print(
            f"{name:<7} batch {batch:>3}: {seconds:7.1f} s  {tokens:6d} tokens  {tokens / seconds:6.1f} tokens/s  "
            f"answers equal to before's: {same}/{len(answers)}  decode steps {len(decode)}, "
            f"{rows / len(decode):.1f} rows each, padding {1 - real / held:.0%} of the positions attended; "
            f"{in_steps:.1f} s in decode steps, {seconds - in_steps:.1f} s in prefills and between steps",
            flush=True,
        )
        if args.by_rows:
            print_by_rows(timed)
    forwards.remove()
    return 0


def test_records(data: str, n: int) -> list[dict[str, str]]:
    """The test prompts the decode benchmarks share: a test split of `n` records (seed 42, no training split)."""
    records = load_records(data)
    return [records[i] for i in split_indices(len(records), 0, n, 0.0, 42, data).test]


def answering_model(run: str | None):
    """(model, tokenizer) to answer with: a run's base + merged adapter, as the run answered; else the base model."""
    return load_tuned(run)[:2] if run else load_base("smollm2-135m")


class TimedForwards:
    """Every forward of `model` while attached, timed by hooks: [decode_step of its inputs (None: a prefill), seconds].

    The packed prefill calls the decoder, not the model, so its time is outside every record."""

    def __init__(self, model: torch.nn.Module):
        self.records: list[list] = []
        self._hooks = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            model.register_forward_hook(self._end),
        ]

    def _start(self, _, args, kwargs) -> None:
        self.records.append([decode_step(kwargs), -time.perf_counter()])

    def _end(self, *_) -> None:
        self.records[-1][1] += time.perf_counter()

    def decode_steps(self) -> list[tuple[tuple[int, int, int], float]]:
        """(rows, positions attended, real positions) and seconds of each decode step so far."""
        return [(step, seconds) for step, seconds in self.records if step]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def print_by_rows(timed: list[tuple[tuple[int, int, int], float]], width: int = 16) -> None:
    """Decode steps grouped by the rows they carried: steps, seconds, ms a step, answer tokens/s."""
    buckets: dict[int, list[float]] = {}
    for (rows, _, _), seconds in timed:
        b = buckets.setdefault(rows // width * width, [0, 0.0, 0])
        b[0], b[1], b[2] = b[0] + 1, b[1] + seconds, b[2] + rows
    for low, (n, seconds, rows) in sorted(buckets.items()):
        print(
            f"    rows {low:>3}-{low + width - 1:>3}: {n:4d} steps {seconds:6.1f} s  {1000 * seconds / n:6.1f} ms a step"
            f"  {rows / seconds:6.1f} tokens/s"
        )


def decode_step(kwargs: dict) -> tuple[int, int, int] | None:
    """(rows, cache positions attended, of which real tokens) of a decode step; None for a prefill.

    One cache for all rows: its 2D mask says it all. Row groups (generation.RowGroup): each group's mask."""
    if kwargs["input_ids"].shape[1] != 1:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the earlier revisions' transformers named it so
    masks = [g.mask for g in generation.step_row_groups(cache)] or [kwargs["attention_mask"]]
    return sum(len(m) for m in masks), sum(m.numel() for m in masks), sum(int(m.sum()) for m in masks)


if __name__ == "__main__":
    sys.exit(main())
