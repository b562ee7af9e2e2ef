"""The report's comparison sections: verdict tables of both protocols, both levels side by side, and the pairing check.

Per protocol an overview (one cell per metric: the difference, the 95% interval of
the level the verdict rests on, the verdict under Holm), then one table per metric
with the example level and the seed level side by side, raw and Holm-adjusted
p-values, and the per-seed differences. Words from templates/text.j2.
"""

from __future__ import annotations

import math
from typing import Any

from oloraplus.plots import lambda_label
from oloraplus.report.blocks import NONE, Block, Cell, Paragraph, Section, table
from oloraplus.report.compare import (
    EXAMPLES,
    METRICS,
    SEED_LEVEL_MIN_SEEDS,
    Group,
    Metric,
    TunedChoice,
    Verdict,
    orphan_lrs,
    tuned_baseline,
)
from oloraplus.report.pairing import Difference, PairCheck
from oloraplus.report.wording import columns, say
from oloraplus.stats import BootstrapResult, SeedLevelResult

TAGS = {"better": "better", "worse": "worse"}


def signed(v: float, digits: int) -> str:
    return f"{v:+.{digits}f}" if math.isfinite(v) else NONE


def p_text(p: float) -> str:
    if not math.isfinite(p):
        return NONE
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _interval(low: float, high: float, digits: int) -> str:
    return f"[{signed(low, digits)}, {signed(high, digits)}]" if math.isfinite(low) and math.isfinite(high) else NONE


def _overview_cell(c: dict[str, Any], m: Metric) -> Any:
    """Difference, the raw 95% interval of the level the verdict rests on, and the verdict under Holm."""
    res: BootstrapResult | None = c["metrics"].get(m.key)
    if res is None:
        return NONE
    v: Verdict = c["verdicts"][m.key]
    if not math.isfinite(res.diff):
        return Cell(v.holm, "undecided")
    level = res if v.level == EXAMPLES else c["seed_level"][m.key]
    text = say(
        "verdict_cell",
        diff=signed(res.diff, m.digits),
        interval=_interval(level.low, level.high, m.digits),
        verdict=v.holm,
        raw=v.raw,
    )
    return Cell(text, TAGS.get(v.holm, "undecided"))


def _not_alike(c: dict[str, Any]) -> int:
    return sum(not p.alike for p in c["pairs"])


def seeds_vs(c: dict[str, Any]) -> str:
    return say(
        "seeds_vs",
        n=len(c["seeds"]),
        n_baseline=len(c["baseline_seeds"]),
        paired=c["paired_by_seed"],
        not_alike=_not_alike(c),
    )


def _first_cells(c: dict[str, Any], tuned: bool) -> list[Any]:
    cells = [c["protocol"], c["method"], lambda_label(c["lr_ratio"]), f"{c['lr']:g}"]
    return [*cells, f"{c['baseline_lr']:g}"] if tuned else cells


def _level_paragraphs(comparisons: list[dict[str, Any]]) -> list[Block]:
    """How the verdicts are reached, and a warning for the rows whose verdict rests on the example level."""
    resamples = max((r.n_resamples for c in comparisons for r in c["metrics"].values()), default=0)
    blocks: list[Block] = [Paragraph(say("levels_intro", min_seeds=SEED_LEVEL_MIN_SEEDS, resamples=resamples))]
    on_examples = sum(c["verdict_level"] == EXAMPLES for c in comparisons)
    if on_examples:
        blocks.append(
            Paragraph(
                say("examples_level_warning", n=on_examples, total=len(comparisons), min_seeds=SEED_LEVEL_MIN_SEEDS)
            )
        )
    return blocks


def _seed_cells(s: SeedLevelResult | None, paired: bool, digits: int) -> list[Any]:
    """Per-seed differences, the t interval, p and Holm p; a one-cell reason where there is no seed level."""
    if s is None or s.n_seeds < 2:
        why = say("no_seed_level", why="unpaired" if not paired else ("one" if s and s.n_seeds == 1 else "none"))
        per_seed = ", ".join(signed(d, digits) for d in s.diffs) if s else NONE
        return [per_seed, why, NONE, NONE]
    return [
        ", ".join(signed(d, digits) for d in s.diffs),
        _interval(s.low, s.high, digits),
        p_text(s.p_value),
        p_text(s.p_holm),
    ]


def metric_table(comparisons: list[dict[str, Any]], m: Metric, tuned: bool) -> Section | None:
    """One metric, every row of the protocol: example level and seed level side by side, raw and Holm p."""
    rows = []
    for c in comparisons:
        res: BootstrapResult | None = c["metrics"].get(m.key)
        if res is None:
            continue
        v: Verdict = c["verdicts"][m.key]
        rows.append(
            [
                *_first_cells(c, tuned)[1:],
                seeds_vs(c),
                signed(res.diff, m.digits),
                _interval(res.low, res.high, m.digits),
                p_text(res.p_value),
                p_text(res.p_holm),
                *_seed_cells(c["seed_level"][m.key], c["paired_by_seed"], m.digits),
                Cell(say("verdict_with_level", verdict=v.holm, level=v.level), TAGS.get(v.holm, "undecided")),
            ]
        )
    if not rows:
        return None
    headers = columns("metric_columns", tuned=tuned)
    return Section(say("metric_title", name=m.name, protocol=comparisons[0]["protocol"]), (table(headers, rows),), 3)


def _comparison_blocks(comparisons: list[dict[str, Any]], tuned: bool, baseline: str) -> list[Block | Section]:
    headers = columns("verdict_columns", tuned=tuned, baseline=baseline, metrics=[m.name for m in METRICS])
    rows = [
        [*_first_cells(c, tuned), seeds_vs(c), say("level_name", level=c["verdict_level"])]
        + [_overview_cell(c, m) for m in METRICS]
        for c in comparisons
    ]
    details = [t for m in METRICS if (t := metric_table(comparisons, m, tuned)) is not None]
    return [*_level_paragraphs(comparisons), table(headers, rows), *details]


def fixed_section(comparisons: list[dict[str, Any]], baseline: str, groups: list[Group]) -> Section:
    blocks: list[Block | Section] = [Paragraph(say("fixed_intro"))]
    orphans = orphan_lrs(groups, baseline)
    if orphans:
        blocks.append(Paragraph(say("no_baseline_at", baseline=baseline, lrs=orphans)))
    if not comparisons:
        blocks.append(Paragraph(say("no_comparison", baseline=baseline)))
    else:
        blocks += _comparison_blocks(comparisons, False, baseline)
    return Section(say("fixed_title", baseline=baseline), tuple(blocks))


def _no_verdict(choice: TunedChoice) -> str:
    """Why a method/λ of protocol tuned has no verdict (the no_verdict macro words it)."""
    if choice.chosen_lr is None:
        return "selection_diverged"
    if choice.group is None:
        return "not_run"
    if not choice.group.finished:
        return "all_diverged"
    return "no_baseline"


def tuned_section(
    selection: dict[str, Any] | None, baseline: str, choices: list[TunedChoice], comparisons: list[dict[str, Any]]
) -> Section:
    """Protocol tuned, step 2: each method/λ at its chosen lr against the baseline at its own chosen lr."""
    title = say("tuned_title", baseline=baseline)
    blocks: list[Block | Section] = [Paragraph(say("tuned_intro", baseline=baseline))]
    if selection is None:
        return Section(title, (*blocks, Paragraph(say("tuned_pending"))))
    base = tuned_baseline(choices, baseline)
    if base is None:
        blocks.append(Paragraph(say("tuned_no_baseline", baseline=baseline)))
    done = {(c["method"], c["lr_ratio"]) for c in comparisons}
    missing = []
    for choice in choices:
        if (base is not None and choice is base) or (choice.method, choice.lr_ratio) in done:
            continue
        lr = f"{choice.chosen_lr:g}" if choice.chosen_lr is not None else NONE
        base_lr = f"{base.chosen_lr:g}" if base is not None and base.chosen_lr is not None else NONE
        why = Cell(say("no_verdict", why=_no_verdict(choice)), "diverged")
        missing.append(["tuned", choice.method, lambda_label(choice.lr_ratio), lr, base_lr, why])
    if comparisons:
        blocks += _comparison_blocks(comparisons, True, baseline)
    if missing:
        blocks.append(table(columns("tuned_missing_columns", baseline=baseline), missing))
    return Section(title, tuple(blocks))


# --- are the paired runs alike? ------------------------------------------------------------------------------------


def _value(v: Any) -> str:
    if v is None:
        return say("not_recorded")
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)


def _difference(d: Difference) -> str:
    ratio = max(d.throughputs) / min(d.throughputs) if d.throughputs else None
    return say(
        "difference",
        field=d.field,
        run=_value(d.run),
        baseline=_value(d.baseline),
        throughputs=[f"{t:,.0f}" for t in d.throughputs] if d.throughputs else None,
        ratio=f"{ratio:.0f}" if ratio else None,
    )


def pairing_section(comparisons: list[dict[str, Any]]) -> Section | None:
    """Every pair of runs a comparison rests on: what differs besides the method, λ and lr."""
    pairs: list[tuple[dict[str, Any], PairCheck]] = [(c, p) for c in comparisons for p in c["pairs"]]
    if not pairs:
        return None
    differ = [(c, p) for c, p in pairs if not p.alike]
    unrecorded = sum(p.alike and not p.device_recorded for _, p in pairs)
    blocks: list[Block] = [
        Paragraph(say("pairing_intro")),
        Paragraph(say("pairing_summary", total=len(pairs), differ=len(differ), unrecorded=unrecorded)),
    ]
    if differ:
        rows = [
            [
                c["protocol"],
                c["method"],
                lambda_label(c["lr_ratio"]),
                f"{c['lr']:g}",
                str(p.seed),
                p.run_id,
                p.baseline_run_id,
                "\n".join(_difference(d) for d in p.differences),
            ]
            for c, p in differ
        ]
        blocks.append(table(columns("pairing_columns"), rows))
    return Section(say("pairing_title"), tuple(blocks))
