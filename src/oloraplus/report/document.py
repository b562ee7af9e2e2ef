"""Step 3 of the report: the report as data, sections of paragraphs, tables, quotes and figures.

Every word comes from templates/text.j2 (wording.say); numbers are formatted
here. The document is built once and rendered twice (render.py), to Markdown and
to HTML, so the two can never say different things.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from oloraplus.grid import full_steps, probe_steps
from oloraplus.plots import lambda_label
from oloraplus.report.compare import (
    METRICS,
    Group,
    TunedChoice,
    baseline_group,
    orphan_lrs,
    row_ci,
    tuned_baseline,
)
from oloraplus.report.load import Study
from oloraplus.report.wording import columns, say
from oloraplus.stats import BootstrapResult, format_mean_ci

N_EXAMPLES = 3
NONE = "—"  # an empty cell: nothing to show


# --- the blocks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """A table cell; its tag (better / worse / undecided / diverged) is what the renderers highlight."""

    text: str
    tag: str = ""


@dataclass(frozen=True)
class Heading:
    kind: ClassVar[str] = "heading"
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    kind: ClassVar[str] = "paragraph"
    text: str


@dataclass(frozen=True)
class BulletList:
    kind: ClassVar[str] = "list"
    items: tuple[str, ...]


@dataclass(frozen=True)
class Quote:
    """A labelled verbatim text (an instruction, a reference answer): its line breaks are kept."""

    kind: ClassVar[str] = "quote"
    label: str
    text: str


@dataclass(frozen=True)
class Table:
    kind: ClassVar[str] = "table"
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]


@dataclass(frozen=True)
class Figure:
    """A PNG under the study folder and its caption."""

    kind: ClassVar[str] = "figure"
    caption: str
    path: Path


Block = Paragraph | BulletList | Quote | Table | Figure


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block | Section, ...]
    level: int = 2

    def flat(self) -> Iterator[Heading | Block]:
        yield Heading(self.level, self.title)
        for b in self.blocks:
            yield from b.flat() if isinstance(b, Section) else (b,)


@dataclass(frozen=True)
class Document:
    title: str
    intro: tuple[Block, ...]
    sections: tuple[Section, ...]

    def flat(self) -> Iterator[Heading | Block]:
        """Headings and blocks in reading order: what the renderers walk through."""
        yield Heading(1, self.title)
        yield from self.intro
        for s in self.sections:
            yield from s.flat()


def table(headers: list[str], rows: list[list[Any]]) -> Table:
    return Table(tuple(headers), tuple(tuple(c if isinstance(c, Cell) else Cell(str(c)) for c in r) for r in rows))


# --- the head: what was run -----------------------------------------------------------------------------


def _probe(study: Study) -> dict[str, Any]:
    """The probe_fraction of the selection runs and the optimizer steps it gives (probe macro's arguments)."""
    fraction = study.grid.probe_fraction
    return {"fraction": fraction, "steps": probe_steps(study.base, fraction), "full_steps": full_steps(study.base)}


def _protocol_item(study: Study) -> str:
    grid = study.grid
    return say(
        "item_protocol",
        fixed=study.compares_fixed,
        fixed_lrs=study.fixed_lrs,
        tuned=study.compares_tuned,
        tuned_lrs=grid.lrs or [],
        selection_seeds=grid.selection_seeds,
        **_probe(study),
    )


def head(study: Study) -> tuple[Block, ...]:
    base, grid = study.base, study.grid
    first = (study.runs or study.selection_runs)[0].metrics  # a tuned study may have only selection runs yet
    finished = sum(r.finished for r in study.runs)
    total = len(study.runs) + len(study.selection_runs) + len(study.unfinished)
    items = (
        say("item_model", name=base.model.name),
        say("item_data", source=base.data.source, split_seed=base.data.split_seed, max_length=base.data.max_length),
        say(
            "item_examples",
            n_train=first.get("n_train", base.data.n_train),
            n_val=first.get("n_val", "?"),
            n_test=first.get("n_test", base.data.n_test),
        ),
        say("item_adapter", rank=base.adapter.rank, alpha=base.adapter.alpha, dropout=base.adapter.dropout),
        say(
            "item_training",
            lrs=grid.lrs or [base.train.lr],
            epochs=base.train.epochs,
            batch_size=base.train.batch_size,
            precision=first.get("precision", "?"),
        ),
        say("item_methods", methods=grid.methods, lr_ratios=grid.lr_ratios, baseline=study.baseline),
        say("item_seeds", seeds=grid.seeds),
        _protocol_item(study),
        say(
            "item_runs",
            finished=finished,
            diverged=len(study.runs) - finished,
            selection_runs=len(study.selection_runs),
            unfinished=len(study.unfinished),
            total=total,
        ),
    )
    blocks: list[Block] = [BulletList(items), Paragraph(say("test_split_untouched"))]
    if study.unfinished:
        blocks.append(Paragraph(say("left_out", n=len(study.unfinished))))
    return tuple(blocks)


# --- results by group and protocol fixed ------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else NONE


def summary_section(groups: list[Group], summary: list[dict[str, Any]]) -> Section:
    rows = []
    for g, row in zip(groups, summary):
        all_diverged = not g.finished
        cells: list[Any] = [
            g.method,
            lambda_label(g.lr_ratio),
            f"{g.lr:g}",
            say("seeds_of", finished=len(g.finished), runs=len(g.runs)),
        ]
        for m in METRICS:
            cells.append(
                Cell(say("diverged"), "diverged") if all_diverged else format_mean_ci(row_ci(row, m.key), m.digits)
            )
        cells.append(_fmt(row["train_seconds"]["mean"], ".0f"))
        cells.append(_fmt(row["train_tokens_per_s"]["mean"], ".0f"))
        cells.append(Cell(row["diverged_note"], "diverged") if row["diverged_note"] else NONE)
        rows.append(cells)
    headers = columns("summary_columns", metrics=[m.name for m in METRICS])
    return Section(say("summary_title"), (Paragraph(say("summary_intro")), table(headers, rows)))


def _signed(v: float, digits: int) -> str:
    return f"{v:+.{digits}f}"


def _verdict_cell(res: BootstrapResult, digits: int) -> Cell:
    if not math.isfinite(res.diff):
        return Cell(res.verdict, "undecided")
    tag = {"better": "better", "worse": "worse"}.get(res.verdict, "undecided")
    text = say(
        "verdict_cell",
        diff=_signed(res.diff, digits),
        low=_signed(res.low, digits),
        high=_signed(res.high, digits),
        verdict=res.verdict,
    )
    return Cell(text, tag)


def _verdict_cells(c: dict[str, Any]) -> list[Any]:
    """One cell per metric: difference, 95% interval and verdict, or '—' when not computable."""
    cells: list[Any] = []
    for m in METRICS:
        res: BootstrapResult | None = c["metrics"].get(m.key)
        cells.append(_verdict_cell(res, m.digits) if res else NONE)
    return cells


def _seeds_vs(c: dict[str, Any]) -> str:
    return say("seeds_vs", n=len(c["seeds"]), n_baseline=len(c["baseline_seeds"]), paired=c["paired_by_seed"])


def fixed_section(comparisons: list[dict[str, Any]], baseline: str, groups: list[Group]) -> Section:
    blocks: list[Block] = [Paragraph(say("fixed_intro"))]
    orphans = orphan_lrs(groups, baseline)
    if orphans:
        blocks.append(Paragraph(say("no_baseline_at", baseline=baseline, lrs=orphans)))
    if not comparisons:
        blocks.append(Paragraph(say("no_comparison", baseline=baseline)))
    else:
        headers = columns("fixed_columns", metrics=[m.name for m in METRICS])
        rows = [
            [c["protocol"], c["method"], lambda_label(c["lr_ratio"]), f"{c['lr']:g}", _seeds_vs(c), *_verdict_cells(c)]
            for c in comparisons
        ]
        blocks.append(table(headers, rows))
    return Section(say("fixed_title", baseline=baseline), tuple(blocks))


# --- protocol tuned -----------------------------------------------------------------------------------------


def _selection_cell(by_lr: dict[float, float | None], lr: float, chosen: float | None) -> Any:
    """A validation loss; 'diverged'; '—' where the lr was not tried; the chosen lr's loss is highlighted."""
    if lr not in by_lr:
        return NONE
    v = by_lr[lr]
    if v is None:
        return Cell(say("diverged"), "diverged")
    return Cell(f"{v:.4f}", "better") if chosen is not None and math.isclose(lr, chosen) else f"{v:.4f}"


def selection_section(study: Study, heatmaps: list[Figure]) -> Section:
    """Protocol tuned, step 1: the validation loss of every method/λ at every lr, and the lr each chose."""
    title = say("selection_title")
    blocks: list[Block] = [
        Paragraph(say("selection_intro", selection_seeds=study.grid.selection_seeds, **_probe(study)))
    ]
    if not study.selection:
        return Section(title, (*blocks, Paragraph(say("selection_pending", n=len(study.selection_runs)))))
    lrs = sorted({float(lr) for e in study.selection.values() for lr in e["val_loss_by_lr"]})
    rows = []
    for e in study.selection.values():
        by_lr = {float(lr): v for lr, v in e["val_loss_by_lr"].items()}
        chosen = e.get("chosen_lr")
        rows.append(
            [
                e["method"],
                lambda_label(float(e["lr_ratio"])),
                *[_selection_cell(by_lr, lr, chosen) for lr in lrs],
                f"{chosen:g}" if chosen is not None else Cell(say("every_lr_diverged"), "diverged"),
            ]
        )
    blocks.append(table(columns("selection_columns", lrs=lrs), rows))
    return Section(title, (*blocks, *heatmaps))


def _no_verdict(choice: TunedChoice) -> str:
    """Why a method/λ of protocol tuned has no verdict (the no_verdict macro words it)."""
    if choice.chosen_lr is None:
        return "selection_diverged"
    if choice.group is None:
        return "not_run"
    if not choice.group.finished:
        return "all_diverged"
    return "no_baseline"


def tuned_section(study: Study, choices: list[TunedChoice], comparisons: list[dict[str, Any]]) -> Section:
    """Protocol tuned, step 2: each method/λ at its chosen lr against the baseline at its own chosen lr."""
    baseline = study.baseline
    title = say("tuned_title", baseline=baseline)
    blocks: list[Block] = [Paragraph(say("tuned_intro", baseline=baseline))]
    if study.selection is None:
        return Section(title, (*blocks, Paragraph(say("tuned_pending"))))
    base = tuned_baseline(choices, baseline)
    if base is None:
        blocks.append(Paragraph(say("tuned_no_baseline", baseline=baseline)))
    by_key = {(c["method"], c["lr_ratio"]): c for c in comparisons}
    rows = []
    for choice in choices:
        if base is not None and choice is base:
            continue
        c = by_key.get((choice.method, choice.lr_ratio))
        first = ["tuned", choice.method, lambda_label(choice.lr_ratio)]
        if c is not None:
            rows.append([*first, f"{c['lr']:g}", f"{c['baseline_lr']:g}", _seeds_vs(c), *_verdict_cells(c)])
            continue
        lr = f"{choice.chosen_lr:g}" if choice.chosen_lr is not None else NONE
        base_lr = f"{base.chosen_lr:g}" if base is not None and base.chosen_lr is not None else NONE
        why = Cell(say("no_verdict", why=_no_verdict(choice)), "diverged")
        rows.append([*first, lr, base_lr, NONE, why, *[NONE] * (len(METRICS) - 1)])
    if rows:
        headers = columns("tuned_columns", baseline=baseline, metrics=[m.name for m in METRICS])
        blocks.append(table(headers, rows))
    return Section(title, tuple(blocks))


# --- examples, figures, missing runs --------------------------------------------------------------------------


def group_label(group: Group) -> str:
    """'olora+ λ=1/4', or the method alone for one without an lr_ratio (plot legends, example tables)."""
    return f"{group.method} λ={lambda_label(group.lr_ratio)}" if group.method.endswith("+") else group.method


def examples_section(groups: list[Group], baseline: str, n: int = N_EXAMPLES) -> Section | None:
    """A few test examples with every method's answer (first finished seed of each, one lr)."""
    lrs = sorted(
        sorted({g.lr for g in groups if g.finished}), key=lambda lr: baseline_group(groups, baseline, lr) is None
    )
    if not lrs:
        return None
    shown = [g for g in groups if g.lr == lrs[0] and g.finished]
    preds = [(g, p) for g in shown if (p := g.finished[0].predictions)]
    shared = sorted(set.intersection(*(set(p) for _, p in preds))) if preds else []
    shared = [i for i in shared if all("prediction" in p[i] for _, p in preds)]
    if not shared:
        return None
    picks = [shared[round(k * (len(shared) - 1) / max(n - 1, 1))] for k in range(min(n, len(shared)))]
    examples = []
    for idx in dict.fromkeys(picks):
        first = preds[0][1][idx]
        prompt = first.get("instruction", "") + (f"\n\n{first['input']}" if first.get("input") else "")
        rows = [[group_label(g), str(g.finished[0].seed), p[idx]["prediction"]] for g, p in preds]
        examples.append(
            Section(
                say("example_title", index=idx),
                (
                    Quote(say("instruction"), prompt),
                    Quote(say("reference"), first.get("reference", "")),
                    table(columns("example_columns"), rows),
                ),
                level=3,
            )
        )
    return Section(say("examples_title"), (Paragraph(say("examples_intro", lr=lrs[0])), *examples))


def figures_section(figures: list[Figure]) -> Section | None:
    return Section(say("plots_title"), tuple(figures)) if figures else None


def unfinished_section(study: Study) -> Section | None:
    if not study.unfinished:
        return None
    return Section(
        say("unfinished_title"),
        (
            Paragraph(say("unfinished_intro", n=len(study.unfinished))),
            BulletList(
                tuple(
                    say("failed_run", run_id=r, error=study.failed[r]) if r in study.failed else r
                    for r in study.unfinished
                )
            ),
        ),
    )


def build(
    study: Study,
    groups: list[Group],
    summary: list[dict[str, Any]],
    fixed: list[Group],
    comparisons: list[dict[str, Any]],
    choices: list[TunedChoice],
    tuned: list[dict[str, Any]],
    figures: list[Figure],
    heatmaps: list[Figure],
) -> Document:
    """The whole report: what was run, results by group, the verdicts of each protocol, plots, examples, missing runs."""
    sections: list[Section | None] = [summary_section(groups, summary)]
    if study.compares_fixed:
        sections.append(fixed_section(comparisons, study.baseline, fixed))
    if study.compares_tuned:
        sections += [selection_section(study, heatmaps), tuned_section(study, choices, tuned)]
    sections += [figures_section(figures), examples_section(groups, study.baseline), unfinished_section(study)]
    return Document(say("title", name=study.path.name), head(study), tuple(s for s in sections if s is not None))
