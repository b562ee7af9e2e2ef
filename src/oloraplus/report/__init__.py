"""`oloraplus report`: read a study folder, write report.md/html, results.csv/json and plots.

One way through, one module per step:

    load.py      study.yaml (rebuilt by the config code), selection.json, run folders (runs.RunFolder)
    texts.py     the test records' texts to quote, from the data file (the runs keep only the record index)
    compare.py   groups, mean ± CI over seeds, baselines, paired comparisons at the example level (bootstrap)
                 and the seed level (t test), Holm per protocol table, tuned choices; pairing.py: are the
                 paired runs alike (machine, precision, settings)?
    figures.py   the PNGs under STUDY/plots (drawn by plots.py, written atomically)
    document.py  the report as data (blocks.py): sections of paragraphs, tables, quotes, figures; verdicts.py
                 the comparison sections (words from wording.py)
    render.py    Markdown and self-contained HTML from templates/*.j2
    results.py   results.csv and results.json

Unfinished runs are counted and listed, diverged runs are counted and shown:
nothing is dropped silently. A study has up to two protocols (see grid.py):
`fixed` compares every method with the baseline at the same learning rate;
`tuned` compares each method/lr_ratio at the lr it chose on validation data with
the baseline at ITS chosen lr. Every verdict row names its protocol. Selection
runs (validation only) feed the selection section and its heatmaps, never the
test tables.
"""

from __future__ import annotations

from pathlib import Path

from oloraplus.fsutil import atomic_write_json, atomic_write_text
from oloraplus.report.compare import (
    all_comparisons,
    fixed_groups,
    group_runs,
    summarize,
    tuned_choices,
    tuned_comparisons,
)
from oloraplus.report.document import build
from oloraplus.report.figures import make_plots, selection_heatmaps, tuned_lambda_plot
from oloraplus.report.load import load_study
from oloraplus.report.render import render_html, render_markdown
from oloraplus.report.results import all_runs, results_csv, results_json
from oloraplus.report.texts import record_texts
from oloraplus.stats import DEFAULT_RESAMPLES

__all__ = ["load_study", "write_report"]

REPORT_MD, REPORT_HTML, RESULTS_CSV, RESULTS_JSON = "report.md", "report.html", "results.csv", "results.json"


def write_report(
    study_dir: str | Path,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    data: str | None = None,
    record_texts_from_data: bool = True,
) -> list[Path]:
    """Write report.md, report.html, results.csv, results.json and plots/*.png; report.md comes first.

    The examples quote each record's instruction and reference from `data` (default: the data file the runs
    name) when it is there; record_texts_from_data=False quotes nothing from the data (a report to commit or share).
    """
    study = load_study(study_dir)
    texts = record_texts(study, data, record_texts_from_data)
    groups = group_runs(study)
    summary = [summarize(g) for g in groups]
    fixed = fixed_groups(study, groups)
    comparisons = all_comparisons(fixed, study.baseline, n_resamples, seed)
    choices = tuned_choices(groups, study.selection or {})
    tuned = tuned_comparisons(choices, study.baseline, n_resamples, seed)
    figures = make_plots(study, groups, summary) + tuned_lambda_plot(study, choices)
    heatmaps = selection_heatmaps(study)
    document = build(study, groups, summary, fixed, comparisons, choices, tuned, figures, heatmaps, texts)

    root = study.path
    md, page, csv_path, js = (root / n for n in (REPORT_MD, REPORT_HTML, RESULTS_CSV, RESULTS_JSON))
    runs = all_runs(study)
    atomic_write_text(md, render_markdown(document, root))
    atomic_write_text(page, render_html(document))
    atomic_write_text(csv_path, results_csv(runs))
    atomic_write_json(js, results_json(study, runs, summary, comparisons + tuned, n_resamples, seed))
    return [md, page, csv_path, js, *(f.path for f in figures + heatmaps)]
