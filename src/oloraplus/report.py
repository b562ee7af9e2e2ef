"""`oloraplus report`: read a study folder, write report.md/html, results.csv/json and plots.

The report is built once as a list of plain blocks (headings, paragraphs,
tables, images) and rendered twice, to Markdown and to self-contained HTML, so
the two can never say different things. Unfinished runs are counted and listed,
diverged runs are counted and shown: nothing is dropped silently.

A study has up to two protocols (see study.py): `fixed` compares every method
with the baseline at the same learning rate; `tuned` compares each method/lambda
at the lr it chose on validation data with the baseline at ITS chosen lr. Every
verdict row names its protocol. Selection runs (validation only) feed the
selection section and its heatmaps, never the test tables.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from oloraplus import plots
from oloraplus.errors import OLoRAPlusError
from oloraplus.fsutil import atomic_write_json, atomic_write_text, read_jsonl
from oloraplus.study import is_selection_run_id, read_selection
from oloraplus.stats import (
    DEFAULT_RESAMPLES,
    BootstrapResult,
    MeanCI,
    format_mean_ci,
    mean_ci,
    paired_bootstrap,
    paired_bootstrap_bleu,
)

RUNS_DIR = "runs"
PLOTS_DIR = "plots"
N_EXAMPLES = 3


@dataclass(frozen=True)
class Metric:
    key: str  # in metrics.json
    name: str
    example_key: str  # in predictions.jsonl
    higher_is_better: bool
    digits: int


METRICS = (
    Metric("eval_loss", "eval loss", "loss", False, 4),
    Metric("bleu", "BLEU", "bleu_stats", True, 2),
    Metric("rouge1", "ROUGE-1", "rouge1", True, 4),
    Metric("rouge2", "ROUGE-2", "rouge2", True, 4),
    Metric("rougeL", "ROUGE-L", "rougeL", True, 4),
)

CSV_COLUMNS = (
    "run_id", "kind", "method", "init", "lr_ratio", "lr", "seed", "status", "diverged_step", "n_train", "n_val", "n_test",
    "train_steps", "train_seconds", "train_tokens", "train_tokens_per_s", "precision", "final_train_loss",
    "val_loss", "eval_loss", "bleu", "rouge1", "rouge2", "rougeL", "eval_loss_seconds", "generation_seconds",
    "generated_tokens", "generation_tokens_per_s",
)


# --- reading the study ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One ended run (finished or diverged): its folder and metrics.json."""

    run_id: str
    path: Path
    metrics: dict[str, Any]

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


@dataclass
class Study:
    path: Path
    spec: dict[str, Any]  # study.yaml
    runs: list[Run]  # ended test-evaluated runs
    unfinished: list[str]  # run ids with a folder but no metrics.json, or not started
    expected: int | None  # runs in the grid, when study.yaml can be expanded
    selection_runs: list[Run] = field(default_factory=list)  # ended lr-selection runs (validation only)
    selection: dict[str, dict[str, Any]] | None = None  # selection.json, once the lrs are chosen

    @property
    def grid(self) -> dict[str, Any]:
        return self.spec.get("grid") or {}

    @property
    def base(self) -> dict[str, Any]:
        return self.spec.get("base") or {}

    @property
    def baseline(self) -> str:
        return str(self.grid.get("baseline") or "olora")

    @property
    def protocol(self) -> str:
        return str(self.grid.get("protocol") or "fixed")

    @property
    def fixed_lrs(self) -> list[float] | None:
        """The lrs protocol fixed compares at; None = every lr with runs (protocol fixed: the lr axis)."""
        if self.protocol == "fixed":
            return None
        if self.protocol == "tuned":
            return []
        lr = self.grid.get("fixed_lr")
        return [float(lr if lr is not None else (self.base.get("train") or {}).get("lr", 2e-4))]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # json accepts NaN
    except (OSError, ValueError) as e:
        raise OLoRAPlusError(f"cannot read {path}: {e}") from e


def _expected_run_ids(spec: dict[str, Any], selection: dict[str, Any] | None) -> list[str] | None:
    """The study's run ids, planned by the same code that ran it; None if study.yaml cannot be expanded."""
    from oloraplus.config import build_config
    from oloraplus.study import build_grid, planned_specs

    try:
        base = build_config(spec.get("base") or {}, source="study.yaml")
        return [s.run_id for s in planned_specs(base, build_grid(spec.get("grid") or {}), selection)]
    except (OLoRAPlusError, TypeError, ValueError, KeyError):
        return None


def load_study(study_dir: str | Path) -> Study:
    """study.yaml plus every run folder; raises OLoRAPlusError when there is nothing to report."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise OLoRAPlusError(f"study folder {study_dir} does not exist")
    spec_path = study_dir / "study.yaml"
    if not spec_path.is_file():
        raise OLoRAPlusError(f"{spec_path} not found: is {study_dir} a folder made by `oloraplus compare`?")
    try:
        spec = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise OLoRAPlusError(f"cannot read {spec_path}: {e}") from e
    runs_dir = study_dir / RUNS_DIR
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    runs = [Run(p.name, p, _read_json(p / "metrics.json")) for p in folders if (p / "metrics.json").is_file()]
    if not runs:
        raise OLoRAPlusError(f"{runs_dir} holds no finished runs (no run folder has metrics.json yet)")
    ended = {r.run_id for r in runs}
    unfinished = [p.name for p in folders if p.name not in ended]
    selection = read_selection(study_dir)
    expected = _expected_run_ids(spec, selection)
    if expected is not None:
        present = {p.name for p in folders}
        unfinished += [rid for rid in expected if rid not in present]
    return Study(
        study_dir, spec, [r for r in runs if r.kind == "test"], unfinished,
        len(expected) if expected is not None else None,
        selection_runs=[r for r in runs if r.kind == "selection"], selection=selection,
    )


def read_history(run: Run) -> list[dict[str, Any]]:
    path = run.path / "history.json"
    return _read_json(path) if path.is_file() else []


def read_dynamics(run: Run) -> list[dict[str, Any]]:
    path = run.path / "dynamics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def read_predictions(run: Run) -> dict[int, dict[str, Any]]:
    """Prediction rows keyed by test-record index (the key that pairs runs)."""
    path = run.path / "predictions.jsonl"
    return {int(r["index"]): r for r in read_jsonl(path)} if path.is_file() else {}


# --- grouping and the summary table --------------------------------------------------------------


@dataclass
class Group:
    """The seeds of one (method, lambda, lr)."""

    method: str
    lr_ratio: float
    lr: float
    runs: list[Run] = field(default_factory=list)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def diverged(self) -> list[Run]:
        return [r for r in self.runs if not r.finished]

    @property
    def label(self) -> str:
        return f"{self.method} λ={plots.lambda_label(self.lr_ratio)}" if self.method.endswith("+") else self.method

    def values(self, key: str) -> list[Any]:
        return [r.metrics.get(key) for r in self.finished]


def group_runs(study: Study) -> list[Group]:
    """Groups ordered by lr, then baseline first, then grid method order, then lambda."""
    groups: dict[tuple[str, float, float], Group] = {}
    for run in sorted(study.runs, key=lambda r: r.seed):
        key = (run.method, run.lr_ratio, run.lr)
        groups.setdefault(key, Group(*key)).runs.append(run)
    order = [study.baseline] + [m for m in study.grid.get("methods") or [] if m != study.baseline]

    def rank(g: Group) -> tuple:
        m = order.index(g.method) if g.method in order else len(order)
        return (g.lr, m, g.method, g.lr_ratio)

    return sorted(groups.values(), key=rank)


def diverged_note(group: Group) -> str:
    """'1 of 3 diverged at step 40'; '' when none did."""
    bad = group.diverged
    if not bad:
        return ""
    steps = [r.metrics.get("diverged_step") for r in bad]
    where = ", ".join(f"{s}" for s in steps if s is not None)
    no_step = sum(s is None for s in steps)
    parts = []
    if where:
        parts.append(f"at step{'s' if len(steps) - no_step > 1 else ''} {where}")
    if no_step:
        parts.append(f"{no_step} with a non-finite eval loss")
    return f"{len(bad)} of {len(group.runs)} diverged " + "; ".join(parts)


def summarize(group: Group) -> dict[str, Any]:
    """The aggregated row of one group: mean and 95% CI over the finished seeds."""
    row: dict[str, Any] = {
        "method": group.method,
        "lr_ratio": group.lr_ratio,
        "lr": group.lr,
        "runs": len(group.runs),
        "finished": len(group.finished),
        "seeds": [r.seed for r in group.finished],
        "diverged": len(group.diverged),
        "diverged_steps": [r.metrics.get("diverged_step") for r in group.diverged],
        "diverged_note": diverged_note(group),
    }
    for key in [m.key for m in METRICS] + ["val_loss", "train_seconds", "train_tokens_per_s"]:
        ci = mean_ci(group.values(key))
        row[key] = {"mean": ci.mean, "ci95": ci.half_width, "n": ci.n}
    return row


def _ci(row: dict[str, Any], key: str) -> MeanCI:
    d = row[key]
    return MeanCI(d["mean"], d["ci95"], d["n"])


# --- comparisons against the baseline ------------------------------------------------------------


def baseline_group(groups: list[Group], baseline: str, lr: float) -> Group | None:
    """The baseline at this lr (lambda = 1 when it has several), if any of its runs finished."""
    cands = [g for g in groups if g.method == baseline and g.lr == lr and g.finished]
    cands.sort(key=lambda g: (g.lr_ratio != 1.0, abs(math.log(g.lr_ratio))))
    return cands[0] if cands else None


def _paired_runs(x: Group, base: Group) -> tuple[list[Run], list[Run], bool]:
    """Same seeds on both sides when they share any (paired by seed); otherwise every finished seed."""
    xs, bs = {r.seed: r for r in x.finished}, {r.seed: r for r in base.finished}
    common = sorted(set(xs) & set(bs))
    if common:
        return [xs[s] for s in common], [bs[s] for s in common], True
    return list(xs.values()), list(bs.values()), False


def _usable(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, list):
        return len(value) > 0
    return math.isfinite(float(value))


def _columns(preds: list[dict[int, dict]], key: str) -> tuple[list[int], list[list[Any]]]:
    """Test indices every run has a usable `key` for, and the per-run values on them."""
    shared = set.intersection(*(set(p) for p in preds)) if preds else set()
    idx = sorted(i for i in shared if all(_usable(p[i].get(key)) for p in preds))
    return idx, [[p[i][key] for i in idx] for p in preds]


def compare(x: Group, base: Group, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
            protocol: str = "fixed") -> dict[str, Any]:
    """Paired bootstrap of every metric, x − baseline, on the test examples both have (paired by seed and index)."""
    xr, br, paired = _paired_runs(x, base)
    xp, bp = [read_predictions(r) for r in xr], [read_predictions(r) for r in br]
    out: dict[str, Any] = {
        "protocol": protocol, "method": x.method, "lr_ratio": x.lr_ratio, "lr": x.lr, "baseline": base.method,
        "baseline_lr_ratio": base.lr_ratio, "baseline_lr": base.lr, "seeds": [r.seed for r in xr],
        "baseline_seeds": [r.seed for r in br], "paired_by_seed": paired, "metrics": {},
    }
    for m in METRICS:
        idx, values = _columns(xp + bp, m.example_key)
        if not idx:
            continue
        xv, bv = values[: len(xp)], values[len(xp):]
        if m.key == "bleu":
            res = paired_bootstrap_bleu(xv, bv, n_resamples, seed)
        else:
            res = paired_bootstrap(xv, bv, m.higher_is_better, n_resamples, seed)
        out["metrics"][m.key] = res
    return out


def fixed_groups(study: Study, groups: list[Group]) -> list[Group]:
    """The groups protocol fixed compares: every lr under protocol fixed, the fixed lr under both, none under tuned."""
    lrs = study.fixed_lrs
    if lrs is None:
        return groups
    return [g for g in groups if any(math.isclose(g.lr, lr, rel_tol=1e-9) for lr in lrs)]


def all_comparisons(groups: list[Group], baseline: str, n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """Protocol fixed: every method against the baseline at the same lr."""
    out = []
    for g in groups:
        base = baseline_group(groups, baseline, g.lr)
        if base is None or g is base or not g.finished:
            continue
        out.append(compare(g, base, n_resamples, seed, protocol="fixed"))
    return out


@dataclass
class TunedChoice:
    """One method/lambda under protocol tuned: its selection.json entry and its test runs at the chosen lr."""

    entry: dict[str, Any]
    group: Group | None  # None before the runs at the chosen lr exist, or when every lr diverged

    @property
    def method(self) -> str:
        return str(self.entry["method"])

    @property
    def lr_ratio(self) -> float:
        return float(self.entry["lr_ratio"])

    @property
    def chosen_lr(self) -> float | None:
        lr = self.entry.get("chosen_lr")
        return float(lr) if lr is not None else None


def tuned_choices(groups: list[Group], selection: dict[str, dict[str, Any]]) -> list[TunedChoice]:
    """Each selection.json entry with the group of its test runs at the chosen lr."""
    out = []
    for entry in selection.values():
        lr, method, ratio = entry.get("chosen_lr"), entry["method"], float(entry["lr_ratio"])
        match = [g for g in groups if lr is not None and g.method == method and g.lr_ratio == ratio
                 and math.isclose(g.lr, float(lr), rel_tol=1e-9)]
        out.append(TunedChoice(entry, match[0] if match else None))
    return out


def tuned_baseline(choices: list[TunedChoice], baseline: str) -> TunedChoice | None:
    """The baseline at its own chosen lr (lambda = 1 when it has several), if any of its runs there finished."""
    cands = [c for c in choices if c.method == baseline and c.group is not None and c.group.finished]
    cands.sort(key=lambda c: (c.lr_ratio != 1.0, abs(math.log(c.lr_ratio))))
    return cands[0] if cands else None


def tuned_comparisons(choices: list[TunedChoice], baseline: str, n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """Protocol tuned: each method/lambda at its chosen lr against the baseline at ITS chosen lr."""
    base = tuned_baseline(choices, baseline)
    if base is None:
        return []
    return [
        compare(c.group, base.group, n_resamples, seed, protocol="tuned")
        for c in choices
        if c is not base and c.group is not None and c.group.finished
    ]


# --- plots -----------------------------------------------------------------------------------


def _write_png(path: Path, draw: Callable[[Path], None]) -> Path:
    """Draw into a temp file next to `path`, then rename: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        draw(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _curves(rows: list[dict[str, Any]], key: str) -> plots.Curve:
    return [(r["step"], r[key]) for r in rows if key in r and "step" in r and r[key] is not None]


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def make_plots(study: Study, groups: list[Group], table: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    """(caption, png path) for every figure: loss curves, metrics against lambda, dynamics; one set per lr."""
    out_dir = study.path / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    lrs = sorted({g.lr for g in groups})
    for lr in lrs:
        at_lr = [g for g in groups if g.lr == lr]
        suffix = f" (lr {lr:g})" if len(lrs) > 1 else ""
        loss = {g.label: [_curves(read_history(r), "loss") for r in g.runs] for g in at_lr}
        path = out_dir / f"train_loss_{_lr_tag(lr)}.png"
        _write_png(path, lambda p: plots.loss_curves(loss, p, f"training loss, mean over seeds{suffix}"))
        figures.append((f"Training loss{suffix}: bold = mean over seeds, thin = single seeds", path))

        base = baseline_group(at_lr, study.baseline, lr)
        panels = _lambda_panels(at_lr, [t for t in table if t["lr"] == lr], base)
        if panels:
            path = out_dir / f"metrics_vs_lambda_{_lr_tag(lr)}.png"
            _write_png(path, lambda p: plots.metrics_vs_lambda(panels, p, f"test metrics against λ{suffix}", study.baseline))
            figures.append((f"Test metrics against λ{suffix}: mean ± 95% CI over seeds; dashed = {study.baseline}", path))

        dyn = {g.label: _dynamics_series(g) for g in at_lr}
        if any(c for d in dyn.values() for cs in d.values() for c in cs):
            path = out_dir / f"dynamics_{_lr_tag(lr)}.png"
            _write_png(path, lambda p: plots.dynamics_curves(dyn, p, f"learning dynamics{suffix}"))
            figures.append((f"Learning dynamics{suffix}: how far A and B moved from their init, and subspace drift", path))
    return figures


def _dynamics_series(group: Group) -> dict[str, list[plots.Curve]]:
    rows = [read_dynamics(r) for r in group.runs]
    return {k: [_curves(rs, k) for rs in rows] for k in ("dA", "dB", "drift")}


def tuned_lambda_plot(study: Study, choices: list[TunedChoice]) -> list[tuple[str, Path]]:
    """Test metrics against lambda with every method/lambda at its tuned lr (protocol tuned)."""
    groups = [c.group for c in choices if c.group is not None]
    if not groups:
        return []
    base = tuned_baseline(choices, study.baseline)
    panels = _lambda_panels(groups, [summarize(g) for g in groups], base.group if base else None)
    if not panels:
        return []
    path = study.path / PLOTS_DIR / "metrics_vs_lambda_tuned.png"
    title = "test metrics against λ, each method/λ at its tuned lr"
    _write_png(path, lambda p: plots.metrics_vs_lambda(panels, p, title, study.baseline))
    return [(f"Protocol tuned — test metrics against λ, each method/λ at the lr it chose on validation data: "
             f"mean ± 95% CI over seeds; dashed = {study.baseline} at its own tuned lr", path)]


def heatmap_cells(selection: dict[str, dict[str, Any]], init: str) -> tuple[dict, dict]:
    """({(lambda, lr): val loss or None=diverged}, {lambda: chosen lr}) of the methods with this init."""
    from oloraplus.config import METHODS

    cells: dict[tuple[float, float], float | None] = {}
    chosen: dict[float, float | None] = {}
    for e in selection.values():
        if METHODS.get(e["method"], ("?",))[0] != init:
            continue
        lam = float(e["lr_ratio"])
        for lr, v in e["val_loss_by_lr"].items():
            cells[(lam, float(lr))] = v
        chosen[lam] = e.get("chosen_lr")
    return cells, chosen


def selection_heatmaps(study: Study) -> list[tuple[str, Path]]:
    """One heatmap of validation loss over (lambda, lr) per init (olora, gaussian, pissa) in the selection."""
    from oloraplus.config import INITS

    if not study.selection:
        return []
    out_dir = study.path / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for init in INITS:
        cells, chosen = heatmap_cells(study.selection, init)
        if not cells:
            continue
        path = out_dir / f"val_loss_heatmap_{init}.png"
        _write_png(path, lambda p: plots.val_loss_heatmap(cells, chosen, p, f"validation loss, {init} init"))
        figures.append((f"Validation loss of the selection runs, {init} init, over λ and lr (log2 axes); "
                        "boxed = the lr chosen for that λ; hatched × = diverged", path))
    return figures


def _lambda_panels(groups: list[Group], rows: list[dict[str, Any]], base: Group | None) -> list:
    """(metric name, {method: points}, baseline (mean, CI)) panels; the baseline group is the dashed line."""
    panels = []
    for m in METRICS:
        series: dict[str, list[plots.Point]] = {}
        for g, row in zip(groups, rows):
            ci = _ci(row, m.key)
            if g is base or ci.n == 0:
                continue
            series.setdefault(g.method, []).append((g.lr_ratio, ci.mean, ci.half_width))
        base_ci = _ci(rows[groups.index(base)], m.key) if base is not None and base in groups else None
        has_base = base_ci is not None and base_ci.n > 0
        if series or has_base:
            panels.append((m.name, series, (base_ci.mean, base_ci.half_width) if has_base else None))
    return panels


# --- the document: blocks rendered to Markdown and HTML --------------------------------------------


@dataclass(frozen=True)
class Cell:
    """A table cell with a tag (better / worse / undecided / diverged) the HTML colours."""

    text: str
    tag: str = ""


Block = tuple  # ("h", level, text) | ("p", text) | ("list", [text]) | ("table", headers, rows) | ("img", caption, path) | ("quote", label, text)


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else "—"


def _signed(v: float, digits: int) -> str:
    return f"{v:+.{digits}f}"


def header_blocks(study: Study) -> list[Block]:
    base, grid = study.base, study.grid
    model, data = base.get("model") or {}, base.get("data") or {}
    adapter, train = base.get("adapter") or {}, base.get("train") or {}
    first = (study.runs or study.selection_runs)[0].metrics  # a tuned study may have only selection runs yet
    lrs = grid.get("lrs") or [train.get("lr")]
    finished = sum(r.finished for r in study.runs)
    diverged = len(study.runs) - finished
    total = len(study.runs) + len(study.selection_runs) + len(study.unfinished)
    items = [
        f"model: {model.get('name', '?')}",
        f"data: {data.get('source', '?')} (split seed {data.get('split_seed', '?')}, max length {data.get('max_length', '?')} tokens)",
        f"examples: n_train {first.get('n_train', data.get('n_train', '?'))}, n_val {first.get('n_val', '?')}, "
        f"n_test {first.get('n_test', data.get('n_test', '?'))}",
        f"adapter: rank {adapter.get('rank', '?')}, alpha {adapter.get('alpha', '?')}, dropout {adapter.get('dropout', '?')}",
        f"training: lr {', '.join(f'{x:g}' if isinstance(x, (int, float)) else str(x) for x in lrs)}, "
        f"epochs {train.get('epochs', '?')}, batch size {train.get('batch_size', '?')}, precision {first.get('precision', '?')}",
        f"methods: {', '.join(grid.get('methods') or [])}; λ for '+' methods: "
        f"{', '.join(plots.lambda_label(float(x)) for x in grid.get('lr_ratios') or [])}; baseline: {study.baseline}",
        f"seeds: {', '.join(str(s) for s in grid.get('seeds') or [])}",
        protocol_line(study),
        f"runs: {finished} finished, {diverged} diverged, "
        + (f"{len(study.selection_runs)} lr-selection runs ended (validation only), " if study.selection_runs else "")
        + f"{len(study.unfinished)} unfinished or not started (of {total})",
    ]
    blocks: list[Block] = [
        ("h", 1, f"OLoRA+ study report: {study.path.name}"),
        ("list", items),
        ("p", "The test split was never used to choose anything: no learning rate, λ, checkpoint or stopping point "
              "was picked on it. It is scored once, after training, and only reported here."),
    ]
    if study.unfinished:
        blocks.append(("p", f"{len(study.unfinished)} run(s) have no results yet and are left out of every number "
                            "below (listed at the end)."))
    return blocks


def _probe_text(study: Study) -> str:
    """'short probes of 0.25 x the full length: 28 of 113 optimizer steps' or 'full-length runs'."""
    from oloraplus.config import build_config
    from oloraplus.study import full_steps, probe_steps

    fraction = float(study.grid.get("probe_fraction") or 1.0)
    if fraction >= 1:
        return "full-length runs"
    try:
        base = build_config(study.base, source="study.yaml")
        steps = f": {probe_steps(base, fraction)} of {full_steps(base)} optimizer steps"
    except (OLoRAPlusError, TypeError, ValueError):
        steps = ""
    return f"short probes of {fraction:g} × the full length{steps}"


def protocol_line(study: Study) -> str:
    """The protocol(s) of the study in one line."""
    grid = study.grid
    parts = []
    if study.protocol in ("fixed", "both"):
        lrs = study.fixed_lrs
        where = "each lr of the grid" if lrs is None else f"lr {', '.join(f'{lr:g}' for lr in lrs)}"
        parts.append(f"fixed (every method at {where}, all seeds)")
    if study.protocol in ("tuned", "both"):
        seeds = "the first seed" if grid.get("selection_seeds", "first") == "first" else "all seeds"
        parts.append(f"tuned (each method/λ at its best lr of {', '.join(f'{float(x):g}' for x in grid.get('lrs') or [])} "
                     f"on validation loss, chosen on {seeds} with {_probe_text(study)}; then all seeds)")
    return "protocol: " + "; ".join(parts)


def summary_blocks(groups: list[Group], table: list[dict[str, Any]]) -> list[Block]:
    headers = ["method", "λ", "lr", "seeds", *[m.name for m in METRICS], "train time (s)", "train tok/s", "diverged"]
    rows = []
    for g, row in zip(groups, table):
        all_diverged = not g.finished
        cells: list[Any] = [g.method, plots.lambda_label(g.lr_ratio), f"{g.lr:g}", f"{len(g.finished)} of {len(g.runs)}"]
        for m in METRICS:
            cells.append(Cell("diverged", "diverged") if all_diverged else format_mean_ci(_ci(row, m.key), m.digits))
        cells.append(_fmt(row["train_seconds"]["mean"], ".0f"))
        cells.append(_fmt(row["train_tokens_per_s"]["mean"], ".0f"))
        cells.append(Cell(row["diverged_note"], "diverged") if row["diverged_note"] else "—")
        rows.append(cells)
    return [
        ("h", 2, "Results by method, λ and learning rate"),
        ("p", "Mean ± 95% confidence interval over the finished seeds (Student t; 'n=1' = a single seed, no interval). "
              "Eval loss: token-weighted test loss (lower is better); BLEU: corpus sacreBLEU 0-100; ROUGE: mean F1 0-1. "
              "Diverged runs are counted in 'seeds' and in 'diverged' but have no test scores."),
        ("table", headers, rows),
    ]


def comparison_blocks(comparisons: list[dict[str, Any]], baseline: str, groups: list[Group]) -> list[Block]:
    blocks: list[Block] = [
        ("h", 2, f"Against the baseline ({baseline}, same learning rate)"),
        ("p", "Protocol fixed: every method trained at the same learning rate as the baseline it is compared with. "
              "Difference = method − baseline on the same test examples, with a 95% paired-bootstrap interval "
              "(test examples resampled with replacement; seeds paired and averaged). 'better' / 'worse' only when the "
              "interval excludes 0; lower eval loss is better, higher BLEU/ROUGE is better. The eval-loss difference is "
              "over per-example mean losses."),
    ]
    orphan_lrs = sorted({g.lr for g in groups if g.finished and baseline_group(groups, baseline, g.lr) is None})
    if orphan_lrs:
        blocks.append(("p", f"No finished {baseline} run at lr {', '.join(f'{lr:g}' for lr in orphan_lrs)}: "
                            "the methods there are not compared."))
    if not comparisons:
        blocks.append(("p", f"No comparison possible: no method with finished runs shares a learning rate with a "
                            f"finished {baseline} run."))
        return blocks
    headers = ["protocol", "method", "λ", "lr", "seeds", *[f"Δ {m.name}" for m in METRICS]]
    rows = [[c["protocol"], c["method"], plots.lambda_label(c["lr_ratio"]), f"{c['lr']:g}", _seeds_text(c),
             *_verdict_cells(c)] for c in comparisons]
    blocks.append(("table", headers, rows))
    return blocks


def _seeds_text(c: dict[str, Any]) -> str:
    return f"{len(c['seeds'])} vs {len(c['baseline_seeds'])}" + ("" if c["paired_by_seed"] else " (unpaired)")


def _verdict_cells(c: dict[str, Any]) -> list[Any]:
    """One cell per metric: difference, 95% interval and verdict, or '—' when not computable."""
    cells: list[Any] = []
    for m in METRICS:
        res: BootstrapResult | None = c["metrics"].get(m.key)
        cells.append(_verdict_cell(res, m.digits) if res else "—")
    return cells


def selection_blocks(study: Study, heatmaps: list[tuple[str, Path]]) -> list[Block]:
    """Protocol tuned, step 1: the validation loss of every method/λ at every lr, and the lr each chose."""
    seeds = "the first seed" if study.grid.get("selection_seeds", "first") == "first" else "all seeds"
    blocks: list[Block] = [
        ("h", 2, "Learning-rate selection on validation data (protocol tuned)"),
        ("p", f"Each method/λ was trained at every learning rate of the grid on {seeds} ({_probe_text(study)}), and "
              "scored on the validation records, which are held out of the training pool. Its lr is the one with the "
              "lowest mean validation loss; a diverged run counts as +∞. The selection runs never evaluated on the "
              "test split (no test loss, no predictions): the test split was never used to choose anything, and is "
              "scored only by the final runs at the chosen lrs."),
    ]
    if not study.selection:
        n = len(study.selection_runs)
        return blocks + [("p", f"The selection has not finished yet ({n} selection run(s) ended; no selection.json): "
                               "no lr is chosen and there is no tuned verdict.")]
    lrs = sorted({float(lr) for e in study.selection.values() for lr in e["val_loss_by_lr"]})
    headers = ["method", "λ", *[f"val loss @ lr {lr:g}" for lr in lrs], "chosen lr"]
    rows = []
    for e in study.selection.values():
        by_lr = {float(lr): v for lr, v in e["val_loss_by_lr"].items()}
        chosen = e.get("chosen_lr")
        rows.append([
            e["method"], plots.lambda_label(float(e["lr_ratio"])),
            *[_selection_cell(by_lr, lr, chosen) for lr in lrs],
            f"{chosen:g}" if chosen is not None else Cell("every lr diverged", "diverged"),
        ])
    blocks.append(("table", headers, rows))
    return blocks + [("img", caption, path) for caption, path in heatmaps]


def _selection_cell(by_lr: dict[float, float | None], lr: float, chosen: float | None) -> Any:
    """A validation loss; 'diverged'; '—' where the lr was not tried; the chosen lr's loss is highlighted."""
    if lr not in by_lr:
        return "—"
    v = by_lr[lr]
    if v is None:
        return Cell("diverged", "diverged")
    return Cell(f"{v:.4f}", "better") if chosen is not None and math.isclose(lr, chosen) else f"{v:.4f}"


def tuned_blocks(study: Study, choices: list[TunedChoice], comparisons: list[dict[str, Any]]) -> list[Block]:
    """Protocol tuned, step 2: each method/λ at its chosen lr against the baseline at its own chosen lr."""
    baseline = study.baseline
    blocks: list[Block] = [
        ("h", 2, f"Against the baseline ({baseline}, each at its tuned learning rate)"),
        ("p", "Protocol tuned: each method/λ trained over all seeds at the lr it chose on validation data, against "
              f"{baseline} at the lr {baseline} chose. Same paired bootstrap as above: seeds paired, test examples "
              "paired by index and resampled with replacement; 'better' / 'worse' only when the 95% interval "
              "excludes 0."),
    ]
    if study.selection is None:
        return blocks + [("p", "No tuned verdict yet: the learning-rate selection has not finished.")]
    base = tuned_baseline(choices, baseline)
    if base is None:
        blocks.append(("p", f"No tuned verdict: {baseline} has no finished run at a chosen lr (every lr diverged "
                            "in selection, or its final runs have not finished or diverged)."))
    headers = ["protocol", "method", "λ", "lr", f"{baseline} lr", "seeds", *[f"Δ {m.name}" for m in METRICS]]
    by_key = {(c["method"], c["lr_ratio"]): c for c in comparisons}
    rows = []
    for choice in choices:
        if base is not None and choice is base:
            continue
        c = by_key.get((choice.method, choice.lr_ratio))
        head = ["tuned", choice.method, plots.lambda_label(choice.lr_ratio)]
        if c is not None:
            rows.append([*head, f"{c['lr']:g}", f"{c['baseline_lr']:g}", _seeds_text(c), *_verdict_cells(c)])
            continue
        if choice.chosen_lr is None:
            why = "every lr diverged in selection: no tuned verdict"
        elif choice.group is None:
            why = "no finished run at the chosen lr yet: no tuned verdict"
        elif not choice.group.finished:
            why = "every run at the chosen lr diverged: no tuned verdict"
        else:
            why = "no baseline to compare with"
        lr = f"{choice.chosen_lr:g}" if choice.chosen_lr is not None else "—"
        base_lr = f"{base.chosen_lr:g}" if base is not None and base.chosen_lr is not None else "—"
        rows.append([*head, lr, base_lr, "—", Cell(why, "diverged"), *["—"] * (len(METRICS) - 1)])
    if rows:
        blocks.append(("table", headers, rows))
    return blocks


def _verdict_cell(res: BootstrapResult, digits: int) -> Cell:
    if not math.isfinite(res.diff):
        return Cell(res.verdict, "undecided")
    tag = {"better": "better", "worse": "worse"}.get(res.verdict, "undecided")
    text = f"{_signed(res.diff, digits)} [{_signed(res.low, digits)}, {_signed(res.high, digits)}] {res.verdict}"
    return Cell(text, tag)


def example_blocks(groups: list[Group], baseline: str, n: int = N_EXAMPLES) -> list[Block]:
    """A few test examples with every method's answer (first finished seed of each, one lr)."""
    lrs = sorted(sorted({g.lr for g in groups if g.finished}), key=lambda lr: baseline_group(groups, baseline, lr) is None)
    if not lrs:
        return []
    shown = [g for g in groups if g.lr == lrs[0] and g.finished]
    preds = [(g, read_predictions(g.finished[0])) for g in shown]
    preds = [(g, p) for g, p in preds if p]
    shared = sorted(set.intersection(*(set(p) for _, p in preds))) if preds else []
    shared = [i for i in shared if all("prediction" in p[i] for _, p in preds)]
    if not shared:
        return []
    picks = [shared[round(k * (len(shared) - 1) / max(n - 1, 1))] for k in range(min(n, len(shared)))]
    blocks: list[Block] = [
        ("h", 2, "Example predictions"),
        ("p", f"Greedy answers on the same test examples (lr {lrs[0]:g}; each method's first finished seed)."),
    ]
    for idx in dict.fromkeys(picks):
        first = preds[0][1][idx]
        prompt = first.get("instruction", "") + (f"\n\n{first['input']}" if first.get("input") else "")
        blocks += [
            ("h", 3, f"Test example {idx}"),
            ("quote", "Instruction", prompt),
            ("quote", "Reference", first.get("reference", "")),
            ("table", ["method", "seed", "prediction"],
             [[g.label, str(g.finished[0].seed), p[idx]["prediction"]] for g, p in preds]),
        ]
    return blocks


def figure_blocks(figures: list[tuple[str, Path]]) -> list[Block]:
    if not figures:
        return []
    return [("h", 2, "Plots")] + [("img", caption, path) for caption, path in figures]


def unfinished_blocks(study: Study) -> list[Block]:
    if not study.unfinished:
        return []
    return [("h", 2, "Runs without results"),
            ("p", f"{len(study.unfinished)} run(s) unfinished or not started (no metrics.json):"),
            ("list", study.unfinished)]


def _md_cell(cell: Any) -> str:
    text = cell.text if isinstance(cell, Cell) else str(cell)
    text = text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return f"**{text}**" if isinstance(cell, Cell) and cell.tag in ("better", "worse") else text


def render_markdown(blocks: list[Block], root: Path) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"{'#' * b[1]} {b[2]}")
        elif kind == "p":
            out.append(b[1])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "quote":
            body = "\n".join(f"> {line}" if line else ">" for line in str(b[2]).splitlines() or [""])
            out.append(f"**{b[1]}:**\n\n{body}")
        elif kind == "table":
            headers, rows = b[1], b[2]
            lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[1]}]({Path(b[2]).relative_to(root).as_posix()})\n\n*{b[1]}*")
    return "\n\n".join(out) + "\n"


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1.2em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}h2{font-size:1.25em;margin-top:2em;
border-bottom:1px solid #eee;padding-bottom:.2em}h3{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse;margin:1em 0;font-size:.86em;width:100%}
th,td{border:1px solid #ddd;padding:.35em .55em;text-align:left;vertical-align:top}
th{background:#f4f5f7}tr:nth-child(even) td{background:#fafbfc}
td.better{background:#e3f4e6!important;color:#1b5e20;font-weight:600}
td.worse{background:#fde8e8!important;color:#8e1c1c;font-weight:600}
td.undecided{color:#555}td.diverged{color:#a33;font-style:italic}
blockquote{margin:.4em 0 1em;padding:.5em 1em;background:#f7f7f9;border-left:4px solid #c8ccd4;white-space:pre-wrap}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.88em;color:#555}
"""


def _html_cell(cell: Any, tag: str = "td") -> str:
    text = cell.text if isinstance(cell, Cell) else str(cell)
    cls = f' class="{cell.tag}"' if isinstance(cell, Cell) and cell.tag else ""
    return f"<{tag}{cls}>{html.escape(text).replace(chr(10), '<br>')}</{tag}>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(blocks: list[Block], title: str) -> str:
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(b[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in b[1]) + "</ul>")
        elif kind == "quote":
            out.append(f"<p><b>{html.escape(b[1])}:</b></p><blockquote>{html.escape(str(b[2]))}</blockquote>")
        elif kind == "table":
            head = "".join(_html_cell(h, "th") for h in b[1])
            body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            out.append(f'<figure><img alt="{html.escape(b[1])}" src="{_data_uri(b[2])}">'
                       f"<figcaption>{html.escape(b[1])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --- machine-readable outputs ----------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON any tool can read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, BootstrapResult):
        return _clean(vars(value))
    return value


def results_csv(runs: list[Run]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run in runs:
        row = {"run_id": run.run_id, "kind": run.kind, **run.metrics}
        writer.writerow({k: "" if _clean(row.get(k)) is None else row.get(k) for k in CSV_COLUMNS})
    return buf.getvalue()


# --- entry point ----------------------------------------------------------------------------------


def write_report(study_dir: str | Path, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> list[Path]:
    """Write report.md, report.html, results.csv, results.json and plots/*.png; report.md comes first."""
    study = load_study(study_dir)
    groups = group_runs(study)
    table = [summarize(g) for g in groups]
    fixed = fixed_groups(study, groups)
    comparisons = all_comparisons(fixed, study.baseline, n_resamples, seed)
    choices = tuned_choices(groups, study.selection or {})
    tuned = tuned_comparisons(choices, study.baseline, n_resamples, seed)
    figures = make_plots(study, groups, table) + tuned_lambda_plot(study, choices)
    heatmaps = selection_heatmaps(study)
    runs = sorted(study.runs + study.selection_runs, key=lambda r: (r.kind, r.lr, r.method, r.lr_ratio, r.seed))

    blocks = header_blocks(study) + summary_blocks(groups, table)
    if study.protocol != "tuned":
        blocks += comparison_blocks(comparisons, study.baseline, fixed)
    if study.protocol != "fixed":
        blocks += selection_blocks(study, heatmaps) + tuned_blocks(study, choices, tuned)
    blocks += figure_blocks(figures) + example_blocks(groups, study.baseline) + unfinished_blocks(study)
    root = study.path
    md, page, csv_path, js = (root / n for n in ("report.md", "report.html", "results.csv", "results.json"))
    atomic_write_text(md, render_markdown(blocks, root))
    atomic_write_text(page, render_html(blocks, f"OLoRA+ study report: {root.name}"))
    atomic_write_text(csv_path, results_csv(runs))
    atomic_write_json(js, _clean({
        "study": study.spec,
        "counts": {"finished": sum(r.finished for r in study.runs), "diverged": sum(not r.finished for r in study.runs),
                   "unfinished": len(study.unfinished), "expected": study.expected},
        "selection_runs": len(study.selection_runs),  # validation-only runs, not in the counts above
        "unfinished": study.unfinished,
        "runs": [{"run_id": r.run_id, "kind": r.kind, **r.metrics} for r in runs],
        "table": table,
        "selection": study.selection,
        "comparisons": comparisons + tuned,
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95},
    }))
    return [md, page, csv_path, js, *(p for _, p in figures + heatmaps)]
