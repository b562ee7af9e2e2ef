"""The grid of a study: methods x lambda x learning rates x seeds, and which runs each protocol trains.

Two protocols decide which runs are trained and which are compared:

- fixed: every method at one learning rate (or at each lr of `lrs`), over all seeds;
- tuned: each method/lambda first trains short or full *selection* runs at every lr
  of `lrs`, evaluated on validation only (eval_test false: they never read the test
  split); the lr with the lowest mean validation loss is chosen and written to
  STUDY/selection.json; then that method/lambda trains at its chosen lr over all
  seeds, evaluated on test.

Pure rules, no training: the study runs these specs (study.py), the report rebuilds
them from study.yaml (report/load.py), so both read one definition.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oloraplus.config import METHODS, RunConfig, build_config, coerce, field_types, list_item_type
from oloraplus.errors import OLoRAPlusError
from oloraplus.runs import RUNS_DIR

SELECTION_FILE = "selection.json"
PROTOCOLS = ("fixed", "tuned", "both")
SELECTION_SEEDS = ("first", "all")


@dataclass(frozen=True)
class GridConfig:
    """The study's grid: the `grid` section of a study YAML, and the flags of `oloraplus compare`.

    Every field carries its help text (and, where the default is not a plain value, the words
    `default_text` shows instead), so cli.py builds one flag per field. A list field is given
    comma-separated on the command line, as its item type; float lists accept fractions (1/16).
    """

    methods: list[str] = field(
        default_factory=lambda: ["olora", "olora+"], metadata={"help": f"methods in the grid: {' | '.join(METHODS)}"}
    )
    lr_ratios: list[float] = field(
        default_factory=lambda: [1 / 16, 1 / 4, 4.0, 16.0],
        metadata={"help": "lambda values for the '+' methods (fractions allowed: 1/16)"},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds"})
    lrs: list[float] | None = field(
        default=None,
        metadata={
            "help": "base learning rates: the lr axis of protocol fixed, the candidates of protocol tuned",
            "default_text": "train.lr (--lr)",
        },
    )
    baseline: str = field(default="olora", metadata={"help": "the method every other run is compared with"})
    protocol: str = field(
        default="fixed",
        metadata={
            "help": "fixed: every method at one lr; tuned: each method/lambda at the lr with the best validation "
            "loss (needs lrs with 2+ values and val_fraction > 0); both: the two"
        },
    )
    fixed_lr: float | None = field(
        default=None,
        metadata={
            "help": "the one lr of protocol fixed when lrs are the tuned candidates",
            "default_text": "train.lr (--lr)",
        },
    )
    selection_seeds: str = field(
        default="first", metadata={"help": "tuned: choose the lr on the first seed or on all seeds (first | all)"}
    )
    probe_fraction: float = field(
        default=1.0,
        metadata={
            "help": "tuned: selection runs train this fraction of the full steps, in (0, 1] (1 = full-length runs)"
        },
    )

    @property
    def tuned(self) -> bool:
        return self.protocol in ("tuned", "both")


GRID_OPTIONS = {f.name: f for f in dataclasses.fields(GridConfig)}


def grid_list_item_type(name: str) -> type | None:
    """The item type of a list option of the grid, None for a single-valued one."""
    return list_item_type(field_types(GridConfig)[name])


def _list_of(name: str, value: Any, kind: type) -> list:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and "/" in item and kind is float:  # allow 1/16 on the command line
            num, den = item.split("/", 1)
            item = coerce(name, num, float) / coerce(name, den, float)
        out.append(coerce(name, item, kind))
    return out


def _coerce_option(name: str, value: Any) -> Any:
    """A grid option from YAML or the command line, as its field's type."""
    if value is None:
        return None
    kind = grid_list_item_type(name)
    if kind is not None:
        items = _list_of(name, value, kind)
        return list(dict.fromkeys(items)) if name == "lrs" else items
    return coerce(name, value, field_types(GridConfig)[name])


def build_grid(data: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> GridConfig:
    merged = dict(data or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(merged) - set(GRID_OPTIONS)
    if unknown:
        raise OLoRAPlusError(f"unknown grid option(s): {', '.join(sorted(unknown))}")
    grid = GridConfig(**{k: _coerce_option(k, v) for k, v in merged.items() if v is not None})
    for m in grid.methods:
        if m not in METHODS:
            raise OLoRAPlusError(f"unknown method '{m}' in grid (known: {', '.join(METHODS)})")
    if not grid.methods or not grid.seeds:
        raise OLoRAPlusError("the grid needs at least one method and one seed")
    if grid.baseline not in grid.methods:
        raise OLoRAPlusError(f"baseline '{grid.baseline}' is not among the grid's methods {grid.methods}")
    _check_protocol_options(grid)
    return grid


def _check_protocol_options(grid: GridConfig) -> None:
    """The protocol options that can be judged without the run configuration."""
    if grid.protocol not in PROTOCOLS:
        raise OLoRAPlusError(f"protocol must be one of {', '.join(PROTOCOLS)}, got '{grid.protocol}'")
    if grid.selection_seeds not in SELECTION_SEEDS:
        raise OLoRAPlusError(f"selection_seeds must be first or all, got '{grid.selection_seeds}'")
    if not (math.isfinite(grid.probe_fraction) and 0 < grid.probe_fraction <= 1):
        raise OLoRAPlusError(f"probe_fraction must be in (0, 1], got {grid.probe_fraction}")
    if grid.fixed_lr is not None and not (math.isfinite(grid.fixed_lr) and grid.fixed_lr > 0):
        raise OLoRAPlusError(f"fixed_lr must be a finite number > 0, got {grid.fixed_lr}")
    if grid.tuned and len(grid.lrs or []) < 2:
        raise OLoRAPlusError(f"protocol {grid.protocol} chooses among learning rates: give lrs with at least 2 values")
    if grid.protocol == "fixed" and grid.lrs and grid.fixed_lr is not None:
        raise OLoRAPlusError("protocol fixed: give lrs (one fixed-lr comparison per lr) or fixed_lr, not both")


def check_protocol(base: RunConfig, grid: GridConfig) -> None:
    """The protocol options that need the run configuration: tuned selects on validation data."""
    if grid.tuned and base.data.val_fraction <= 0:
        raise OLoRAPlusError(
            f"protocol {grid.protocol} chooses the lr on validation loss: set val_fraction > 0 (e.g. 0.1)"
        )


# --- which runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run. `probe` is None for a run evaluated on test, else the length fraction of a selection run."""

    method: str
    lr_ratio: float
    lr: float
    seed: int
    probe: float | None = None

    @property
    def selection(self) -> bool:
        return self.probe is not None

    @property
    def run_id(self) -> str:
        # "lam" (the lr_ratio) stays in the id: committed studies' run folders are named so, and resume by it
        rid = f"{self.method}_lam{self.lr_ratio:g}_lr{self.lr:g}_seed{self.seed}"
        if self.probe is None:
            return rid
        return f"{rid}_select" if self.probe >= 1 else f"{rid}_probe{self.probe:g}"


SELECTION_RUN_ID = re.compile(r"_(select|probe[0-9.e+-]+)$")


def is_selection_run_id(run_id: str) -> bool:
    """Selection runs (validation only) are told apart from test-evaluated runs by their id suffix."""
    return bool(SELECTION_RUN_ID.search(run_id))


def selection_key(method: str, lr_ratio: float) -> str:
    """'olora+/0.25': the key of one method/lambda in selection.json."""
    return f"{method}/{lr_ratio:g}"


def method_lr_ratios(grid: GridConfig) -> list[tuple[str, float]]:
    """Every (method, lambda) of the grid; a '+' method at lambda = 1 is its parent, dropped when the parent is there."""
    pairs: list[tuple[str, float]] = []
    for method in grid.methods:
        plus = METHODS[method][1]
        for lr_ratio in grid.lr_ratios if plus else [1.0]:
            if plus and lr_ratio == 1.0 and method.rstrip("+") in grid.methods:
                continue
            pairs.append((method, float(lr_ratio)))
    return list(dict.fromkeys(pairs))


def fixed_lrs(base: RunConfig, grid: GridConfig) -> list[float]:
    """The learning rates of protocol fixed: the lr axis when protocol is fixed, else the one fixed_lr."""
    if grid.protocol == "tuned":
        return []
    if grid.protocol == "fixed" and grid.lrs:
        return [float(lr) for lr in grid.lrs]
    return [float(grid.fixed_lr if grid.fixed_lr is not None else base.train.lr)]


def selection_seeds(grid: GridConfig) -> list[int]:
    return list(grid.seeds) if grid.selection_seeds == "all" else [grid.seeds[0]]


def expand_grid(base: RunConfig, grid: GridConfig) -> list[RunSpec]:
    """The runs of protocol fixed, seed-major, so an interrupted grid has whole seeds done first."""
    return [
        RunSpec(method, lr_ratio, lr, int(seed))
        for seed in grid.seeds
        for lr in fixed_lrs(base, grid)
        for method, lr_ratio in method_lr_ratios(grid)
    ]


def selection_specs(grid: GridConfig) -> list[RunSpec]:
    """The selection runs of protocol tuned: every method/lambda at every lr, on the selection seeds."""
    if not grid.tuned:
        return []
    return [
        RunSpec(method, lr_ratio, float(lr), int(seed), probe=grid.probe_fraction)
        for seed in selection_seeds(grid)
        for lr in grid.lrs or []
        for method, lr_ratio in method_lr_ratios(grid)
    ]


def tuned_specs(grid: GridConfig, selection: dict[str, dict[str, Any]]) -> list[RunSpec]:
    """Each method/lambda at its chosen lr over all seeds; one whose every lr diverged has none."""
    chosen = [(e["method"], float(e["lr_ratio"]), e["chosen_lr"]) for e in selection.values()]
    return [
        RunSpec(method, lr_ratio, float(lr), int(seed))
        for seed in grid.seeds
        for method, lr_ratio, lr in chosen
        if lr is not None
    ]


def final_specs(base: RunConfig, grid: GridConfig, selection: dict[str, dict[str, Any]] | None) -> list[RunSpec]:
    """The test-evaluated runs of both protocols, seed-major, each run once (a tuned run at fixed_lr is reused).

    Within a seed the tuned runs come first: a study stopped part-way then holds the fair
    comparison (each method at its own lr) for as many seeds as possible.
    """
    specs = (tuned_specs(grid, selection) if selection else []) + expand_grid(base, grid)
    specs.sort(key=lambda s: grid.seeds.index(s.seed))  # stable: keeps the order within a seed
    return list(dict.fromkeys(specs))


def planned_specs(base: RunConfig, grid: GridConfig, selection: dict[str, dict[str, Any]] | None) -> list[RunSpec]:
    """Every run the study trains, as far as it is known (the tuned runs once the lrs are chosen)."""
    return selection_specs(grid) + final_specs(base, grid, selection)


# --- run configurations ----------------------------------------------------------------------------


def full_steps(base: RunConfig) -> int:
    """Optimizer steps of a full-length run: max_steps if set, else ceil(n_train_after_val / batch) x epochs."""
    t, d = base.train, base.data
    if t.max_steps > 0:
        return t.max_steps
    n_train = d.n_train - int(round(d.val_fraction * d.n_train))
    per_epoch = math.ceil(n_train / (t.batch_size * t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


def probe_steps(base: RunConfig, fraction: float) -> int:
    """Steps of a selection probe: max(1, round(fraction x full steps))."""
    return max(1, round(fraction * full_steps(base)))


def spec_config(base: RunConfig, spec: RunSpec, study_dir: Path) -> RunConfig:
    overrides: dict[str, Any] = {
        "method": spec.method,
        "lr_ratio": spec.lr_ratio,
        "lr": spec.lr,
        "seed": spec.seed,
        "output_dir": str(study_dir / RUNS_DIR / spec.run_id),
    }
    if spec.selection:  # validation only: a selection run never reads the test split
        overrides["eval_test"] = False
        if spec.probe is not None and spec.probe < 1:
            overrides["max_steps"] = probe_steps(base, spec.probe)
    return build_config(base.to_dict(), overrides)


# --- lr selection ------------------------------------------------------------------------------------


def _val_loss(metrics: dict[str, Any] | None) -> float:
    """A selection run's validation loss; a diverged run or a non-finite loss counts as +inf."""
    if not metrics or metrics.get("status") != "finished":
        return math.inf
    v = metrics.get("val_loss")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def choose_lrs(grid: GridConfig, metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method/lambda, the lr with the lowest mean validation loss over the selection seeds.

    `metrics` maps selection run ids to their metrics.json. Ties go to the first lr
    of `lrs`; a method/lambda whose every lr diverged gets chosen_lr None.
    """
    seeds = selection_seeds(grid)
    out: dict[str, dict[str, Any]] = {}
    for method, lr_ratio in method_lr_ratios(grid):
        by_lr: dict[float, float] = {}
        for lr in grid.lrs or []:
            ids = [RunSpec(method, lr_ratio, float(lr), s, grid.probe_fraction).run_id for s in seeds]
            missing = [i for i in ids if i not in metrics]
            if missing:
                raise OLoRAPlusError(f"selection run(s) without results: {', '.join(missing)}")
            by_lr[float(lr)] = sum(_val_loss(metrics[i]) for i in ids) / len(ids)
        finite = {lr: v for lr, v in by_lr.items() if math.isfinite(v)}
        out[selection_key(method, lr_ratio)] = {
            "method": method,
            "lr_ratio": lr_ratio,
            "chosen_lr": min(finite, key=finite.__getitem__) if finite else None,
            "val_loss_by_lr": {f"{lr:g}": (v if math.isfinite(v) else None) for lr, v in by_lr.items()},
            "selection_seeds": seeds,
            "probe_fraction": grid.probe_fraction,
        }
    return out


def read_selection(study_dir: str | Path) -> dict[str, dict[str, Any]] | None:
    """STUDY/selection.json, or None before the selection has finished."""
    path = Path(study_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OLoRAPlusError(f"cannot read {path}: {e}") from e


def format_selection(selection: dict[str, dict[str, Any]]) -> str:
    """One line per method/lambda: its validation loss at every lr and the chosen lr."""
    lines = []
    for key, e in selection.items():
        losses = ", ".join(
            f"{lr} {v:.4f}" if v is not None else f"{lr} diverged" for lr, v in e["val_loss_by_lr"].items()
        )
        chosen = f"lr {e['chosen_lr']:g}" if e["chosen_lr"] is not None else "none: every lr diverged"
        lines.append(f"{key:<16} chosen {chosen}   (val loss by lr: {losses})")
    return "\n".join(lines)
