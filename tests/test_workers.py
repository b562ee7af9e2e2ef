"""Several workers on one study: a run is claimed by one worker at a time, a dead worker's claim is free again,
a worker waits for the runs others hold, and `compare --workers 2` trains each run exactly once."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from oloraplus import study as study_mod
from oloraplus.cli import main
from oloraplus.config import build_config
from oloraplus.grid import RunSpec, spec_config
from oloraplus.study import claim_run

HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from oloraplus.study import claim_run
    study, run_id, hold_s, finish = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
    with claim_run(study, run_id) as mine:
        assert mine
        print("claimed", flush=True)
        time.sleep(hold_s)
        if finish:
            (study / "runs" / run_id).mkdir(parents=True, exist_ok=True)
            (study / "runs" / run_id / "metrics.json").write_text(json.dumps({"status": "finished"}))
    """
)


def _hold(study: Path, run_id: str, hold_s: float, finish: bool) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(study), run_id, str(hold_s), "1" if finish else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def test_a_claim_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    proc = _hold(tmp_path, "run_a", 600, finish=False)
    with claim_run(tmp_path, "run_a") as mine:
        assert not mine
    with claim_run(tmp_path, "run_b") as mine:  # other runs stay free
        assert mine
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with claim_run(tmp_path, "run_a") as mine:  # no stale claim after kill -9
        assert mine


def test_a_worker_skips_runs_held_elsewhere_and_waits_for_them(tmp_path, monkeypatch):
    base = build_config({}, {"data": "x.json"})
    specs = [RunSpec("olora", 1.0, 2e-4, 0), RunSpec("olora+", 4.0, 2e-4, 0), RunSpec("olora+", 16.0, 2e-4, 0)]
    configs = [spec_config(base, s, tmp_path) for s in specs]
    trained = []

    def fake_run_training(cfg, overwrite=False):
        trained.append(Path(cfg.output_dir).name)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "metrics.json").write_text(json.dumps({"status": "finished", "eval_loss": 1.0}))
        return {"status": "finished", "eval_loss": 1.0}

    import oloraplus.train

    monkeypatch.setattr(oloraplus.train, "run_training", fake_run_training)
    monkeypatch.setattr(study_mod, "WAIT_POLL_S", 0.1)
    held = specs[1].run_id
    proc = _hold(tmp_path, held, 2.0, finish=True)
    t0 = time.perf_counter()
    study_mod._run_all(tmp_path, "test", specs, configs)
    waited = time.perf_counter() - t0
    proc.wait()
    assert trained == [specs[0].run_id, specs[2].run_id]  # the held run was left to its holder
    assert all((tmp_path / "runs" / s.run_id / "metrics.json").is_file() for s in specs)
    assert waited >= 1.0  # returned only once the other worker's run had finished


def test_compare_with_two_workers_trains_each_run_once(tiny_model_dir, small_data, tmp_path, capsys):
    study = tmp_path / "study"
    args = [
        "compare",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_data),
        "--n_train",
        "48",
        "--n_test",
        "4",
        "--batch_size",
        "4",
        "--max_new_tokens",
        "4",
        "--study_dir",
        str(study),
        "--methods",
        "olora,olora+",
        "--lr_ratios",
        "1/4,4",
        "--seeds",
        "0,1",
        "--workers",
        "2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    metrics = list(study.glob("runs/*/metrics.json"))
    assert len(metrics) == 6
    log = (study / "workers" / "worker1.log").read_text()
    started = [
        line for text in (out, log) for line in text.splitlines() if line.startswith("[test run ") and "left" in line
    ]
    assert len(started) == 6  # every run trained once, by one worker or the other
    table = [line for line in out.splitlines() if "_seed" in line and " finished " in line]
    assert len(table) == 6 and (study / "report.md").is_file()


def test_workers_must_be_a_positive_whole_number(tiny_model_dir, small_data, tmp_path, capsys):
    args = [
        "compare",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_data),
        "--study_dir",
        str(tmp_path / "s"),
        "--workers",
        "0",
    ]
    assert main(args) == 2
    assert "--workers must be a whole number >= 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
