"""Step 3 of the report: the report as data, sections of paragraphs, tables, quotes and figures (blocks.py).

Every word comes from templates/text.j2 (wording.say); numbers are formatted
here and in verdicts.py (the comparison sections). The document is built once and
rendered twice (render.py), to Markdown and to HTML, so the two can never say
different things.
"""

from __future__ import annotations

import math
from typing import Any

from oloraplus.grid import full_steps, probe_steps
from oloraplus.plots import lambda_label
from oloraplus.report.blocks import (
    NONE,
    Block,
    BulletList,
    Cell,
    Document,
    Figure,
    Heading,
    Paragraph,
    Quote,
    Section,
    Table,
    table,
)
from oloraplus.report.compare import METRICS, Group, TunedChoice, baseline_group, row_ci
from oloraplus.report.load import Study
from oloraplus.report.texts import RecordTexts
from oloraplus.report.verdicts import fixed_section, pairing_section, tuned_section
from oloraplus.report.wording import columns, say
from oloraplus.runs import recorded_eval_precision
from oloraplus.stats import format_mean_ci

__all__ = ["BulletList", "Cell", "Document", "Figure", "Heading", "Paragraph", "Quote", "Section", "Table", "build"]

N_EXAMPLES = 3


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
            eval_precision=recorded_eval_precision(first) or "?",
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


# --- examples, figures, missing runs --------------------------------------------------------------------------


def group_label(group: Group) -> str:
    """'olora+ λ=1/4', or the method alone for one without an lr_ratio (plot legends, example tables)."""
    return f"{group.method} λ={lambda_label(group.lr_ratio)}" if group.method.endswith("+") else group.method


def examples_section(
    groups: list[Group], baseline: str, texts: RecordTexts | None = None, n: int = N_EXAMPLES
) -> Section | None:
    """A few test examples with every method's answer (first finished seed of each, one lr), and the record's
    instruction and reference where `texts` has them (read from the data file, never from the run folders alone)."""
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
    texts = texts or RecordTexts()
    examples = []
    for idx in dict.fromkeys(picks):
        rows = [[group_label(g), str(g.finished[0].seed), p[idx]["prediction"]] for g, p in preds]
        quotes: tuple[Block, ...] = ()
        if (rec := texts.by_index.get(idx)) is not None:
            prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
            quotes = (Quote(say("instruction"), prompt), Quote(say("reference"), rec["output"]))
        examples.append(
            Section(say("example_title", index=idx), (*quotes, table(columns("example_columns"), rows)), level=3)
        )
    intro = say("examples_intro", lr=lrs[0], origin=texts.origin, source=texts.source)
    return Section(say("examples_title"), (Paragraph(intro), *examples))


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
    texts: RecordTexts | None = None,
) -> Document:
    """The whole report: what was run, results by group, the verdicts of each protocol, whether the paired runs are
    alike, plots, examples, missing runs."""
    sections: list[Section | None] = [summary_section(groups, summary)]
    if study.compares_fixed:
        sections.append(fixed_section(comparisons, study.baseline, fixed))
    if study.compares_tuned:
        sections += [
            selection_section(study, heatmaps),
            tuned_section(study.selection, study.baseline, choices, tuned),
        ]
    sections += [
        pairing_section(comparisons + tuned),
        figures_section(figures),
        examples_section(groups, study.baseline, texts),
        unfinished_section(study),
    ]
    return Document(say("title", name=study.path.name), head(study), tuple(s for s in sections if s is not None))
