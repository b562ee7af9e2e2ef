"""Step 1 of the report: read a study folder (study.yaml, selection.json, run folders) into plain objects.

The grid is rebuilt from study.yaml by the same config code that ran the study
(build_config, build_grid), so its defaults and rules (baseline, protocol, which
lrs protocol fixed compares at, which runs were planned) are asked of that code,
never written again here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oloraplus.config import RunConfig, build_config
from oloraplus.errors import OLoRAPlusError
from oloraplus.grid import (
    GridConfig,
    build_grid,
    fixed_lrs,
    is_selection_run_id,
    planned_specs,
    read_selection,
)
from oloraplus.runs import RUNS_DIR, STUDY_FILE, RunFolder, run_folders


@dataclass(frozen=True)
class Run:
    """One ended run (finished or diverged): its folder and metrics.json."""

    folder: RunFolder
    metrics: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.folder.run_id

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def method(self) -> str:
        return str(self.metrics["method"])

    @property
    def lr_ratio(self) -> float:
        return float(self.metrics.get("lr_ratio", 1.0))

    @property
    def lr(self) -> float:
        return float(self.metrics["lr"])

    @property
    def seed(self) -> int:
        return int(self.metrics["seed"])

    @property
    def finished(self) -> bool:
        return self.metrics.get("status") == "finished"

    @property
    def kind(self) -> str:
        """'selection' (validation only, never read the test split) or 'test'."""
        return "selection" if is_selection_run_id(self.run_id) else "test"

    @functools.cached_property
    def predictions(self) -> dict[int, dict[str, Any]]:
        """Prediction rows keyed by test-record index (the key that pairs runs), read once."""
        return {int(r["index"]): r for r in self.folder.read_predictions()}

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """config.yaml as the run wrote it (fields a later version added are absent, not defaulted); {} if missing."""
        if not self.folder.config.is_file():
            return {}
        try:
            data = yaml.safe_load(self.folder.config.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise OLoRAPlusError(f"cannot read {self.folder.config}: {e}") from e
        return data if isinstance(data, dict) else {}

    def history(self) -> list[dict[str, Any]]:
        return self.folder.read_history()

    def dynamics(self) -> list[dict[str, Any]]:
        return self.folder.read_dynamics()


@dataclass
class Study:
    path: Path
    spec: dict[str, Any]  # study.yaml as written (results.json repeats it)
    base: RunConfig  # study.yaml's base, through build_config
    grid: GridConfig  # study.yaml's grid, through build_grid
    runs: list[Run]  # ended test-evaluated runs
    unfinished: list[str]  # run ids with a folder but no metrics.json, or not started
    expected: int | None  # runs in the grid, None when selection.json cannot be expanded
    selection_runs: list[Run] = field(default_factory=list)  # ended lr-selection runs (validation only)
    selection: dict[str, dict[str, Any]] | None = None  # selection.json, once the lrs are chosen
    failed: dict[str, str] = field(default_factory=dict)  # unfinished run id -> its failed.json error (Ray studies)

    @property
    def baseline(self) -> str:
        return self.grid.baseline

    @property
    def protocol(self) -> str:
        return self.grid.protocol

    @property
    def compares_fixed(self) -> bool:
        """Protocol fixed or both: methods are compared with the baseline at the same lr."""
        return self.protocol != "tuned"

    @property
    def compares_tuned(self) -> bool:
        """Protocol tuned or both: each method/lr_ratio at the lr it chose on validation data."""
        return self.grid.tuned

    @property
    def fixed_lrs(self) -> list[float] | None:
        """The lrs protocol fixed compares at; None = every lr with runs (protocol fixed: the lr axis)."""
        return None if self.protocol == "fixed" else fixed_lrs(self.base, self.grid)


def read_spec(spec_path: Path) -> tuple[dict[str, Any], RunConfig, GridConfig]:
    """study.yaml as written, and its base run config and grid as the study code builds them."""
    try:
        spec = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise OLoRAPlusError(f"cannot read {spec_path}: {e}") from e
    if not isinstance(spec, dict):
        raise OLoRAPlusError(f"{spec_path}: the top level must be a mapping")
    try:
        base = build_config(spec.get("base") or {}, source=str(spec_path))
        grid = build_grid(spec.get("grid") or {})
    except OLoRAPlusError as e:
        raise OLoRAPlusError(f"{spec_path} does not describe a study this version can read: {e}") from e
    return spec, base, grid


def _expected_run_ids(base: RunConfig, grid: GridConfig, selection: dict[str, Any] | None) -> list[str] | None:
    """The study's run ids, planned by the same code that ran it; None if selection.json cannot be expanded."""
    try:
        return [s.run_id for s in planned_specs(base, grid, selection)]
    except (OLoRAPlusError, TypeError, ValueError, KeyError):
        return None


def load_study(study_dir: str | Path) -> Study:
    """study.yaml plus every run folder; raises OLoRAPlusError when there is nothing to report."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise OLoRAPlusError(f"study folder {study_dir} does not exist")
    spec_path = study_dir / STUDY_FILE
    if not spec_path.is_file():
        raise OLoRAPlusError(f"{spec_path} not found: is {study_dir} a folder made by `oloraplus compare`?")
    spec, base, grid = read_spec(spec_path)
    folders = run_folders(study_dir)
    runs = [Run(f, f.read_metrics()) for f in folders if f.ended]
    if not runs:
        raise OLoRAPlusError(f"{study_dir / RUNS_DIR} holds no finished runs (no run folder has metrics.json yet)")
    ended = {r.run_id for r in runs}
    unfinished = [f.run_id for f in folders if f.run_id not in ended]
    selection = read_selection(study_dir)
    expected = _expected_run_ids(base, grid, selection)
    if expected is not None:
        present = {f.run_id for f in folders}
        unfinished += [rid for rid in expected if rid not in present]
    return Study(
        study_dir,
        spec,
        base,
        grid,
        [r for r in runs if r.kind == "test"],
        unfinished,
        len(expected) if expected is not None else None,
        selection_runs=[r for r in runs if r.kind == "selection"],
        selection=selection,
        failed={f.run_id: error for f in folders if (error := f.read_failure()) is not None},
    )
