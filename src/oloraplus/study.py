"""The grid: methods x lambda x learning rates x seeds, one run folder each, resumable.

A run folder with metrics.json is finished and skipped; any other run folder is
redone from scratch. metrics.json is written atomically and last, so a process
killed at any moment (kill -9 included) loses at most the run in progress.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oloraplus.config import METHODS, RunConfig, build_config, coerce
from oloraplus.errors import OLoRAPlusError
from oloraplus.fsutil import atomic_write_text
from oloraplus.train import PreparedRun, is_finished, run_training

RUNS_DIR = "runs"


@dataclass(frozen=True)
class GridConfig:
    methods: list[str] = field(default_factory=lambda: ["olora", "olora+"], metadata={"help": "methods in the grid"})
    lr_ratios: list[float] = field(
        default_factory=lambda: [1 / 16, 1 / 4, 4.0, 16.0], metadata={"help": "lambda values for the '+' methods"}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "training seeds"})
    lrs: list[float] | None = field(default=None, metadata={"help": "base learning rates (default: train.lr)"})
    baseline: str = field(default="olora", metadata={"help": "the method every other run is compared with"})


GRID_OPTIONS = {f.name: f for f in dataclasses.fields(GridConfig)}


def _list_of(name: str, value: Any, kind: type) -> list:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and "/" in item and kind is float:  # allow 1/16 on the command line
            num, den = item.split("/", 1)
            item = coerce(name, num, float) / coerce(name, den, float)
        out.append(coerce(name, item, kind))
    return out


def build_grid(data: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> GridConfig:
    merged = dict(data or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(merged) - set(GRID_OPTIONS)
    if unknown:
        raise OLoRAPlusError(f"unknown grid option(s): {', '.join(sorted(unknown))}")
    kinds = {"methods": str, "lr_ratios": float, "seeds": int, "lrs": float}
    values = {k: (_list_of(k, v, kinds[k]) if k in kinds and v is not None else v) for k, v in merged.items()}
    grid = GridConfig(**values)
    for m in grid.methods:
        if m not in METHODS:
            raise OLoRAPlusError(f"unknown method '{m}' in grid (known: {', '.join(METHODS)})")
    if not grid.methods or not grid.seeds:
        raise OLoRAPlusError("the grid needs at least one method and one seed")
    if grid.baseline not in grid.methods:
        raise OLoRAPlusError(f"baseline '{grid.baseline}' is not among the grid's methods {grid.methods}")
    return grid


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr_ratio: float
    lr: float
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.method}_lam{self.lr_ratio:g}_lr{self.lr:g}_seed{self.seed}"


def expand_grid(base: RunConfig, grid: GridConfig) -> list[RunSpec]:
    """Seed-major order, so an interrupted grid has whole seeds done first.

    A '+' method at lambda = 1 is its parent; it is dropped when the parent is in the grid.
    """
    lrs = grid.lrs or [base.train.lr]
    specs: list[RunSpec] = []
    for seed in grid.seeds:
        for lr in lrs:
            for method in grid.methods:
                init, plus = METHODS[method]
                ratios = grid.lr_ratios if plus else [1.0]
                for ratio in ratios:
                    parent = method.rstrip("+")
                    if plus and ratio == 1.0 and parent in grid.methods:
                        continue
                    specs.append(RunSpec(method, float(ratio), float(lr), int(seed)))
    return list(dict.fromkeys(specs))


def spec_config(base: RunConfig, spec: RunSpec, study_dir: Path) -> RunConfig:
    overrides = {
        "method": spec.method,
        "lr_ratio": spec.lr_ratio,
        "lr": spec.lr,
        "seed": spec.seed,
        "output_dir": str(study_dir / RUNS_DIR / spec.run_id),
    }
    return build_config(base.to_dict(), overrides)


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    if saved != yaml.safe_load(cfg.to_yaml()):
        raise OLoRAPlusError(
            f"{run_dir} was made with a different configuration; use a new study folder or remove that run"
        )


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_study(study_dir: str | Path, base: RunConfig, grid: GridConfig) -> list[dict[str, Any]]:
    """Run every unfinished run of the grid; return the metrics of all finished runs, in grid order."""
    study_dir = Path(study_dir)
    specs = expand_grid(base, grid)
    configs = [spec_config(base, s, study_dir) for s in specs]
    for cfg in configs:  # refuse to mix runs made with another configuration, before training anything
        run_dir = Path(cfg.output_dir)
        if is_finished(run_dir):
            _check_same_config(run_dir, cfg)
    PreparedRun(configs[0])  # validates data, split, model and targets before anything is written
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        study_dir / "study.yaml",
        yaml.safe_dump({"base": base.to_dict(), "grid": dataclasses.asdict(grid)}, sort_keys=False),
    )
    todo = [i for i, cfg in enumerate(configs) if not is_finished(cfg.output_dir)]
    print(f"study {study_dir}: {len(specs)} runs, {len(specs) - len(todo)} already finished, {len(todo)} to run", flush=True)
    durations: list[float] = []
    for n, i in enumerate(todo, 1):
        spec, cfg = specs[i], configs[i]
        eta = f", ETA for the rest {_fmt_seconds(sum(durations) / len(durations) * (len(todo) - n + 1))}" if durations else ""
        print(f"\n[run {i + 1}/{len(specs)}] {spec.run_id} ({n} of {len(todo)} this sitting{eta})", flush=True)
        t0 = time.perf_counter()
        metrics = run_training(cfg, overwrite=True)
        durations.append(time.perf_counter() - t0)
        status = metrics["status"]
        extra = f" at step {metrics.get('diverged_step')}" if status == "diverged" else f", eval loss {metrics['eval_loss']:.4f}"
        print(f"[run {i + 1}/{len(specs)}] {status}{extra} in {_fmt_seconds(durations[-1])}", flush=True)
    return collect_metrics(study_dir, specs)


def collect_metrics(study_dir: Path, specs: list[RunSpec]) -> list[dict[str, Any]]:
    import json

    rows = []
    for spec in specs:
        path = study_dir / RUNS_DIR / spec.run_id / "metrics.json"
        if path.is_file():
            rows.append({"run_id": spec.run_id, **json.loads(path.read_text())})
    return rows


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
