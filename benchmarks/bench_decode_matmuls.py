"""The decode step's matmul shapes, fp32, MKL's sgemm (`F.linear`) against oneDNN's inner product on a weight
packed once into its layout (`generation.onednn_forward`), in GFLOP/s, with a square matmul for scale.

Why: on Zen 4 `profile_decode.py` put answering's matmuls at 82 GFLOP/s, half a square matmul's rate; this
shows which shapes lose it and whether oneDNN keeps it (SmolLM2-135M: hidden 576, k/v 192, MLP 1,536, vocabulary
49,152; rows = the running batch). The gaps chose `generation.onednn_linears_pay`:

    python benchmarks/bench_decode_matmuls.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from bench_train import matmul_peak  # noqa: E402

from oloraplus.generation import onednn_forward  # noqa: E402
from oloraplus.precision import cpu_info  # noqa: E402

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152))  # (in, out) of SmolLM2's Linears


def gflops(step, flops: float, seconds: float = 1.0) -> float:
    step()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def side_by_side(x: torch.Tensor, linear: torch.nn.Linear) -> tuple[float, float, float]:
    """GFLOP/s of MKL and of oneDNN on `linear(x)`, and how far their outputs differ."""
    onednn, flops = onednn_forward(linear), 2 * x.shape[0] * linear.in_features * linear.out_features
    diff = (onednn(x) - F.linear(x, linear.weight)).abs().max().item()
    return gflops(lambda: F.linear(x, linear.weight), flops), gflops(lambda: onednn(x), flops), diff


@torch.no_grad()
def main() -> int:
    torch.manual_seed(0)
    info = cpu_info()
    print(f"{info.get('model name', '?')} family {info.get('cpu family', '?')}, {torch.get_num_threads()} threads")
    print(f"square 2048 x 2048 matmul (best of ~3 s): {matmul_peak()[0] / 1e9:.0f} GFLOP/s")
    print(f"{'rows':>5} {'in':>5} {'out':>6} {'MKL':>6} {'oneDNN':>7}  max |diff|")
    for rows in (64, 128, 256):
        for k, n in SHAPES:
            mkl, dnn, diff = side_by_side(torch.randn(rows, k), torch.nn.Linear(k, n, bias=False))
            print(f"{rows:>5} {k:>5} {n:>6} {mkl:>6.0f} {dnn:>7.0f}  {diff:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
