"""Where a training step's time goes: torch.profiler over optimizer steps 4-12 of `oloraplus train`, top ops by self CPU time.

Why: a speed goal needs to know which ops hold the time before anything is changed (matmuls,
attention, casts, element-wise ops). Steps 1-3 are left out (allocation and first-call set-up);
the process exits after step 12. After the table, the matmuls' time and GFLOP/s by kind: the frozen base's
projections, the adapters' (a rank-sized dimension: small, so far from the peak), the LM head. Extra arguments
go to `oloraplus train`, for example the precision:

    python benchmarks/profile_train.py --precision bf16
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from common import DEFAULT_DATA, matmul_kind  # noqa: E402

from oloraplus import train  # noqa: E402
from oloraplus.cli import main  # noqa: E402

FIRST, LAST, ROWS = 4, 12, 40


LABELS = {"head": "LM head", "adapter": "adapters (a dim <= 64)", "base": "base projections"}


def matmul_label(shapes: list[list[int]]) -> str:
    (m, k), (_, n) = shapes[:2]
    return LABELS[matmul_kind(m, k, n)]


def print_matmuls_by_kind(profiler) -> None:
    """aten::mm's self time and rate per kind, from the recorded [M, K] x [K, N] shapes."""
    kinds: dict[str, list[float]] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        shapes = event.input_shapes
        if event.key != "aten::mm" or len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
            continue
        total = kinds.setdefault(matmul_label(shapes), [0.0, 0.0])  # self seconds, FLOPs
        total[0] += event.self_cpu_time_total / 1e6
        total[1] += 2 * shapes[0][0] * shapes[0][1] * shapes[1][1] * event.count
    for kind, (seconds, flops) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"mm, {kind}: {seconds:.2f} s self CPU, {flops / seconds / 1e9:.1f} GFLOP/s")


def profiled_training_step():
    original = train.OLoRAPlusTrainer.training_step
    state = {"step": 0}

    def step(self, model, inputs, num_items_in_batch=None):
        state["step"] += 1
        if state["step"] == FIRST:
            state["t0"], state["profiler"] = (
                time.perf_counter(),
                profile(activities=[ProfilerActivity.CPU], record_shapes=True),
            )
            state["profiler"].__enter__()
        out = original(self, model, inputs, num_items_in_batch)
        if state["step"] == LAST:
            state["profiler"].__exit__(None, None, None)
            print(f"steps {FIRST}-{LAST}: {time.perf_counter() - state['t0']:.1f} s, load {os.getloadavg()[0]:.2f}")
            print(state["profiler"].key_averages().table(sort_by="self_cpu_time_total", row_limit=ROWS), flush=True)
            print_matmuls_by_kind(state["profiler"])
            os._exit(0)
        return out

    return step


if __name__ == "__main__":
    train.OLoRAPlusTrainer.training_step = profiled_training_step()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "oloraplus-profile-train"
    common = ["train", "--data", DEFAULT_DATA, "--n_train", "200", "--n_test", "8", "--max_new_tokens", "8"]
    common += ["--method", "olora+", "--lr_ratio", "4", "--output_dir", str(out), "--overwrite"]
    sys.exit(main(common + sys.argv[1:]))
