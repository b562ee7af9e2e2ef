"""The test-loss phase with MKL's sgemm against oneDNN's inner product for the Linears, side by side.

Why: on an fp32 Zen 3 CPU the test loss of the protocol (500 test examples, forward only) takes about two minutes
of a whole run, and its Linears run at M = a packed batch's tokens, where MKL's sgemm ran the MLP projections and
the LM head slower than oneDNN on a weight packed once (generation.linears_in_onednn, answering's default there).
The test loss is not an answer: oneDNN moves it by float rounding only, which the issue's 1e-4 bounds. This times
`evaluate.example_losses` on a run's model (base + merged adapter, as the run evaluates it) with each choice of
its `onednn` (`generation.linears_in_onednn`'s), alternating, and prints the seconds, the corpus loss and how far each moved from the first:

    python benchmarks/bench_test_loss.py --run RUN --n 500 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from bench_decode_batch import answering_model, test_records  # noqa: E402
from common import DEFAULT_DATA, machine_line  # noqa: E402

from oloraplus.config import EvalConfig  # noqa: E402
from oloraplus.evaluate import corpus_loss, example_losses  # noqa: E402
from oloraplus.precision import lean_process  # noqa: E402

CHOICES = ("none", "head", "all")  # none: MKL for every Linear


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a run folder: its base + merged adapter [the base model]")
    p.add_argument("--n", type=int, default=128, help="test examples (our test split of n) [128]")
    p.add_argument(
        "--batch_size", type=int, default=EvalConfig().eval_batch_size, help="the eval batch size [the run's default]"
    )
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="tries of each choice, interleaved [2]")
    p.add_argument("--onednn", default="none,all", help=f"linears_in_onednn choices, in order, of {CHOICES}")
    p.add_argument("--data", default=DEFAULT_DATA)
    args = p.parse_args(argv)
    choices = args.onednn.split(",")
    if unknown := [c for c in choices if c not in CHOICES]:
        print(f"--onednn: unknown {', '.join(unknown)} (known: {', '.join(CHOICES)})", file=sys.stderr)
        return 2
    lean_process()
    print(machine_line())
    model, tok = answering_model(args.run)
    model.eval().requires_grad_(False)
    records = test_records(args.data, args.n)
    first = None
    for attempt in range(args.repeats):
        for choice in choices:
            t0 = time.perf_counter()
            losses = example_losses(model, tok, records, args.max_length, args.batch_size, onednn=choice)
            seconds = time.perf_counter() - t0
            tokens = sum(n for _, n in losses)
            loss = corpus_loss(losses)
            first = first or (loss, losses)
            worst = max(abs(s / n - a / m) for (s, n), (a, m) in zip(losses, first[1]) if n and m)
            print(
                f"try {attempt + 1} onednn={choice:<4} {seconds:6.1f} s  test loss {loss:.10f}"
                f"  ({(loss - first[0]) / first[0]:+.1e} relative to the first)  worst example {worst:.1e}"
                f"  ({tokens} response tokens)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
