"""The report's PNGs under STUDY/plots, drawn by plots.py and written atomically (temp file, fsync, rename)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from oloraplus import plots
from oloraplus.config import INITS
from oloraplus.fsutil import atomic_write_with
from oloraplus.report.blocks import Figure
from oloraplus.report.compare import (
    Group,
    TunedChoice,
    baseline_group,
    heatmap_cells,
    lambda_panels,
    summarize,
    tuned_baseline,
)
from oloraplus.report.document import group_label
from oloraplus.report.load import Run, Study
from oloraplus.report.wording import say

PLOTS_DIR = "plots"


def _figure(path: Path, draw: Callable[[Path], None], caption: str) -> Figure:
    """Draw the PNG (a reader never sees half of it) and pair it with its caption."""
    atomic_write_with(path, draw)
    return Figure(caption, path)


def _curve(rows: list[dict[str, Any]], key: str) -> plots.Curve:
    return [(r["step"], r[key]) for r in rows if key in r and "step" in r and r[key] is not None]


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def _dynamics_series(runs: list[Run]) -> dict[str, list[plots.Curve]]:
    rows = [r.dynamics() for r in runs]
    return {k: [_curve(rs, k) for rs in rows] for k in ("dA", "dB", "drift")}


def make_plots(study: Study, groups: list[Group], summary: list[dict[str, Any]]) -> list[Figure]:
    """Every figure of the test runs: loss curves, metrics against λ, dynamics; one set per lr."""
    out_dir = study.path / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    lrs = sorted({g.lr for g in groups})
    for lr in lrs:
        at_lr = [g for g in groups if g.lr == lr]
        where = {"lr": lr, "several": len(lrs) > 1}
        loss = {group_label(g): [_curve(r.history(), "loss") for r in g.runs] for g in at_lr}
        figures.append(
            _figure(
                out_dir / f"train_loss_{_lr_tag(lr)}.png",
                lambda p: plots.loss_curves(loss, p, say("train_loss_title", **where)),
                say("train_loss_caption", **where),
            )
        )
        base = baseline_group(at_lr, study.baseline, lr)
        panels = lambda_panels(at_lr, [t for t in summary if t["lr"] == lr], base)
        if panels:
            figures.append(
                _figure(
                    out_dir / f"metrics_vs_lambda_{_lr_tag(lr)}.png",
                    lambda p: plots.metrics_vs_lambda(panels, p, say("lambda_title", **where), study.baseline),
                    say("lambda_caption", baseline=study.baseline, **where),
                )
            )
        dyn = {group_label(g): _dynamics_series(g.runs) for g in at_lr}
        if any(c for d in dyn.values() for cs in d.values() for c in cs):
            figures.append(
                _figure(
                    out_dir / f"dynamics_{_lr_tag(lr)}.png",
                    lambda p: plots.dynamics_curves(dyn, p, say("dynamics_title", **where)),
                    say("dynamics_caption", **where),
                )
            )
    return figures


def tuned_lambda_plot(study: Study, choices: list[TunedChoice]) -> list[Figure]:
    """Test metrics against λ with every method/λ at its tuned lr (protocol tuned)."""
    groups = [c.group for c in choices if c.group is not None]
    if not groups:
        return []
    base = tuned_baseline(choices, study.baseline)
    panels = lambda_panels(groups, [summarize(g) for g in groups], base.group if base else None)
    if not panels:
        return []
    return [
        _figure(
            study.path / PLOTS_DIR / "metrics_vs_lambda_tuned.png",
            lambda p: plots.metrics_vs_lambda(panels, p, say("tuned_lambda_title"), study.baseline),
            say("tuned_lambda_caption", baseline=study.baseline),
        )
    ]


def selection_heatmaps(study: Study) -> list[Figure]:
    """One heatmap of validation loss over (λ, lr) per init (olora, gaussian, pissa) in the selection."""
    if not study.selection:
        return []
    out_dir = study.path / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for init in INITS:
        cells, chosen = heatmap_cells(study.selection, init)
        if not cells:
            continue
        figures.append(
            _figure(
                out_dir / f"val_loss_heatmap_{init}.png",
                lambda p: plots.val_loss_heatmap(cells, chosen, p, say("heatmap_title", init=init)),
                say("heatmap_caption", init=init),
            )
        )
    return figures
