"""A study on a local Ray cluster of 2 CPUs: every run trained exactly once, results and report equal to a
sequential `compare`, results brought back through Ray when the nodes share no folder, a killed worker's run
retried, a run that keeps failing recorded with its error while the rest go on, bad input refused up front.

One Ray session for the module (`--ray local` runs on a session this process already holds), started once: a
local cluster takes seconds to start on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import TINY, cli_args

from oloraplus import ray_study
from oloraplus.cli import main
from oloraplus.runs import INCOMING_DIR, RESUME_FILE, RunFolder

# fields that measure the machine, not the result: they differ between any two runs of one config; and
# resumed_from_step, how a retried run got to the same result (from its checkpoint)
TIMING = re.compile(r"seconds|_per_s$|per_second|runtime|rss_gb|^resumed_from_step$")
RUN_IDS = [
    "olora_lam1_lr0.0002_seed0",
    "olora+_lam4_lr0.0002_seed0",
    "olora_lam1_lr0.0002_seed1",
    "olora+_lam4_lr0.0002_seed1",
]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    from conftest import _records

    path = tmp_path_factory.mktemp("ray-data") / "records.json"
    path.write_text(json.dumps(_records()[:60]), encoding="utf-8")
    return path


def _args(model_dir: Path, data: Path, study: Path, *extra: str) -> list[str]:
    return cli_args(
        "compare",
        *extra,
        model=model_dir,
        data=data,
        **TINY,
        precision="fp32",  # two paths compared: no precision left to the CPU
        study_dir=study,
        methods="olora,olora+",
        lr_ratios=4,
        seeds="0,1",
    )


@pytest.fixture(scope="module")
def sequential(tiny_model_dir, records, tmp_path_factory) -> Path:
    """The reference: the same grid by plain `compare`, on 1 thread as each Ray run (1 CPU) trains."""
    study = tmp_path_factory.mktemp("sequential") / "study"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(tiny_model_dir, records, study)) == 0
    finally:
        torch.set_num_threads(threads)
    return study


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if not TIMING.search(k)}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _results(study: Path) -> dict[str, object]:
    """Every file a study wrote, its own path and the timings taken out: runs (metrics, predictions, adapter weights,
    history, plots) and the report's data (results.json)."""
    out: dict[str, object] = {}
    for path in sorted(p for p in study.rglob("*") if p.is_file()):
        rel = path.relative_to(study).as_posix()
        if path.suffix == ".json":
            data = _without_timing(json.loads(path.read_text().replace(str(study), "STUDY")))
            if path.name == "history.json":  # Trainer's end-of-training summary covers only the last attempt's steps
                data = [row for row in data if "train_loss" not in row]
            if path.name == "adapter_config.json":  # PEFT saves a set: its order follows the process's hash seed
                data["target_modules"] = sorted(data["target_modules"])
            out[rel] = data
        elif path.suffix in (".yaml", ".jsonl"):
            out[rel] = path.read_text().replace(str(study), "STUDY")
        elif path.suffix not in (".md", ".html", ".csv"):  # the report's renderings of results.json (timings too)
            out[rel] = path.read_bytes()
    return out


def _count(pattern: str, out: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run_id in re.findall(pattern, out):
        counts[run_id] = counts.get(run_id, 0) + 1
    return counts


def _started(out: str) -> dict[str, int]:
    """How many times each run started, from the driver's progress lines."""
    return _count(r"\] (\S+) started on ", out)


def _finished(out: str) -> dict[str, int]:
    return _count(r"\] (\S+) finished, eval loss ", out)


def test_ray_study_trains_each_run_once_and_matches_sequential(
    ray_session, sequential, tiny_model_dir, records, tmp_path, capsys
):
    capsys.readouterr()
    study = tmp_path / "study"
    assert main(_args(tiny_model_dir, records, study, "--ray", "local")) == 0
    out = capsys.readouterr().out
    assert _started(out) == dict.fromkeys(RUN_IDS, 1) == _finished(out)
    assert "[test: 4 done, 0 running, 0 failed, 0 left" in out
    assert _results(study) == _results(sequential)


def _snapshot(study: Path) -> dict[str, int]:
    return {p.relative_to(study).as_posix(): p.stat().st_mtime_ns for p in study.rglob("*")}


def test_sync_driver_brings_each_run_back_through_ray(
    ray_session, sequential, tiny_model_dir, records, tmp_path, capsys
):
    """The no-shared-filesystem path, forced on the local cluster: runs train in the node's scratch folders and
    come back as tar bytes that the driver unpacks; the study holds the same results as the sequential one."""
    capsys.readouterr()
    study = tmp_path / "study"
    assert main(_args(tiny_model_dir, records, study, "--ray", "local", "--ray_sync", "driver")) == 0
    assert _started(capsys.readouterr().out) == dict.fromkeys(RUN_IDS, 1)
    assert _results(study) == _results(sequential)
    assert not any((study / INCOMING_DIR).iterdir())  # every run moved into runs/
    assert not any(ray_study.scratch_dir(str(study), r).exists() for r in RUN_IDS)  # the nodes' copies are gone


class KillFirstStart(ray_study.Progress):
    """kill -9 of the Ray worker that starts the study's first run, as soon as it says it started."""

    killed: ClassVar[list[str]] = []

    def started(self, run_id: str, attempt: int, node: str, pid: int) -> None:
        super().started(run_id, attempt, node, pid)
        if not self.killed:
            self.killed.append(run_id)
            os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_s_run_is_retried_and_the_study_finishes(
    ray_session, sequential, tiny_model_dir, records, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(ray_study, "Progress", KillFirstStart)
    monkeypatch.setattr(KillFirstStart, "killed", [])
    capsys.readouterr()
    study = tmp_path / "study"
    assert main(_args(tiny_model_dir, records, study, "--ray", "local")) == 0
    out = capsys.readouterr().out
    [victim] = KillFirstStart.killed
    assert _started(out) == {r: 2 if r == victim else 1 for r in RUN_IDS}  # the killed run again, no other
    assert f"{victim} started on " in out and "attempt 2 of 3" in out
    assert _finished(out) == dict.fromkeys(RUN_IDS, 1)  # trained to the end once each
    assert _results(study) == _results(sequential)


class KillAtCheckpoint(ray_study.Progress):
    """kill -9 of the worker training the study's first run once that run has a complete checkpoint: mid-training."""

    killed: ClassVar[list[str]] = []
    study: ClassVar[Path | None] = None

    def started(self, run_id: str, attempt: int, node: str, pid: int) -> None:
        super().started(run_id, attempt, node, pid)
        if not self.killed:
            self.killed.append(run_id)
            threading.Thread(target=self._kill_at_checkpoint, args=(run_id, pid), daemon=True).start()

    def _kill_at_checkpoint(self, run_id: str, pid: int) -> None:
        folder = RunFolder.in_study(self.study, run_id)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any((c / RESUME_FILE).is_file() for c in folder.checkpoints()):
            time.sleep(0.005)  # polling the folder for the checkpoint's last file, not waiting on a guess
        os.kill(pid, signal.SIGKILL)


def test_a_worker_killed_mid_training_resumes_its_run_from_the_checkpoint(
    ray_session, tiny_model_dir, records, tmp_path, capsys, monkeypatch
):
    """A retried run does not start over: it resumes from the checkpoint its killed attempt left, and ends with the
    results of a run never killed (the reference trains the same grid without Ray, on 1 thread as each task)."""
    every = ("--checkpoint_every", "1", "--logging_steps", "1", "--seeds", "0")
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(tiny_model_dir, records, reference, *every)) == 0
    finally:
        torch.set_num_threads(threads)
    study = tmp_path / "study"
    monkeypatch.setattr(ray_study, "Progress", KillAtCheckpoint)
    monkeypatch.setattr(KillAtCheckpoint, "killed", [])
    monkeypatch.setattr(KillAtCheckpoint, "study", study)
    capsys.readouterr()
    assert main(_args(tiny_model_dir, records, study, *every, "--ray", "local")) == 0
    out = capsys.readouterr().out
    [victim] = KillAtCheckpoint.killed
    assert _started(out)[victim] == 2 and _finished(out)[victim] == 1
    metrics = RunFolder.in_study(study, victim).read_metrics()
    assert metrics["resumed_from_step"] >= 1  # taken up from its checkpoint, not redone
    assert not RunFolder.in_study(study, victim).checkpoints()  # gone once metrics.json is written
    assert _results(study) == _results(reference)


class KillEveryStart(ray_study.Progress):
    """Every start of one run is killed: a run that keeps failing."""

    target = "olora+_lam4_lr0.0002_seed0"

    def started(self, run_id: str, attempt: int, node: str, pid: int) -> None:
        super().started(run_id, attempt, node, pid)
        if run_id == self.target:
            os.kill(pid, signal.SIGKILL)


def test_a_run_that_keeps_dying_is_recorded_failed_the_rest_go_on_and_a_rerun_retries_only_it(
    ray_session, sequential, tiny_model_dir, records, tmp_path, capsys, monkeypatch
):
    victim = KillEveryStart.target
    study = tmp_path / "study"
    args = _args(tiny_model_dir, records, study, "--ray", "local", "--ray_retries", "1")
    monkeypatch.setattr(ray_study, "Progress", KillEveryStart)
    capsys.readouterr()
    assert main(args) == 1  # the study ended, not all of it
    out = capsys.readouterr().out
    assert _started(out) == {r: 2 if r == victim else 1 for r in RUN_IDS}  # 1 retry, then given up
    failure = json.loads((study / "runs" / victim / "failed.json").read_text())
    assert "died on each of 2 attempt(s)" in failure["error"]
    assert f"{victim}: its worker died" in out
    assert sorted(p.parent.name for p in study.glob("runs/*/metrics.json")) == sorted(set(RUN_IDS) - {victim})
    report = (study / "report.md").read_text()
    assert victim in report and "died on each of 2 attempt(s)" in report  # the report says why it has no results

    monkeypatch.undo()  # no more kills
    before = _snapshot(study / "runs")
    assert main(args) == 0
    assert _started(capsys.readouterr().out) == {victim: 1}  # finished runs skipped, the failed one retried
    assert not (study / "runs" / victim / "failed.json").exists()
    assert {k: v for k, v in _snapshot(study / "runs").items() if not k.startswith(victim)} == {
        k: v for k, v in before.items() if not k.startswith(victim)
    }
    assert _results(study) == _results(sequential)


TUNED = ["--methods", "olora", "--seeds", "0", "--protocol", "tuned", "--lrs", "1e-4,4e-4", "--val_fraction", "0.25"]


def test_both_stages_of_protocol_tuned_run_on_ray_and_choose_as_sequential(
    ray_session, tiny_model_dir, records, tmp_path, capsys
):
    """The lr selection runs, then the test run at the chosen lr, each stage as Ray tasks; the same choice and
    results as the sequential study."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(tiny_model_dir, records, tmp_path / "sequential", *TUNED)) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    study = tmp_path / "ray"
    assert main(_args(tiny_model_dir, records, study, *TUNED, "--ray", "local")) == 0
    out = capsys.readouterr().out
    assert "(lr selection): 2 runs, 0 already finished, 2 to run on Ray" in out
    assert "(test): 1 runs, 0 already finished, 1 to run on Ray" in out
    assert _started(out) == {
        "olora_lam1_lr0.0001_seed0_select": 1,
        "olora_lam1_lr0.0004_seed0_select": 1,
        f"olora_lam1_lr{json.loads((study / 'selection.json').read_text())['olora/1']['chosen_lr']:g}_seed0": 1,
    }
    assert _results(study) == _results(tmp_path / "sequential")


def test_importing_the_study_code_imports_neither_ray_nor_torch():
    code = "import sys, oloraplus.cli, oloraplus.study, oloraplus.ray_study; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="needs a tracker that is not installed")
def test_an_error_inside_a_run_is_recorded_without_retries(ray_session, tiny_model_dir, records, tmp_path, capsys):
    """A bad input only the node meets (a tracker not installed there) fails each run once, with its error."""
    study = tmp_path / "study"
    args = _args(
        tiny_model_dir, records, study, "--seeds", "0", "--report_to", "wandb", "--no_report", "--ray", "local"
    )
    capsys.readouterr()
    assert main(args) == 1
    out = capsys.readouterr().out
    assert _started(out) == dict.fromkeys(RUN_IDS[:2], 1)  # not retried
    for run_id in RUN_IDS[:2]:
        error = json.loads((study / "runs" / run_id / "failed.json").read_text())["error"]
        assert error == "report_to: tracker 'wandb' is not installed (pip install the package of that name)"
    assert "[test: 0 done, 0 running, 2 failed, 0 left" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster at '127.0.0.1:1'"),
        (["--ray", "local", "--ray_cpus_per_run", "3"], "can take a run asking for 3 CPU(s) and 0 GPU(s)"),
        (["--ray", "local", "--ray_gpus_per_run", "1"], "can take a run asking for 1 CPU(s) and 1 GPU(s)"),
        (["--ray", "local", "--ray_sync", "nfs"], "--ray_sync must be one of shared, driver, got 'nfs'"),
        (["--ray_sync", "driver"], "--ray_sync needs --ray"),
    ],
)
def test_bad_ray_input_is_one_line_exit_2_and_touches_nothing(
    ray_session, sequential, tiny_model_dir, records, tmp_path, capsys, flags, message
):
    study = tmp_path / "study"
    shutil.copytree(sequential, study)
    for config in study.glob("runs/*/config.yaml"):  # a run folder names its own path
        config.write_text(config.read_text().replace(str(sequential), str(study)))
    before = _snapshot(study)
    capsys.readouterr()
    assert main(_args(tiny_model_dir, records, study, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("oloraplus: error: ") and message in err and "\n" not in err
    assert _snapshot(study) == before


def test_ray_local_starts_its_own_cluster_of_the_given_size_and_refuses_a_run_it_cannot_host(
    tiny_model_dir, records, tmp_path
):
    """Outside this module's session: `--ray local` starts a cluster (here of 1 CPU), finds that no node can take a
    2-CPU run, says so in one line, exits 2 and closes the cluster; the study folder is not even made."""
    study = tmp_path / "study"
    args = _args(tiny_model_dir, records, study, "--ray", "local", "--ray_local_cpus", "1", "--ray_cpus_per_run", "2")
    proc = subprocess.run(
        [sys.executable, "-m", "oloraplus.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("oloraplus: error: ")]
    assert errors == [
        "oloraplus: error: no node of the Ray cluster (local) can take a run asking for 2 CPU(s) and 0 GPU(s) "
        "(--ray_cpus_per_run, --ray_gpus_per_run); the largest offers 1 CPU(s) and 0 GPU(s)"
    ]
    assert not study.exists()
