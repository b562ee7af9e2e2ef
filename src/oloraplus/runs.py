"""The layout of a run folder, and of the study folder that holds run folders: every file name in one place.

A run folder (`oloraplus train --output_dir`, or STUDY/runs/RUN_ID in a study) holds:

    config.yaml         the run's full configuration, written first
    history.json        Trainer's log history (training loss per logging step)
    dynamics.jsonl      |A-A0|, |B-B0| and subspace drift every dynamics_every steps
    train_loss.png      the training-loss curve
    adapter/            the saved adapter (PEFT format), when the run did not diverge
    predictions.jsonl   one row per test record (index, loss, loss_sum, n_tokens, answer, scores)
    checkpoint-STEP/    while training: Trainer's checkpoint (raw adapter, optimizer, scheduler, RNG,
                        trainer_state.json with the data position and log history) and resume.json
                        (written last: the config, dynamics rows so far); only the newest complete one
                        is kept, and none once metrics.json is written
    metrics.json        written last and atomically: a run folder with it is ended, and its
                        "status" field says finished or diverged; any other folder is resumed from
                        its complete checkpoint, or redone when it has none
    failed.json         a study on Ray could not finish the run (its error, its attempts); a rerun retries it
    evaluation/         `oloraplus evaluate RUN` writes its metrics.json and predictions.jsonl here
    runs/               TensorBoard event files (Trainer's logging dir), with --report_to tensorboard
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oloraplus.errors import OLoRAPlusError
from oloraplus.fsutil import read_jsonl

# inside a study folder
STUDY_FILE = "study.yaml"
RUNS_DIR = "runs"
INCOMING_DIR = ".incoming"  # run folders sent back by Ray tasks, unpacked here before they move into RUNS_DIR

# inside a run folder
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.json"
DYNAMICS_FILE = "dynamics.jsonl"
TRAIN_LOSS_PLOT = "train_loss.png"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # inside ADAPTER_DIR: present once the adapter is saved
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"
EVALUATION_DIR = "evaluation"
CHECKPOINT_PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR: Trainer names them checkpoint-STEP
RESUME_FILE = "resume.json"  # inside a checkpoint, written last: a checkpoint without it is partial
TENSORBOARD_DIR = "runs"


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file (NaN accepted, as metrics.json may hold it), or an OLoRAPlusError naming the path."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OLoRAPlusError(f"cannot read {path}: {e}") from e


def is_finished(run_dir: str | os.PathLike) -> bool:
    """A run folder with metrics.json (written last, atomically) is ended; any other is redone."""
    return RunFolder(Path(run_dir)).ended


@dataclass(frozen=True)
class RunFolder:
    """One run folder: the paths of its files and readers for the ones the report uses."""

    path: Path

    @classmethod
    def in_study(cls, study_dir: str | os.PathLike, run_id: str) -> RunFolder:
        return cls(Path(study_dir) / RUNS_DIR / run_id)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def history(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def dynamics(self) -> Path:
        return self.path / DYNAMICS_FILE

    @property
    def train_loss_plot(self) -> Path:
        return self.path / TRAIN_LOSS_PLOT

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def failed(self) -> Path:
        return self.path / FAILED_FILE

    @property
    def evaluation(self) -> Path:
        return self.path / EVALUATION_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def checkpoint(self, step: int) -> Path:
        return self.path / f"{CHECKPOINT_PREFIX}{step}"

    def checkpoints(self) -> list[Path]:
        """Every checkpoint folder, complete or not, oldest step first."""
        found = [
            p
            for p in self.path.glob(f"{CHECKPOINT_PREFIX}*")
            if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        ]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint whose resume.json was written (the others were cut short), or None."""
        complete = [p for p in self.checkpoints() if (p / RESUME_FILE).is_file()]
        return complete[-1] if complete else None

    @property
    def ended(self) -> bool:
        """metrics.json is there: the run finished or diverged (its status says which)."""
        return self.metrics.is_file()

    @property
    def has_adapter(self) -> bool:
        return (self.adapter / ADAPTER_CONFIG_FILE).is_file()

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics)

    def read_failure(self) -> str | None:
        """Why the run failed (failed.json's error), None if it has not failed or has ended since."""
        if self.ended or not self.failed.is_file():
            return None
        return str(read_json(self.failed).get("error", "?"))

    def read_history(self) -> list[dict[str, Any]]:
        """Trainer's log history; [] when the file is absent."""
        return read_json(self.history) if self.history.is_file() else []

    def read_dynamics(self) -> list[dict[str, Any]]:
        """The dynamics rows; [] when the file is absent."""
        return read_jsonl(self.dynamics) if self.dynamics.is_file() else []

    def read_predictions(self) -> list[dict[str, Any]]:
        """The prediction rows, in file order; [] when the file is absent (a diverged or selection run)."""
        return read_jsonl(self.predictions) if self.predictions.is_file() else []


def run_folders(study_dir: str | os.PathLike) -> list[RunFolder]:
    """Every run folder of a study, sorted by run id; [] when STUDY/runs does not exist yet."""
    runs_dir = Path(study_dir) / RUNS_DIR
    return [RunFolder(p) for p in sorted(runs_dir.iterdir()) if p.is_dir()] if runs_dir.is_dir() else []


def recorded_eval_precision(metrics: dict[str, Any]) -> str | None:
    """The precision a run's metrics say it evaluated in (runs made before eval_precision evaluated in their training one)."""
    return metrics.get("eval_precision", metrics.get("precision"))
