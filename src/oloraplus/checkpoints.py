"""Runs that survive being killed: Trainer's own checkpoints, made safe to resume from.

Trainer (save_strategy="steps") writes RUN/checkpoint-STEP in place: the raw adapter (A, B
as trained, not converted for the original base), optimizer, scheduler, RNG states and
trainer_state.json (data position, log history, tokens seen); on resume it loads them all
and skips the batches already trained on. A kill while Trainer writes leaves a partial
folder, so `CheckpointCallback` marks a checkpoint complete only once Trainer is done with
it: it fsyncs the files, writes resume.json (atomically, last) with the run's config and
what Trainer does not keep (dynamics rows, training seconds so far), and only then removes
the older checkpoint. A checkpoint without resume.json is never resumed from.

Resuming needs nothing else: the adapter is attached again with the same deterministic
init (OLoRA's QR of the same base weights), so the base's W − s·B₀A₀ and the snapshot
(A₀, B₀) that converts the final adapter are the uninterrupted run's, and Trainer loads
the checkpoint's A, B on top.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from oloraplus.config import RunConfig, results_config
from oloraplus.errors import OLoRAPlusError
from oloraplus.fsutil import atomic_write_json, fsync_tree
from oloraplus.runs import CHECKPOINT_PREFIX, CONFIG_FILE, RESUME_FILE, TENSORBOARD_DIR, RunFolder, read_json

assert CHECKPOINT_PREFIX == f"{PREFIX_CHECKPOINT_DIR}-", "runs.py must name Trainer's checkpoint folders as it does"


def save_steps(checkpoint_every: int, logging_steps: int) -> int:
    """checkpoint_every rounded up to a multiple of logging_steps.

    A checkpoint then lands right after a logged loss: Trainer does not save the loss summed
    since the last log, so a resumed run logs exactly the losses an uninterrupted one does.
    """
    return -(-checkpoint_every // logging_steps) * logging_steps


def _resume_config(cfg: RunConfig) -> dict[str, Any]:
    """What must match to resume: the whole config but output_dir (a moved folder resumes too), as JSON has it."""
    data = cfg.to_dict()
    data.pop("output_dir")
    return json.loads(json.dumps(data))


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [
        f"{section}.{key} {saved.get(section, {}).get(key)!r} there, {value!r} here"
        for section, values in now.items()
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    ] + [f"section {s} there only" for s in saved if s not in now]


def resumable_checkpoint(run_dir: Path, cfg: RunConfig) -> Path | None:
    """The run folder's newest complete checkpoint, or None when it has none.

    A checkpoint made with another configuration is refused, naming the folder and what
    differs: resuming it would mix two runs, and starting over would throw its work away.
    """
    ckpt = RunFolder(run_dir).last_checkpoint
    if ckpt is None:
        return None
    saved = read_json(ckpt / RESUME_FILE).get("config", {})
    diff = _differences(results_config(saved), results_config(_resume_config(cfg)))
    if diff:
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise OLoRAPlusError(
            f"{run_dir} holds an unfinished run's checkpoint made with another configuration ({shown}); "
            "pass --overwrite to start that run over, or pick another output_dir"
        )
    return ckpt


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint folder (checkpoint-STEP) was saved at."""
    return int(ckpt.name.rsplit("-", 1)[-1])


def read_progress(ckpt: Path | None) -> dict[str, Any]:
    """What resume.json adds to Trainer's checkpoint: dynamics rows and training seconds so far ({} for none)."""
    return read_json(ckpt / RESUME_FILE) if ckpt is not None else {}


def clear_for_resume(run_dir: Path, ckpt: Path) -> None:
    """Keep config.yaml, the checkpoint and TensorBoard's logs; partial checkpoints, temp files of a kill and
    results of an evaluation cut short go (the resumed run writes them again)."""
    for path in run_dir.iterdir():
        if path.name not in (CONFIG_FILE, ckpt.name, TENSORBOARD_DIR):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def load_trained(trainer: Trainer, ckpt: Path) -> None:
    """A checkpoint taken once training was done (the run was killed while evaluating): its adapter and Trainer state.

    Not Trainer's resume: when max_steps is not a whole number of epochs, it skips the
    last epoch's batches already trained on and then trains one step more.
    """
    trainer.model.load_adapter(str(ckpt), trainer.model.active_adapter, is_trainable=True)
    trainer.state = TrainerState.load_from_json(str(ckpt / TRAINER_STATE_NAME))


def remove_checkpoints(run_dir: Path) -> None:
    for ckpt in RunFolder(run_dir).checkpoints():
        shutil.rmtree(ckpt)


class CheckpointCallback(TrainerCallback):
    """Marks each Trainer checkpoint complete (resume.json, last), then removes the older one.

    Trainer's own save_total_limit rotates before this callback runs, so it would delete the
    last complete checkpoint while the new one is still unmarked: the rotation is done here.
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, dynamics_rows: list[dict], seconds_before: float = 0.0):
        self.run = RunFolder(run_dir)
        self.config = _resume_config(cfg)
        self.dynamics_rows = dynamics_rows  # the DynamicsCallback's list, appended to as training goes
        self.seconds_before = seconds_before  # training time of the runs this one resumes
        self.started = time.perf_counter()  # reset when training begins

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its RNG state before rank 0 marks the checkpoint
        if not state.is_world_process_zero:
            return
        ckpt = self.run.checkpoint(state.global_step)
        fsync_tree(ckpt)  # Trainer's files reach the disk before the mark that vouches for them
        seconds = self.seconds_before + time.perf_counter() - self.started
        atomic_write_json(
            ckpt / RESUME_FILE,
            {
                "step": state.global_step,
                "training_done": state.global_step >= state.max_steps,
                "config": self.config,
                "dynamics": self.dynamics_rows,
                "train_seconds": seconds,
            },
        )
        for old in self.run.checkpoints():
            if old != ckpt:
                shutil.rmtree(old)
