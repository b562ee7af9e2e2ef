"""What the benchmark scripts share: where the Alpaca sample is by default, the line naming the machine, and
which part of the model an [M, K] x [K, N] matmul belongs to."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# $OLORAPLUS_DATA, else the sample beside the checkout (never committed: CC BY-NC 4.0)
DEFAULT_DATA = os.environ.get("OLORAPLUS_DATA") or str(
    REPO.parent / "shared" / "data" / "alpaca" / "alpaca_sample.json"
)


def machine_line() -> str:
    """The device as a run records it (precision.device_name), torch's threads and the load average: every figure
    is read with them."""
    import torch

    from oloraplus.precision import device_name  # late: each script puts the src it measures on the path first

    return f"{device_name()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"


def matmul_kind(m: int, k: int, n: int) -> str:
    """The part of the model: head (a vocabulary-sized dimension), adapter (a rank-sized one, at most 64) or base."""
    if max(m, k, n) >= 32768:
        return "head"
    return "adapter" if min(m, k, n) <= 64 else "base"
