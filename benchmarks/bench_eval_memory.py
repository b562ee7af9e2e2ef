"""A run's evaluation after training, at several margins of `precision.return_freed_memory_when_grown`.

Why: evaluation after training allocates into the heap training left fragmented, and each freed hole it
touches stays resident (glibc keeps freed blocks), so a run's evaluation peaked above the same evaluation
in a fresh process. The evaluation returns freed memory once the process has grown a margin since it last
did. This runs the same `oloraplus train` (same data, seed and defaults) once per margin, each in its own
process, one after the other, and prints each run's peaks, evaluation speed and whether its test loss and
answers equal the first margin's. `never` is the code before the margin; `0` returns at every call.

    python benchmarks/bench_eval_memory.py --margins never,128,0 --n_train 300 --n_test 500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from common import DEFAULT_DATA  # noqa: E402

# one run with the margin set before anything is evaluated (the package reads it at each call)
RUN = """
import sys
import oloraplus.precision as precision
margin = sys.argv[1]
precision.EVAL_RETURN_MARGIN = 1 << 62 if margin == "never" else int(margin) << 20
from oloraplus.cli import main
sys.exit(main(sys.argv[2:]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--margins", default="never,128,0", help="MiB, comma-separated; never = no return while evaluating")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--n_train", type=int, default=300)
    ap.add_argument("--n_test", type=int, default=500)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="eval-memory-"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"}
    rows = []
    for margin in args.margins.split(","):
        run = out / f"margin-{margin}"
        cmd = [sys.executable, "-c", RUN, margin, "train", "--data", args.data, "--n_train", str(args.n_train),
               "--n_test", str(args.n_test), "--max_new_tokens", str(args.max_new_tokens), "--method", "olora+",
               "--lr_ratio", "4", "--overwrite", "--output_dir", str(run)]  # fmt: skip
        print(f"== margin {margin}: {run}", flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        kernel = (after.ru_stime - before.ru_stime) / max(
            1e-9, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        )
        metrics = json.loads((run / "metrics.json").read_text())
        answers = [json.loads(line)["prediction"] for line in (run / "predictions.jsonl").read_text().splitlines()]
        rows.append((margin, metrics, answers, kernel))
    _, first, first_answers, _ = rows[0]
    print(f"\n{'margin MiB':<12}{'peak GiB':>10}{'training':>10}{'test loss s':>13}{'answer tok/s':>14}"
          f"{'same loss':>11}{'same answers':>14}{'kernel':>9}")  # fmt: skip
    for margin, m, answers, kernel in rows:
        same = sum(a == b for a, b in zip(answers, first_answers))
        print(f"{margin:<12}{m['peak_rss_gb']:>10.3f}{m['peak_rss_gb_training']:>10.3f}{m['eval_loss_seconds']:>13.1f}"
              f"{m['generation_tokens_per_s']:>14.1f}{m['eval_loss'] == first['eval_loss']!s:>11}"
              f"{same:>9}/{len(answers)}{kernel:>9.1%}")  # fmt: skip
    print(f"(precision {first['precision']} training, {first['eval_precision']} evaluation; device {first['device']})")


if __name__ == "__main__":
    main()
