"""A study: the grid's runs (grid.py), one run folder each, trained sequentially or by several workers, resumable.

A run folder with metrics.json is finished and skipped; any other run folder resumes
from its last checkpoint (train.run_training), or is redone when it has none.
metrics.json is written atomically and last, so a process killed at any moment
(kill -9 included) loses at most checkpoint_every steps of the run in progress.

Several workers (processes, GPUs or machines sharing the folder) can run one study
at once: a worker claims a run by holding an exclusive lock on STUDY/.claims/RUN.lock
while it trains it. The operating system drops the lock when its holder dies, so a
killed worker's run is simply claimed again; a worker that finds every remaining run
claimed waits for them, so each returns only when the whole stage is finished.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from oloraplus.config import RunConfig
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

CLAIMS_DIR = ".claims"
WORKER_LOGS_DIR = "workers"
WAIT_POLL_S = 5.0


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    saved = yaml.safe_load(RunFolder(run_dir).config.read_text())
    if saved != yaml.safe_load(cfg.to_yaml()):
        raise OLoRAPlusError(
            f"{run_dir} was made with a different configuration; use a new study folder or remove that run"
        )


def _check_finished(configs: list[RunConfig]) -> None:
    """Refuse to mix runs made with another configuration, before training anything."""
    for cfg in configs:
        if is_finished(cfg.output_dir):
            _check_same_config(Path(cfg.output_dir), cfg)


# --- running -------------------------------------------------------------------------------------------


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _outcome(metrics: dict[str, Any]) -> str:
    """' diverged at step 3', ', eval loss 2.1234' or ', val loss 2.1234 (validation only)'."""
    if metrics["status"] == "diverged":
        step = metrics.get("diverged_step")
        return f" at step {step}" if step is not None else " (non-finite loss)"
    if "eval_loss" in metrics:
        return f", eval loss {metrics['eval_loss']:.4f}"
    return f", val loss {metrics.get('val_loss', math.nan):.4f} (validation only)"


@contextmanager
def claim_run(study_dir: Path, run_id: str) -> Iterator[bool]:
    """Yield True while this process holds the run's lock, False if another worker holds it.

    A POSIX record lock (lockf) rather than a lock file's mere existence: the lock
    goes with its holder when that process ends, kill -9 included, so there is no
    stale claim to clean up; lockf also works across machines on NFS.
    """
    path = study_dir / CLAIMS_DIR / f"{run_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _run_all(study_dir: Path, stage: str, specs: list[RunSpec], configs: list[RunConfig]) -> None:
    """Train every unfinished run of `specs` not claimed by another worker, in order, with progress and an ETA;
    then wait for the runs other workers hold, so that the stage is finished when this returns."""
    from oloraplus.train import run_training

    todo = [i for i, cfg in enumerate(configs) if not is_finished(cfg.output_dir)]
    print(
        f"study {study_dir} ({stage}): {len(specs)} runs, {len(specs) - len(todo)} already finished, "
        f"{len(todo)} to run",
        flush=True,
    )
    durations: list[float] = []
    waiting_for: list[str] = []
    while todo:
        for i in todo:
            spec, cfg = specs[i], configs[i]
            with claim_run(study_dir, spec.run_id) as mine:
                if not mine or is_finished(cfg.output_dir):  # held by, or just finished by, another worker
                    continue
                left = sum(not is_finished(c.output_dir) for c in configs)
                eta = (
                    f", ETA {_fmt_seconds(sum(durations) / len(durations) * left)} at this worker's pace"
                    if durations
                    else ""
                )
                print(f"\n[{stage} run {i + 1}/{len(specs)}] {spec.run_id} ({left} left{eta})", flush=True)
                t0 = time.perf_counter()
                metrics = run_training(cfg)  # resumes a run killed midway from its checkpoint
                durations.append(time.perf_counter() - t0)
                print(
                    f"[{stage} run {i + 1}/{len(specs)}] {metrics['status']}{_outcome(metrics)} "
                    f"in {_fmt_seconds(durations[-1])}",
                    flush=True,
                )
        todo = [i for i in todo if not is_finished(configs[i].output_dir)]
        held = [specs[i].run_id for i in todo]
        if held and held != waiting_for:
            print(f"waiting for {len(held)} run(s) other workers are training: {', '.join(held)}", flush=True)
        waiting_for = held
        if todo:
            time.sleep(WAIT_POLL_S)


def run_selection(
    study_dir: Path, base: RunConfig, grid: GridConfig, specs: list[RunSpec]
) -> dict[str, dict[str, Any]]:
    """Train the selection runs, choose each method/lambda's lr, write selection.json atomically."""
    _run_all(study_dir, "lr selection", specs, [spec_config(base, s, study_dir) for s in specs])
    ended = {s.run_id: m for s, m in zip(specs, _read_metrics(study_dir, specs)) if m is not None}
    selection = choose_lrs(grid, ended)
    atomic_write_json(study_dir / SELECTION_FILE, selection)
    print(
        f"\nchosen learning rates (lowest validation loss; {study_dir / SELECTION_FILE}):\n"
        f"{format_selection(selection)}",
        flush=True,
    )
    return selection


def _check_study(study_dir: Path, base: RunConfig, grid: GridConfig) -> list[RunConfig]:
    """The protocol against the run config, and no finished run made with another config; the known run configs."""
    check_protocol(base, grid)
    configs = [spec_config(base, s, study_dir) for s in selection_specs(grid) + final_specs(base, grid, None)]
    _check_finished(configs)
    return configs


def run_study(study_dir: str | Path, base: RunConfig, grid: GridConfig) -> list[dict[str, Any]]:
    """Run every unfinished run of the study; return the metrics of all finished test-evaluated runs, in order."""
    from oloraplus.prepare import PreparedRun  # here, not at the top: `import study` stays free of torch

    study_dir = Path(study_dir)
    configs = _check_study(study_dir, base, grid)
    PreparedRun(configs[0])  # validates data, split, model and targets before anything is written
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        study_dir / STUDY_FILE,
        yaml.safe_dump({"base": base.to_dict(), "grid": dataclasses.asdict(grid)}, sort_keys=False),
    )
    selection = run_selection(study_dir, base, grid, selection_specs(grid)) if grid.tuned else None
    finals = final_specs(base, grid, selection)
    final_configs = [spec_config(base, s, study_dir) for s in finals]
    _check_finished(final_configs)
    _run_all(study_dir, "test", finals, final_configs)
    return collect_metrics(study_dir, finals)


def _worker_main(study_dir: str, base: RunConfig, grid: GridConfig, index: int, threads: int, gpu: str | None) -> None:
    """A helper worker of `run_study_parallel`: its output goes to STUDY/workers/worker{index}.log."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    log = Path(study_dir) / WORKER_LOGS_DIR / f"worker{index}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1, encoding="utf-8") as f:
        sys.stdout = sys.stderr = f
        import torch

        torch.set_num_threads(threads)
        run_study(study_dir, base, grid)


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_study_parallel(study_dir: str | Path, base: RunConfig, grid: GridConfig, workers: int) -> list[dict[str, Any]]:
    """Run the study with `workers` processes: this one and workers - 1 helpers started here.

    On several GPUs worker k gets GPU k mod n; on one GPU they share it (a small
    model leaves most of an accelerator idle between kernel launches); on a CPU
    the cores are split between them.
    """
    if workers <= 1:
        return run_study(study_dir, base, grid)
    _check_study(Path(study_dir), base, grid)  # before any helper starts, so a bad config fails once
    import torch

    gpus = _gpu_ids() if torch.cuda.is_available() else []
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or CUDA state
    helpers = []
    for k in range(1, workers):
        gpu = gpus[k % len(gpus)] if len(gpus) > 1 else None
        proc = ctx.Process(target=_worker_main, args=(str(study_dir), base, grid, k, threads, gpu), daemon=False)
        proc.start()
        helpers.append(proc)
    print(
        f"{workers} workers: this one and {workers - 1} helper(s), logs in {Path(study_dir) / WORKER_LOGS_DIR}",
        flush=True,
    )
    if len(gpus) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    torch.set_num_threads(threads)
    try:
        rows = run_study(study_dir, base, grid)
    except BaseException:
        for proc in helpers:  # they would meet the same error; an interrupt stops them all
            proc.terminate()
        raise
    finally:
        for proc in helpers:
            proc.join()
    failed = [f"worker{k}" for k, proc in enumerate(helpers, 1) if proc.exitcode != 0]
    if failed:
        raise OLoRAPlusError(f"{', '.join(failed)} failed: see {Path(study_dir) / WORKER_LOGS_DIR}")
    return rows


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
