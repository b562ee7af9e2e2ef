"""A study on a Ray cluster: each unfinished run is one Ray task asking for CPUs and a share of a GPU, and Ray
places the tasks over the cluster's nodes. This process, the driver, keeps the study folder.

The study folder stays the one source of truth: the driver decides what is finished
(metrics.json), writes study.yaml, selection.json and failed runs' failed.json, and the
report at the end; the tasks only train. How a run's files reach the study folder (`sync`):

- shared: every node sees the study folder at the same path (one machine, NFS): a task
  trains straight into its run folder, as a sequential study does;
- driver: the nodes share no filesystem: a task trains into a scratch folder on its own
  node and returns the run folder's files as tar bytes through Ray's object store; the
  driver unpacks them under STUDY/.incoming and renames the folder into STUDY/runs, so a
  run appears whole or not at all.

A worker or node that dies mid-run is Ray's to retry (max_retries): the task starts again
and `train_run` takes the run folder up where it was left. An exception inside a run (an
OLoRAPlusError: a bad input on that node) is not retried: the run is recorded as failed
with its error and the other runs go on. Ray is imported inside functions: `import
oloraplus.study` stays light for those who never use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oloraplus.config import RunConfig, coerce
from oloraplus.errors import OLoRAPlusError
from oloraplus.fsutil import atomic_write_json, atomic_write_text
from oloraplus.grid import RunSpec
from oloraplus.runs import INCOMING_DIR, STUDY_FILE, RunFolder, is_finished
from oloraplus.study import fmt_seconds, outcome, train_run

LOCAL = "local"  # start a Ray cluster on this machine
SYNC_MODES = ("shared", "driver")
GPU_SHARE = 0.25  # a run's default share of a GPU where the cluster has GPUs: a small model leaves most of one idle
CONNECT_TIMEOUT_S = 10.0  # ray.init retries an unreachable address for minutes; a plain TCP connect says it at once


@dataclass(frozen=True)
class RayOptions:
    """Where the study runs and what each run asks of Ray (the --ray flags of `oloraplus compare`)."""

    address: str  # local | auto | HOST:PORT | ray://HOST:PORT
    cpus_per_run: int = 1  # also the run's torch threads
    gpus_per_run: float | None = None  # None: GPU_SHARE on a cluster with GPUs, else 0
    retries: int = 2  # after a worker or node died
    sync: str = "shared"
    local_cpus: int | None = None  # the CPUs of a local cluster (None: all cores)

    @classmethod
    def parse(
        cls,
        address: str,
        cpus_per_run: Any = 1,
        gpus_per_run: Any = None,
        retries: Any = 2,
        sync: Any = "shared",
        local_cpus: Any = None,
    ) -> RayOptions:
        """The options from command-line strings, or one line naming the bad one."""
        cpus = coerce("ray_cpus_per_run", cpus_per_run, int)
        gpus = coerce("ray_gpus_per_run", gpus_per_run, float | None)
        tries = coerce("ray_retries", retries, int)
        local = coerce("ray_local_cpus", local_cpus, int | None)
        if not address:
            raise OLoRAPlusError("--ray: give local, auto, HOST:PORT or ray://HOST:PORT")
        if cpus < 1:
            raise OLoRAPlusError(f"--ray_cpus_per_run must be a whole number >= 1, got '{cpus_per_run}'")
        if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
            raise OLoRAPlusError(
                f"--ray_gpus_per_run must be a number >= 0 (0.25: four runs share a GPU), got '{gpus}'"
            )
        if tries < 0:
            raise OLoRAPlusError(f"--ray_retries must be a whole number >= 0, got '{retries}'")
        if sync not in SYNC_MODES:
            raise OLoRAPlusError(f"--ray_sync must be one of {', '.join(SYNC_MODES)}, got '{sync}'")
        if local is not None and (local < 1 or address != LOCAL):
            raise OLoRAPlusError(f"--ray_local_cpus needs --ray local and a whole number >= 1, got '{local_cpus}'")
        return cls(address, cpus, gpus, tries, str(sync), local)


# --- connecting ---------------------------------------------------------------------------------------


def _check_reachable(address: str) -> None:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise OLoRAPlusError(f"--ray: give local, auto, HOST:PORT or ray://HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise OLoRAPlusError(f"cannot reach the Ray cluster at '{address}': {e.strerror or e}") from e


def _connect(opts: RayOptions) -> bool:
    """Join or start the cluster; True when this call opened the session (and so closes it)."""
    import ray

    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # the driver prints progress, not run logs
    if opts.address not in (LOCAL, "auto"):
        _check_reachable(opts.address)
    if opts.address == LOCAL:
        if ray.is_initialized():  # a session this process opened already (a notebook, a test): run on it
            return False
        # "local": a new cluster, even where RAY_ADDRESS or a `ray start` on this machine names another
        ray.init(address="local", num_cpus=opts.local_cpus, include_dashboard=False, **quiet)
        return True
    if ray.is_initialized():
        raise OLoRAPlusError(f"a Ray session is already open in this process; cannot also join '{opts.address}'")
    try:
        ray.init(address=opts.address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OLoRAPlusError(f"cannot connect to the Ray cluster at '{opts.address}': {first}") from e
    return True


def _plan(opts: RayOptions) -> tuple[float, int]:
    """A run's GPU share and how many runs fit at once; one line if no node can take a single run."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    has_gpus = any(n.get("GPU", 0) > 0 for n in nodes)
    gpus = opts.gpus_per_run if opts.gpus_per_run is not None else (GPU_SHARE if has_gpus else 0.0)

    def fit(n: dict[str, float]) -> int:
        by_cpu = math.floor(n.get("CPU", 0) / opts.cpus_per_run + 1e-9)
        return by_cpu if gpus == 0 else min(by_cpu, math.floor(n.get("GPU", 0) / gpus + 1e-9))

    slots = sum(fit(n) for n in nodes)
    if slots == 0:
        biggest = max(nodes, key=lambda n: (n.get("CPU", 0), n.get("GPU", 0)), default={})
        raise OLoRAPlusError(
            f"no node of the Ray cluster ({opts.address}) can take a run asking for {opts.cpus_per_run} CPU(s) and "
            f"{gpus:g} GPU(s) (--ray_cpus_per_run, --ray_gpus_per_run); the largest offers "
            f"{biggest.get('CPU', 0):g} CPU(s) and {biggest.get('GPU', 0):g} GPU(s)"
        )
    return gpus, slots


# --- inside a task --------------------------------------------------------------------------------------


class _Board:
    """A small actor the tasks tell when they start (run id, pid, node): the driver's view of what is running
    and of retries, as it happens (the driver waits on `events_after`, it does not poll)."""

    def __init__(self) -> None:
        import asyncio

        self._events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    async def started(self, run_id: str, pid: int, node: str) -> None:
        self._events.append({"run_id": run_id, "pid": pid, "node": node})
        self._changed.set()

    async def events_after(self, seen: int) -> list[dict[str, Any]]:
        while len(self._events) <= seen:
            self._changed.clear()
            await self._changed.wait()
        return self._events[seen:]


def scratch_dir(study_dir: str, run_id: str) -> Path:
    """A node's own folder for a run of sync driver: kept across a retry on that node, so the run resumes."""
    key = hashlib.sha1(f"{socket.gethostname()}:{Path(study_dir).resolve()}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "oloraplus-ray" / key / run_id


def pack_run_folder(run_dir: Path) -> bytes:
    """The run folder as an uncompressed tar (adapters are float tensors: gzip would cost CPU and save little)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(run_dir, arcname=".")
    return buf.getvalue()


def _train_task(cfg: RunConfig, study_dir: str, sync: str, board: Any) -> dict[str, Any]:
    """One run, on whichever node Ray chose: its metrics, and in sync driver its files."""
    import ray
    import torch

    ctx = ray.get_runtime_context()
    torch.set_num_threads(max(1, int(ctx.get_assigned_resources().get("CPU", 1))))
    node = ray.util.get_node_ip_address()
    run_id = Path(cfg.output_dir).name
    # not waited on: a task blocked in ray.get lends its CPU to another task, and a third run would start on 2 CPUs
    board.started.remote(run_id, os.getpid(), node)
    try:
        if sync == "shared":
            if not (Path(study_dir) / STUDY_FILE).is_file():
                raise OLoRAPlusError(
                    f"node {node} does not see the study folder {study_dir}: use --ray_sync driver where the nodes "
                    "share no filesystem"
                )
            # a retry after the worker died just past metrics.json must not train the run a second time
            metrics = RunFolder(Path(cfg.output_dir)).read_metrics() if is_finished(cfg.output_dir) else None
            return {"node": node, "pid": os.getpid(), "metrics": metrics or train_run(cfg)}
        local = scratch_dir(study_dir, run_id)
        metrics = RunFolder(local).read_metrics() if is_finished(local) else None
        metrics = metrics or train_run(dataclasses.replace(cfg, output_dir=str(local)))
        files = pack_run_folder(local)
        shutil.rmtree(local)  # the bytes are in the object store now; the driver writes the study's copy
        return {"node": node, "pid": os.getpid(), "metrics": metrics, "files": files}
    except OLoRAPlusError as e:  # a bad input on this node: the run fails, the study goes on
        return {"node": node, "pid": os.getpid(), "error": str(e)}


# --- the driver ------------------------------------------------------------------------------------------


def install_run_folder(cfg: RunConfig, files: bytes) -> None:
    """Write a run folder a task sent back into the study: unpacked beside the runs, then renamed into place."""
    target = Path(cfg.output_dir)
    incoming = target.parent.parent / INCOMING_DIR
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=incoming, prefix=f"{target.name}."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a run folder is made like any other folder
    try:
        with tarfile.open(fileobj=io.BytesIO(files)) as tf:
            tf.extractall(tmp, filter="data")
        # config.yaml as a sequential study writes it: the run lives here now, not in the node's scratch folder
        atomic_write_text(RunFolder(tmp).config, cfg.to_yaml())
        for path in tmp.rglob("*"):  # on disk before the rename makes the run finished
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if target.exists():  # an unfinished attempt (never a finished run: those are not sent to Ray)
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Progress:
    """The terminal view of one stage on Ray: a line per start, end and failure, with runs done / running /
    failed / left and an ETA from the mean run time so far over the runs that fit at once."""

    def __init__(self, stage: str, total: int, slots: int, attempts: int) -> None:
        self.stage, self.total, self.slots, self.attempts = stage, total, slots, attempts
        self.running: dict[str, float] = {}  # run id -> when its current attempt started
        self.done: list[float] = []  # run times of the runs ended so far
        self.failed = 0

    @property
    def left(self) -> int:
        return self.total - len(self.done) - self.failed - len(self.running)

    def eta(self) -> str:
        if not self.done:
            return "ETA after the first run"
        mean = sum(self.done) / len(self.done)
        now = time.monotonic()
        work = self.left * mean + sum(max(0.0, mean - (now - t)) for t in self.running.values())
        return f"ETA {fmt_seconds(work / max(1, min(self.slots, self.left + len(self.running))))}"

    def show(self, what: str) -> None:
        counts = f"{len(self.done)} done, {len(self.running)} running, {self.failed} failed, {self.left} left"
        print(f"[{self.stage}: {counts}, {self.eta()}] {what}", flush=True)

    def started(self, run_id: str, attempt: int, node: str, pid: int) -> None:
        self.running[run_id] = time.monotonic()
        again = f", attempt {attempt} of {self.attempts}" if attempt > 1 else ""
        self.show(f"{run_id} started on {node} (pid {pid}{again})")

    def ended(self, run_id: str, metrics: dict[str, Any]) -> None:
        t0 = self.running.pop(run_id, None)
        took = time.monotonic() - t0 if t0 is not None else float(metrics.get("train_seconds", 0.0))
        self.done.append(took)
        self.show(f"{run_id} {metrics['status']}{outcome(metrics)} in {fmt_seconds(took)}")

    def failure(self, run_id: str, error: str) -> None:
        self.running.pop(run_id, None)
        self.failed += 1
        self.show(f"{run_id} FAILED: {error}")


class RayRunner:
    """Runs a study's stages as Ray tasks (study.StageRunner); open it with `ray_runner`."""

    def __init__(self, opts: RayOptions, gpus_per_run: float, slots: int) -> None:
        import ray

        self.opts, self.gpus_per_run, self.slots = opts, gpus_per_run, slots
        self.failed: dict[str, str] = {}
        self.board = ray.remote(_Board).options(num_cpus=0).remote()
        self._seen = 0
        self._starts: dict[str, set[int]] = {}  # run id -> the worker pids it started on: its attempts
        self._events = self.board.events_after.remote(0)
        self._task = ray.remote(_train_task)

    def _submit(self, study_dir: Path, cfg: RunConfig) -> Any:
        RunFolder(Path(cfg.output_dir)).failed.unlink(missing_ok=True)  # tried again now
        return self._task.options(
            name=Path(cfg.output_dir).name,
            num_cpus=self.opts.cpus_per_run,
            num_gpus=self.gpus_per_run,
            max_retries=self.opts.retries,
            retry_exceptions=False,  # an error inside a run fails the same way again; only a death is retried
        ).remote(cfg, str(study_dir), self.opts.sync, self.board)

    def run_stage(self, study_dir: Path, stage: str, specs: list[RunSpec], configs: list[RunConfig]) -> None:
        import ray

        todo = [cfg for cfg in configs if not is_finished(cfg.output_dir)]
        gpus = f", {self.gpus_per_run:g} GPU" if self.gpus_per_run else ""
        print(
            f"study {study_dir} ({stage}): {len(specs)} runs, {len(specs) - len(todo)} already finished, "
            f"{len(todo)} to run on Ray, {self.slots} at a time ({self.opts.cpus_per_run} CPU{gpus} each, "
            f"sync {self.opts.sync})",
            flush=True,
        )
        progress = Progress(stage, len(todo), self.slots, self.opts.retries + 1)
        pending = {self._submit(study_dir, cfg): cfg for cfg in todo}
        while pending:
            [ready], _ = ray.wait([*pending, self._events], num_returns=1)
            if ready == self._events:
                running = {Path(c.output_dir).name for c in pending.values()}
                for e in ray.get(ready):
                    if e["run_id"] in running:
                        self._started(progress, e)
                    self._seen += 1
                self._events = self.board.events_after.remote(self._seen)
                continue
            cfg = pending.pop(ready)
            run_id = Path(cfg.output_dir).name
            error = self._collect(ready, cfg, progress)
            if error is None:
                progress.ended(run_id, RunFolder(Path(cfg.output_dir)).read_metrics())
                continue
            self.failed[run_id] = error
            atomic_write_json(
                RunFolder(Path(cfg.output_dir)).failed, {"run_id": run_id, "stage": stage, "error": error}
            )
            progress.failure(run_id, error)

    def _started(self, progress: Progress, event: dict[str, Any]) -> None:
        """Show a run's start once per attempt: from the board, or from its result when that came first."""
        pids = self._starts.setdefault(event["run_id"], set())
        if event["pid"] not in pids:
            pids.add(event["pid"])
            progress.started(event["run_id"], len(pids), event["node"], event["pid"])

    def _collect(self, ref: Any, cfg: RunConfig, progress: Progress) -> str | None:
        """Bring a task's result into the study folder; None when the run ended, else why it failed."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        try:
            result = ray.get(ref)
        except RayTaskError as e:  # an exception inside the run (not retried)
            cause = e.cause if e.cause is not None else e
            text = str(cause).strip()
            return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"
        except RayError as e:  # the worker or its node died on every attempt
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"its worker died on each of {self.opts.retries + 1} attempt(s) ({type(e).__name__}: {first})"
        self._started(progress, {"run_id": Path(cfg.output_dir).name, **result})
        if "error" in result:
            return result["error"]
        if "files" in result:
            install_run_folder(cfg, result["files"])
        elif not is_finished(cfg.output_dir):
            return (
                f"the run ended on node {result['node']} but {RunFolder(Path(cfg.output_dir)).metrics} is not here: "
                "the nodes do not share the study folder; use --ray_sync driver"
            )
        return None


@contextmanager
def ray_runner(opts: RayOptions) -> Iterator[RayRunner]:
    """Connect (or start a local cluster), check that a run fits on some node, run; then close what was opened."""
    import ray

    opened = _connect(opts)
    runner = None
    try:
        gpus, slots = _plan(opts)
        runner = RayRunner(opts, gpus, slots)
        yield runner
    finally:
        if runner is not None:
            with suppress(Exception):  # a cluster already gone must not hide the error that ended the study
                ray.kill(runner.board)
        if opened:
            ray.shutdown()
