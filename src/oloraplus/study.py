"""A study: the grid's runs (grid.py), one run folder each, resumable; trained one after another here, or by a
runner that spreads them over a Ray cluster (ray_study.py) through the same `run_study`.

A run folder with metrics.json is finished and skipped; any other run folder is
handed to `train_run` again, which resumes it from its last checkpoint
(train.run_training), or redoes it when it has none. metrics.json is written
atomically and last, so a process killed at any moment (kill -9 included) loses at
most checkpoint_every steps of each run in progress.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from oloraplus.config import RunConfig, results_config
from oloraplus.errors import OLoRAPlusError
from oloraplus.fsutil import atomic_write_json, atomic_write_text
from oloraplus.grid import (
    SELECTION_FILE,
    GridConfig,
    RunSpec,
    check_protocol,
    choose_lrs,
    final_specs,
    format_selection,
    selection_specs,
    spec_config,
)
from oloraplus.runs import STUDY_FILE, RunFolder, is_finished


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    saved = yaml.safe_load(RunFolder(run_dir).config.read_text())
    if results_config(saved) != results_config(yaml.safe_load(cfg.to_yaml())):
        raise OLoRAPlusError(
            f"{run_dir} was made with a different configuration; use a new study folder or remove that run"
        )


def _check_finished(configs: list[RunConfig]) -> None:
    """Refuse to mix runs made with another configuration, before training anything."""
    for cfg in configs:
        if is_finished(cfg.output_dir):
            _check_same_config(Path(cfg.output_dir), cfg)


# --- running -------------------------------------------------------------------------------------------


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def outcome(metrics: dict[str, Any]) -> str:
    """' diverged at step 3', ', eval loss 2.1234' or ', val loss 2.1234 (validation only)'."""
    if metrics["status"] == "diverged":
        step = metrics.get("diverged_step")
        return f" at step {step}" if step is not None else " (non-finite loss)"
    if "eval_loss" in metrics:
        return f", eval loss {metrics['eval_loss']:.4f}"
    return f", val loss {metrics.get('val_loss', math.nan):.4f} (validation only)"


def train_run(cfg: RunConfig) -> dict[str, Any]:
    """Train one run of a study into cfg.output_dir; its metrics. The one place a study calls training (a Ray task
    calls it too), so how a run resumes is decided in one line."""
    from oloraplus.train import run_training

    return run_training(cfg)  # an unfinished run resumes from its last checkpoint; one without any starts over


class StageRunner(Protocol):
    """Trains every unfinished run of one stage; returns once each has ended or failed."""

    failed: dict[str, str]  # run id -> why it failed (a runner that raises instead leaves it empty)

    def run_stage(self, study_dir: Path, stage: str, specs: list[RunSpec], configs: list[RunConfig]) -> None: ...


class SequentialRunner:
    """The plain path: the unfinished runs one after another in this process, with progress and an ETA.
    An error stops the study (a bad input fails the first run it meets)."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}

    def run_stage(self, study_dir: Path, stage: str, specs: list[RunSpec], configs: list[RunConfig]) -> None:
        todo = [i for i, cfg in enumerate(configs) if not is_finished(cfg.output_dir)]
        print(
            f"study {study_dir} ({stage}): {len(specs)} runs, {len(specs) - len(todo)} already finished, "
            f"{len(todo)} to run",
            flush=True,
        )
        durations: list[float] = []
        for n, i in enumerate(todo):
            spec, cfg = specs[i], configs[i]
            left = len(todo) - n
            eta = f", ETA {fmt_seconds(sum(durations) / len(durations) * left)}" if durations else ""
            print(f"\n[{stage} run {i + 1}/{len(specs)}] {spec.run_id} ({left} left{eta})", flush=True)
            t0 = time.perf_counter()
            metrics = train_run(cfg)
            durations.append(time.perf_counter() - t0)
            print(
                f"[{stage} run {i + 1}/{len(specs)}] {metrics['status']}{outcome(metrics)} "
                f"in {fmt_seconds(durations[-1])}",
                flush=True,
            )


def run_selection(
    study_dir: Path, base: RunConfig, grid: GridConfig, specs: list[RunSpec], runner: StageRunner | None = None
) -> dict[str, dict[str, Any]] | None:
    """Train the selection runs, choose each method/lambda's lr, write selection.json atomically.

    None when a selection run failed (a runner that records failures): the lrs cannot be chosen
    fairly without it, so the tuned runs wait for a rerun of the study.
    """
    runner = runner or SequentialRunner()
    configs = [spec_config(base, s, study_dir) for s in specs]
    runner.run_stage(study_dir, "lr selection", specs, configs)
    failed = [s.run_id for s in specs if s.run_id in runner.failed]
    if failed:
        print(
            f"\nlr selection: {len(failed)} run(s) failed ({', '.join(failed)}); the tuned runs need every "
            "selection run: rerun the same command to retry them",
            flush=True,
        )
        return None
    ended = {s.run_id: m for s, m in zip(specs, _read_metrics(study_dir, specs)) if m is not None}
    selection = choose_lrs(grid, ended)
    atomic_write_json(study_dir / SELECTION_FILE, selection)
    print(
        f"\nchosen learning rates (lowest validation loss; {study_dir / SELECTION_FILE}):\n"
        f"{format_selection(selection)}",
        flush=True,
    )
    return selection


def check_study(study_dir: str | Path, base: RunConfig, grid: GridConfig) -> list[RunConfig]:
    """The protocol against the run config, and no finished run made with another config; the known run configs."""
    check_protocol(base, grid)
    configs = [spec_config(base, s, Path(study_dir)) for s in selection_specs(grid) + final_specs(base, grid, None)]
    _check_finished(configs)
    return configs


def run_study(
    study_dir: str | Path, base: RunConfig, grid: GridConfig, runner: StageRunner | None = None
) -> list[dict[str, Any]]:
    """Run every unfinished run of the study (sequentially, or with `runner`); return the metrics of all finished
    test-evaluated runs, in order. Runs the runner could not finish are in runner.failed."""
    from oloraplus.prepare import PreparedRun  # here, not at the top: `import study` stays free of torch

    study_dir = Path(study_dir)
    runner = runner or SequentialRunner()
    configs = check_study(study_dir, base, grid)
    PreparedRun(configs[0])  # validates data, split, model and targets before anything is written
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        study_dir / STUDY_FILE,
        yaml.safe_dump({"base": base.to_dict(), "grid": dataclasses.asdict(grid)}, sort_keys=False),
    )
    # a failed selection leaves selection None: the fixed-protocol runs (if any) still go on
    selection = run_selection(study_dir, base, grid, selection_specs(grid), runner) if grid.tuned else None
    finals = final_specs(base, grid, selection)
    final_configs = [spec_config(base, s, study_dir) for s in finals]
    _check_finished(final_configs)
    runner.run_stage(study_dir, "test", finals, final_configs)
    return collect_metrics(study_dir, finals)


def _read_metrics(study_dir: Path, specs: list[RunSpec]) -> list[dict[str, Any] | None]:
    """metrics.json of each spec's run folder (None where the run has not finished)."""
    out = []
    for spec in specs:
        path = RunFolder.in_study(study_dir, spec.run_id).metrics
        out.append(json.loads(path.read_text()) if path.is_file() else None)
    return out


def collect_metrics(study_dir: Path, specs: list[RunSpec]) -> list[dict[str, Any]]:
    return [{"run_id": s.run_id, **m} for s, m in zip(specs, _read_metrics(study_dir, specs)) if m is not None]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of eval loss, BLEU and ROUGE per run."""
    header = f"{'run':<34} {'status':<9} {'eval_loss':>9} {'BLEU':>7} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8} {'tok/s':>7}"
    lines = [header, "-" * len(header)]

    def f(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) and v is not None else "-"

    for r in rows:
        lines.append(
            f"{r['run_id']:<34} {r.get('status', '?'):<9} {f(r.get('eval_loss'), '9.4f')} {f(r.get('bleu'), '7.2f')} "
            f"{f(r.get('rouge1'), '8.4f')} {f(r.get('rouge2'), '8.4f')} {f(r.get('rougeL'), '8.4f')} "
            f"{f(r.get('train_tokens_per_s'), '7.1f')}"
        )
    return "\n".join(lines)
