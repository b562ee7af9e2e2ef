"""Are two paired runs alike? Machine kind, precision and pipeline settings of a run and its baseline run.

A paired comparison only isolates the method when the two runs differ in the
method alone. This module lists what else differs between the runs of a pair:
the machine (metrics.json "device"), the precision, and every config.yaml field
that is not one of the compared settings. config.yaml is read as the run wrote
it, so a field a later version added shows as 'not recorded' on the older run
instead of taking today's default. Runs from before metrics.json recorded the
device cannot say it; for them the training throughput tells a GPU from a CPU
(tens of times apart), which is the evidence docs/results/README.md used by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from oloraplus.report.load import Run
from oloraplus.runs import recorded_eval_precision

# What a comparison varies on purpose (the method, its λ, its lr under protocol tuned), and what the pairing fixes.
COMPARED = frozenset({"adapter.method", "adapter.lr_ratio", "train.lr", "train.seed"})
# Where the run wrote its files or what it logged: no bearing on the numbers it produced.
BOOKKEEPING = frozenset(
    {"output_dir", "model.cache_dir", "train.report_to", "train.logging_steps", "train.dynamics_every"}
)
# Training throughputs further apart than this, on runs that do not record their device, point to two machine kinds.
THROUGHPUT_RATIO = 3.0


@dataclass(frozen=True)
class Difference:
    """One field that differs between a run and its baseline run (None = the run does not record it, or sets null)."""

    field: str
    run: Any
    baseline: Any
    throughputs: tuple[float, float] | None = None  # train tokens/s of both, when they are the evidence


@dataclass(frozen=True)
class PairCheck:
    seed: int
    run_id: str
    baseline_run_id: str
    differences: tuple[Difference, ...]
    device_recorded: bool  # both runs' metrics.json name the device

    @property
    def alike(self) -> bool:
        return not self.differences


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train.packing': True, ...}: nested sections joined with dots."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def _throughput(run: Run) -> float | None:
    v = run.metrics.get("train_tokens_per_s")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else None


def _device(run: Run, base: Run) -> Difference | None:
    a, b = run.metrics.get("device"), base.metrics.get("device")
    if a is not None and b is not None:
        return Difference("device", a, b) if a != b else None
    ta, tb = _throughput(run), _throughput(base)
    if ta is None or tb is None or max(ta, tb) / min(ta, tb) <= THROUGHPUT_RATIO:
        return None
    return Difference("device", a, b, (ta, tb))


def check_pair(run: Run, base: Run) -> PairCheck:
    """What differs between a run and its baseline run, besides the compared settings."""
    diffs = [d for d in (_device(run, base),) if d is not None]
    for name, recorded_in in (("precision", lambda m: m.get("precision")), ("eval_precision", recorded_eval_precision)):
        if recorded_in(run.metrics) != recorded_in(base.metrics):
            diffs.append(Difference(name, recorded_in(run.metrics), recorded_in(base.metrics)))
    a, b = flat_config(run.config), flat_config(base.config)
    for name in sorted((a.keys() | b.keys()) - COMPARED - BOOKKEEPING):
        if a.get(name) != b.get(name):
            diffs.append(Difference(name, a.get(name), b.get(name)))
    recorded = "device" in run.metrics and "device" in base.metrics
    return PairCheck(run.seed, run.run_id, base.run_id, tuple(diffs), recorded)
