"""What the benchmark scripts share: where the Alpaca sample is by default, and the line naming the machine."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# $OLORAPLUS_DATA, else the sample beside the checkout (never committed: CC BY-NC 4.0)
DEFAULT_DATA = os.environ.get("OLORAPLUS_DATA") or str(
    REPO.parent / "shared" / "data" / "alpaca" / "alpaca_sample.json"
)


def machine_line() -> str:
    """The CPU (name, family, model), torch's threads and the load average: every figure is read with them."""
    import torch

    from oloraplus.precision import cpu_info  # late: each script puts the src it measures on the path first

    info = cpu_info()
    return (
        f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}), "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
