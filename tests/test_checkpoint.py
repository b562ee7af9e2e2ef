"""Runs that survive being killed: kill -9 mid-run, start again, end as the uninterrupted run does."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_args
from safetensors.torch import load_file

from oloraplus import train
from oloraplus.checkpoints import CheckpointCallback, read_progress, resumable_checkpoint, save_steps
from oloraplus.cli import main
from oloraplus.config import build_config
from oloraplus.errors import OLoRAPlusError
from oloraplus.runs import RESUME_FILE, RunFolder

# the child trains as `oloraplus train` does, but waits (to be killed) once PAUSE_AT optimizer steps are done
PAUSING_TRAIN = """
import sys
from oloraplus import train
from oloraplus.cli import main

pause_at = int(sys.argv[1])
training_step = train.OLoRAPlusTrainer.training_step

def paused(self, *args, **kwargs):
    if self.state.global_step == pause_at:
        print("paused", flush=True)
        sys.stdin.readline()
    return training_step(self, *args, **kwargs)

train.OLoRAPlusTrainer.training_step = paused
sys.exit(main(sys.argv[2:]))
"""
RANK = 4


def _train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return cli_args(
        "train",
        *extra,
        model=model_dir,
        data=data,
        n_train=12,
        n_test=4,
        batch_size=4,
        max_steps=5,  # 3 steps an epoch: resumed at step 2, a run skips 2 batches and crosses into the second epoch
        rank=RANK,
        lr="1e-2",
        dropout="0.05",  # the dropout masks after the resume come from the restored RNG state
        micro_batch_tokens=96,  # packed batches of 4 split into 2 or more packs
        logging_steps=2,
        dynamics_every=1,
        checkpoint_every=2,
        max_new_tokens=4,
        precision="fp32",
        output_dir=out,
    )


def _results(run: Path) -> dict:
    folder = RunFolder(run)
    history = [h for h in folder.read_history() if "train_runtime" not in h]  # the summary row holds timings
    return {
        "metrics": folder.read_metrics(),
        "answers": [(r["index"], r["prediction"]) for r in folder.read_predictions()],
        "history": history,
        "dynamics": folder.read_dynamics(),
        "adapter": load_file(folder.adapter / "adapter_model.safetensors"),
    }


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("ckpt-data") / "records.json"
    shutil.copy(Path(__file__).with_name("fixtures") / "records.json", data)
    out = tmp_path_factory.mktemp("ckpt-ref") / "run"
    assert main(_train_args(tiny_model_dir, data, out)) == 0
    return data, out


def test_checkpoints_land_on_logged_steps():
    assert save_steps(2, 2) == 2 and save_steps(3, 2) == 4 and save_steps(15, 5) == 15 and save_steps(16, 5) == 20


def test_only_a_complete_checkpoint_of_the_same_config_is_resumed(tmp_path):
    cfg = build_config({}, {"data": "x.json", "output_dir": str(tmp_path / "run")})
    run = RunFolder(tmp_path / "run")
    assert resumable_checkpoint(run.path, cfg) is None  # no run folder yet

    class State:
        is_world_process_zero = True
        max_steps = 10

    rows = [{"step": 0}]
    saver = CheckpointCallback(run.path, cfg, rows)
    for step in (3, 6):  # as Trainer leaves them, then as on_save marks them
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / "adapter_model.safetensors").write_bytes(b"weights")
        State.global_step = step
        rows.append({"step": step})
        saver.on_save(None, State(), None)
    assert run.checkpoints() == [run.checkpoint(6)]  # the older one went once the newer one was complete
    assert read_progress(run.checkpoint(6))["dynamics"] == [{"step": 0}, {"step": 3}, {"step": 6}]
    run.checkpoint(9).mkdir()  # Trainer was writing this one when the run was killed
    (run.checkpoint(9) / "adapter_model.safetensors").write_bytes(b"wei")
    assert resumable_checkpoint(run.path, cfg) == run.checkpoint(6)
    assert resumable_checkpoint(run.path, dataclasses.replace(cfg, output_dir="moved")) == run.checkpoint(6)
    other = build_config({}, {"data": "x.json", "lr": 1e-3, "rank": 8})
    with pytest.raises(OLoRAPlusError, match=r"another configuration \(adapter.rank 16 there, 8 here; train.lr 0.0002"):
        resumable_checkpoint(run.path, other)
    # speed and memory settings do not make it another run (SCHEDULE_ONLY); the seed does
    faster = {"data": "x.json", "eval_batch_size": 7, "micro_batch_tokens": 128, "max_memory_gb": 3.0}
    assert resumable_checkpoint(run.path, build_config({}, {**faster, "output_dir": "x"})) == run.checkpoint(6)
    with pytest.raises(OLoRAPlusError, match=r"train.seed 0 there, 1 here"):
        resumable_checkpoint(run.path, build_config({}, {**faster, "seed": 1}))
    # a checkpoint from before eval.precision existed resumes as that setting's default, not as another run
    resume = run.checkpoint(6) / RESUME_FILE
    saved = json.loads(resume.read_text())
    del saved["config"]["eval"]["precision"]
    resume.write_text(json.dumps(saved))
    assert resumable_checkpoint(run.path, cfg) == run.checkpoint(6)
    with pytest.raises(OLoRAPlusError, match=r"eval.precision 'auto' there, 'bf16' here"):
        resumable_checkpoint(run.path, build_config({}, {"data": "x.json", "eval_precision": "bf16"}))


def test_a_run_killed_mid_run_resumes_and_ends_as_the_uninterrupted_run(
    uninterrupted, tiny_model_dir, tmp_path, capsys
):
    data, reference = uninterrupted
    out = tmp_path / "run"
    args = _train_args(tiny_model_dir, data, out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING_TRAIN, "3", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        for line in proc.stdout:  # ends at "paused", or at EOF if the child died
            if line.strip() == "paused":
                break
        assert proc.poll() is None, "the training subprocess ended before it paused"
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: 3 steps done, the 4th under way
    finally:
        proc.kill()
        proc.wait()
    run = RunFolder(out)
    assert not run.ended
    assert [p.name for p in run.checkpoints()] == ["checkpoint-2"]
    ckpt = run.last_checkpoint
    assert ckpt is not None and (ckpt / RESUME_FILE).is_file()
    saved = load_file(ckpt / "adapter_model.safetensors")  # the raw trained A, B: rank r, not converted to 2r
    assert {t.shape[0] for k, t in saved.items() if ".lora_A." in k} == {RANK}

    # killed while Trainer wrote checkpoint-4: files there, one cut short, no resume.json
    partial = out / "checkpoint-4"
    shutil.copytree(ckpt, partial, ignore=shutil.ignore_patterns(RESUME_FILE))
    (partial / "optimizer.pt").write_bytes((partial / "optimizer.pt").read_bytes()[:100])

    before = _snapshot(out)
    capsys.readouterr()
    assert main(_train_args(tiny_model_dir, data, out, "--lr", "2e-2")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and "another configuration" in err and "train.lr" in err
    assert _snapshot(out) == before  # nothing touched

    assert main(args) == 0
    assert "from its checkpoint at step 2" in capsys.readouterr().out

    _assert_same_results(out, reference, resumed_from_step=2)


def test_a_run_killed_while_evaluating_resumes_without_training_again(
    uninterrupted, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    data, reference = uninterrupted
    out = tmp_path / "run"
    args = _train_args(tiny_model_dir, data, out)
    evaluate = train.evaluate_saved_adapter

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_saved_adapter", interrupted)
    assert main(args) == 130
    assert not RunFolder(out).ended and [p.name for p in RunFolder(out).checkpoints()] == ["checkpoint-5"]

    monkeypatch.setattr(train, "evaluate_saved_adapter", evaluate)
    steps = []
    training_step = train.OLoRAPlusTrainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(train.OLoRAPlusTrainer, "training_step", counted)
    capsys.readouterr()
    assert main(args) == 0
    assert "from its checkpoint at step 5" in capsys.readouterr().out
    assert steps == []  # Trainer's own resume would train a 6th step: 5 steps are not a whole number of epochs
    _assert_same_results(out, reference, resumed_from_step=5)


def _assert_same_results(out: Path, reference: Path, resumed_from_step: int) -> None:
    assert RunFolder(out).checkpoints() == [] and RunFolder(reference).checkpoints() == []
    got, want = _results(out), _results(reference)
    assert got["metrics"]["eval_loss"] == pytest.approx(want["metrics"]["eval_loss"], abs=1e-6)
    assert got["metrics"]["train_steps"] == want["metrics"]["train_steps"] == 5
    assert got["metrics"]["resumed_from_step"] == resumed_from_step and "resumed_from_step" not in want["metrics"]
    assert got["metrics"]["train_tokens"] == want["metrics"]["train_tokens"]
    assert got["answers"] == want["answers"] and len(got["answers"]) == 4
    assert got["history"] == want["history"]
    assert got["dynamics"] == want["dynamics"] and [r["step"] for r in got["dynamics"]] == list(range(6))
    assert got["adapter"].keys() == want["adapter"].keys()
    for key, tensor in want["adapter"].items():
        assert torch.equal(got["adapter"][key], tensor), key
