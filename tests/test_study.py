"""The grid: expansion, resume after a kill, no duplicates, divergence recorded."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, cli_args

from oloraplus.callbacks import DivergenceCallback
from oloraplus.cli import main
from oloraplus.config import build_config
from oloraplus.errors import OLoRAPlusError
from oloraplus.grid import build_grid, expand_grid


def _compare_args(model_dir, data, study, *extra):
    return cli_args(
        "compare",
        "--no_report",
        *extra,
        model=model_dir,
        data=data,
        **TINY,
        study_dir=study,
        methods="olora,olora+",
        lr_ratios="1/4,4",
        seeds=0,
    )


def test_grid_expansion_is_seed_major_and_drops_duplicate_parents():
    base = build_config({}, {"data": "x.json"})
    grid = build_grid({"methods": ["olora", "olora+"], "lr_ratios": [0.25, 1, 4], "seeds": [0, 1]})
    ids = [s.run_id for s in expand_grid(base, grid)]
    assert ids == [
        "olora_lam1_lr0.0002_seed0",
        "olora+_lam0.25_lr0.0002_seed0",
        "olora+_lam4_lr0.0002_seed0",
        "olora_lam1_lr0.0002_seed1",
        "olora+_lam0.25_lr0.0002_seed1",
        "olora+_lam4_lr0.0002_seed1",
    ]
    with pytest.raises(OLoRAPlusError, match="unknown method 'dora'"):
        build_grid({"methods": ["olora", "dora"]})
    with pytest.raises(OLoRAPlusError, match="baseline 'olora' is not among"):
        build_grid({"methods": ["lora"]})


def _mtimes(study: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/*/metrics.json")}


def test_rerun_skips_finished_and_redoes_unfinished(tiny_model_dir, small_data, tmp_path, capsys):
    study = tmp_path / "study"
    assert main(_compare_args(tiny_model_dir, small_data, study)) == 0
    first = _mtimes(study)
    assert len(first) == 3
    table = capsys.readouterr().out
    assert "olora+_lam0.25_lr0.0002_seed0" in table and "eval_loss" in table

    assert main(_compare_args(tiny_model_dir, small_data, study)) == 0
    assert "3 already finished, 0 to run" in capsys.readouterr().out
    assert _mtimes(study) == first

    # a run killed midway: its folder exists without metrics.json, with a half-written file
    victim = study / "runs" / "olora+_lam4_lr0.0002_seed0"
    (victim / "metrics.json").unlink()
    (victim / "predictions.jsonl").write_text('{"half": ')
    assert main(_compare_args(tiny_model_dir, small_data, study)) == 0
    after = _mtimes(study)
    assert sorted(after) == sorted(first)  # no duplicate runs
    assert {k: v for k, v in after.items() if k != victim.name} == {k: v for k, v in first.items() if k != victim.name}
    assert after[victim.name] != first[victim.name]
    rows = [json.loads(line) for line in (victim / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4


def test_kill_minus_9_loses_only_the_run_in_progress(tiny_model_dir, small_data, tmp_path):
    study = tmp_path / "study"
    args = _compare_args(tiny_model_dir, small_data, study, "--n_train", "48")
    proc = subprocess.Popen(
        [sys.executable, "-m", "oloraplus.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def second_run_started() -> bool:  # one run finished, the next has written its config.yaml
        return len(list(study.glob("runs/*/metrics.json"))) == 1 and len(list(study.glob("runs/*/config.yaml"))) == 2

    deadline = time.time() + 240
    while not second_run_started() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # polling the folder: the kill lands as soon as the second run exists, not after a guess
    assert second_run_started(), "the study never reached its second run"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _mtimes(study)
    assert 1 <= len(done) < 3
    for path in study.glob("runs/*/metrics.json"):
        json.loads(path.read_text())  # never a corrupt results file
    assert main(args) == 0
    after = _mtimes(study)
    assert len(after) == 3
    assert {k: after[k] for k in done} == done  # finished runs were not redone


def test_divergence_callback_stops_and_records_the_step():
    cb = DivergenceCallback()

    class Ctl:
        should_training_stop = False
        should_save = True

    class State:
        global_step = 7

    ctl = Ctl()
    cb.on_log(None, State(), ctl, logs={"loss": 2.0})
    assert not ctl.should_training_stop
    cb.on_log(None, State(), ctl, logs={"loss": float("nan")})
    assert ctl.should_training_stop and cb.diverged_step == 7
    assert not ctl.should_save  # no checkpoint of the diverged weights to resume from


def test_a_diverged_run_is_recorded_and_the_grid_goes_on(tiny_model_dir, small_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every loss is NaN from the first step
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    study = tmp_path / "study"
    assert main(_compare_args(broken, small_data, study, "--logging_steps", "1")) == 0
    out = capsys.readouterr().out
    metrics = [json.loads(p.read_text(), parse_constant=float) for p in study.glob("runs/*/metrics.json")]
    assert len(metrics) == 3
    assert all(m["status"] == "diverged" and m["diverged_step"] == 1 for m in metrics)
    assert out.count("diverged at step 1") == 3
    assert not list(study.glob("runs/*/checkpoint-*"))  # a diverged run ends without a checkpoint too
