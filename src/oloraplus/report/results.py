"""The machine-readable outputs: results.csv (one row per ended run) and results.json (everything the report shows)."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Any

from oloraplus.report.compare import SEED_LEVEL_MIN_SEEDS
from oloraplus.report.load import Run, Study

CSV_COLUMNS = (
    "run_id",
    "kind",
    "method",
    "init",
    "lr_ratio",
    "lr",
    "seed",
    "status",
    "diverged_step",
    "n_train",
    "n_val",
    "n_test",
    "train_steps",
    "train_seconds",
    "train_tokens",
    "train_tokens_per_s",
    "precision",
    "eval_precision",
    "final_train_loss",
    "val_loss",
    "eval_loss",
    "bleu",
    "rouge1",
    "rouge2",
    "rougeL",
    "eval_loss_seconds",
    "generation_seconds",
    "generated_tokens",
    "generation_tokens_per_s",
)


def clean(value: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON any tool can read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return clean(dataclasses.asdict(value))
    return value


def all_runs(study: Study) -> list[Run]:
    """Test and selection runs in the order of both files."""
    return sorted(study.runs + study.selection_runs, key=lambda r: (r.kind, r.lr, r.method, r.lr_ratio, r.seed))


def results_csv(runs: list[Run]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run in runs:
        row = {"run_id": run.run_id, "kind": run.kind, **run.metrics}
        writer.writerow({k: "" if clean(row.get(k)) is None else row.get(k) for k in CSV_COLUMNS})
    return buf.getvalue()


def results_json(
    study: Study,
    runs: list[Run],
    summary: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    n_resamples: int,
    seed: int,
) -> dict[str, Any]:
    return clean(
        {
            "study": study.spec,
            "counts": {
                "finished": sum(r.finished for r in study.runs),
                "diverged": sum(not r.finished for r in study.runs),
                "unfinished": len(study.unfinished),
                "expected": study.expected,
            },
            "selection_runs": len(study.selection_runs),  # validation-only runs, not in the counts above
            "unfinished": study.unfinished,
            "failed": study.failed,  # why each failed run (a Ray study's) has no results
            "runs": [{"run_id": r.run_id, "kind": r.kind, **r.metrics} for r in runs],
            "table": summary,
            "selection": study.selection,
            "comparisons": comparisons,
            "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95},
            "statistics": {
                "eval_loss": "token-weighted: sum of loss_sum / sum of n_tokens (response tokens + EOS) per run",
                "example_level": "metrics: paired bootstrap over test examples, percentile interval, two-sided p",
                "seed_level": "seed_level: per-seed paired differences, mean with a Student-t interval on n-1 df",
                "verdict_level": f"seeds from {SEED_LEVEL_MIN_SEEDS} paired seeds on, else examples",
                "multiple_comparisons": "Holm over the rows of one protocol's table, per metric and level (p_holm)",
            },
        }
    )
