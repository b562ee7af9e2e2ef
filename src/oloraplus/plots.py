"""Matplotlib figures (PNG, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def train_loss_curve(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training loss against step, from Trainer's log history."""
    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- study report figures: plain data in, one PNG out ---------------------------------------

Curve = list[tuple[float, float]]  # (step, value) points of one run


def _mean_curve(curves: list[Curve]) -> Curve:
    """Mean over the runs at every step where at least one run has a finite value."""
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            if value is not None and math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items())]


def _finite_points(curve: Curve) -> Curve:
    return [(s, v) for s, v in curve if v is not None and math.isfinite(v)]


def _plot_runs(ax: Any, curves: list[Curve], color: Any, label: str) -> None:
    """Thin line per seed (when several), bold line for their mean."""
    if len(curves) > 1:
        for curve in curves:
            pts = _finite_points(curve)
            if pts:
                ax.plot(*zip(*pts), color=color, lw=0.7, alpha=0.35)
    mean = _mean_curve(curves)
    if mean:
        ax.plot(*zip(*mean), color=color, lw=1.8, label=label)


def _colors(n: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curves(series: dict[str, list[Curve]], path: str | Path, title: str = "") -> None:
    """Training loss against step: one colour per method/lambda, mean over seeds (thin lines: seeds)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for color, (label, curves) in zip(_colors(len(series)), series.items()):
        _plot_runs(ax, curves, color, label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8, frameon=False)
    _save(fig, path)


def dynamics_curves(series: dict[str, dict[str, list[Curve]]], path: str | Path, title: str = "") -> None:
    """dA, dB and subspace drift against step, one line per method/lambda (mean over seeds)."""
    panels = (("dA", "‖A − A₀‖ (dA)"), ("dB", "‖B − B₀‖ (dB)"), ("drift", "subspace drift"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for color, (label, by_key) in zip(_colors(len(series)), series.items()):
        for ax, (key, _) in zip(axes, panels):
            _plot_runs(ax, by_key.get(key, []), color, label)
    for ax, (_, name) in zip(axes, panels):
        ax.set_xlabel("optimizer step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(title or "learning dynamics")
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


Point = tuple[float, float, float]  # (lambda, mean, CI half-width or nan)


def lambda_label(lam: float) -> str:
    """'1/4' for 0.25, '4' for 4: how lambda is written in the grid."""
    if lam < 1 and abs(1 / lam - round(1 / lam)) < 1e-9:
        return f"1/{round(1 / lam)}"
    return f"{lam:g}"


def _lambda_ticks(ax: Any, lams: list[float]) -> None:
    """Ticks exactly at the grid's lambdas, no minor ticks (also keeps layout cheap)."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    ticks = sorted(set(lams))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter([lambda_label(t) for t in ticks]))
    ax.xaxis.set_minor_locator(NullLocator())


def metrics_vs_lambda(
    panels: list[tuple[str, dict[str, list[Point]], tuple[float, float] | None]],
    path: str | Path,
    title: str = "",
    baseline_label: str = "baseline",
) -> None:
    """Each metric against lambda (log2 axis), error bars = 95% CI over seeds.

    `panels` holds (metric name, {method: points}, baseline (mean, half-width) or None).
    The baseline (lambda = 1) is a dashed horizontal line; lambda < 1 is shaded as
    'Refinement' (B slower than A), lambda > 1 as 'Exploration' (B faster).
    """
    lams = [p[0] for _, series, _ in panels for pts in series.values() for p in pts] + [1.0]
    lo, hi = min(lams) / 1.6, max(lams) * 1.6
    ncols = min(len(panels), 3) or 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    methods = list(dict.fromkeys(m for _, series, _ in panels for m in series))
    colors = dict(zip(methods, _colors(len(methods))))
    for ax, (name, series, base) in zip(axes.flat, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlim(lo, hi)
        ax.axvspan(lo, 1.0, color="#4c72b0", alpha=0.06)
        ax.axvspan(1.0, hi, color="#dd8452", alpha=0.06)
        trans = ax.get_xaxis_transform()
        ax.text(
            math.sqrt(lo), 0.97, "Refinement\nλ<1", transform=trans, ha="center", va="top", fontsize=7, color="#4c72b0"
        )
        ax.text(
            math.sqrt(hi), 0.97, "Exploration\nλ>1", transform=trans, ha="center", va="top", fontsize=7, color="#c55a11"
        )
        if base is not None and math.isfinite(base[0]):
            ax.axhline(base[0], color="black", ls="--", lw=1, label=f"{baseline_label} (λ=1)")
            if math.isfinite(base[1]):
                ax.axhspan(base[0] - base[1], base[0] + base[1], color="black", alpha=0.07)
            ax.plot([1.0], [base[0]], marker="*", ms=11, color="black", ls="none")
        for method, pts in series.items():
            pts = sorted(p for p in pts if math.isfinite(p[1]))
            if not pts:
                continue
            x, y, err = zip(*pts)
            yerr = [e if math.isfinite(e) else 0.0 for e in err]
            ax.errorbar(x, y, yerr=yerr, marker="o", ms=4, capsize=3, lw=1.5, color=colors[method], label=method)
        _lambda_ticks(ax, lams)
        ax.set_xlabel("λ (lr of B / lr of A)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(panels) :]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles and spare:  # an empty grid cell holds the legend, next to the panels
        spare[0].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    elif handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(title or "metrics against λ")
    fig.tight_layout(rect=(0, 0.07 if handles and not spare else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log2_edges(centers: list[float]) -> list[float]:
    """Cell edges around sorted centers, halfway between neighbours in log2 space (one cell: ± half an octave)."""
    logs = [math.log2(c) for c in centers]
    if len(logs) == 1:
        return [2 ** (logs[0] - 0.5), 2 ** (logs[0] + 0.5)]
    mids = [(a + b) / 2 for a, b in zip(logs, logs[1:])]
    first, last = logs[0] - (mids[0] - logs[0]), logs[-1] + (logs[-1] - mids[-1])
    return [2**x for x in [first, *mids, last]]


def _fixed_ticks(axis: Any, values: list[float], labels: list[str]) -> None:
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    axis.set_major_locator(FixedLocator(values))
    axis.set_major_formatter(FixedFormatter(labels))
    axis.set_minor_locator(NullLocator())


def val_loss_heatmap(
    cells: dict[tuple[float, float], float | None],
    chosen: dict[float, float | None],
    path: str | Path,
    title: str = "",
) -> None:
    """Validation loss over (lr, lambda), both on log2 axes, one cell per selection setting.

    `cells` maps (lambda, lr) to the mean validation loss, None (or non-finite) for
    a diverged setting, drawn hatched with a ×; `chosen` maps lambda to its chosen
    lr, drawn as a bold box. Settings not in the grid stay blank.
    """
    from matplotlib.patches import Rectangle

    lams = sorted({lam for lam, _ in cells})
    lrs = sorted({lr for _, lr in cells})
    x_edges, y_edges = _log2_edges(lrs), _log2_edges(lams)
    grid = np.full((len(lams), len(lrs)), np.nan)
    for (lam, lr), v in cells.items():
        if v is not None and math.isfinite(v):
            grid[lams.index(lam), lrs.index(lr)] = v
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(lrs), 1.6 + 0.75 * len(lams)))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    finite = np.isfinite(grid)
    if finite.any():
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid), cmap="viridis_r", shading="flat")
        fig.colorbar(mesh, ax=ax, label="validation loss (lower is better)")
    for (lam, lr), v in cells.items():
        i, j = lams.index(lam), lrs.index(lr)
        x0, x1, y0, y1 = x_edges[j], x_edges[j + 1], y_edges[i], y_edges[i + 1]
        cx, cy = math.sqrt(x0 * x1), math.sqrt(y0 * y1)  # the centre on log axes
        if finite[i, j]:
            ax.text(
                cx,
                cy,
                f"{v:.3f}",
                ha="center",
                va="center",
                fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.6, "lw": 0, "pad": 1},
            )
        else:
            ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="#f7e9e9", edgecolor="#d7a3a3", hatch="xx", lw=0.5)
            )
            ax.text(
                cx,
                cy,
                "× diverged",
                ha="center",
                va="center",
                fontsize=8,
                color="#a33",
                bbox={"facecolor": "white", "alpha": 0.85, "lw": 0, "pad": 1},
            )
    for lam, lr in chosen.items():
        if lr is not None and lr in lrs:
            i, j = lams.index(lam), lrs.index(lr)
            ax.add_patch(
                Rectangle(
                    (x_edges[j], y_edges[i]),
                    x_edges[j + 1] - x_edges[j],
                    y_edges[i + 1] - y_edges[i],
                    fill=False,
                    edgecolor="black",
                    lw=2.5,
                    clip_on=False,
                )
            )
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylim(y_edges[0], y_edges[-1])
    _fixed_ticks(ax.xaxis, lrs, [f"{lr:g}" for lr in lrs])
    _fixed_ticks(ax.yaxis, lams, [lambda_label(lam) for lam in lams])
    ax.set_xlabel("base learning rate (log2 axis)")
    ax.set_ylabel("λ = lr of B / lr of A (log2 axis)")
    ax.set_title(title or "validation loss", fontsize=10)
    _save(fig, path)
