"""Step 2 of the report: statistics over the loaded runs, no files written and no words chosen.

Runs are grouped by (method, lr_ratio, lr); each group is summarized over its
finished seeds (mean and 95% CI), and compared with the baseline at two levels:
a paired bootstrap over test examples (seeds paired by seed, examples paired by
their test-record index, never by row order) and a paired t test over the
per-seed differences. The eval loss is token-weighted everywhere (Σ loss_sum /
Σ n_tokens over the examples, as metrics.json's eval_loss and the training
objective). Each protocol's table is one family: Holm's correction adjusts the
p-values of its rows per metric and level. Protocol fixed compares at the same lr,
protocol tuned compares each method/lr_ratio at the lr it chose on validation
data with the baseline at ITS chosen lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from oloraplus.config import METHODS
from oloraplus.report.load import Run, Study
from oloraplus.report.pairing import check_pair
from oloraplus.stats import (
    DEFAULT_RESAMPLES,
    BootstrapResult,
    MeanCI,
    holm,
    mean_ci,
    paired_bootstrap,
    paired_bootstrap_bleu,
    paired_bootstrap_ratio,
    seed_level,
    verdict,
    verdict_from_p,
)


@dataclass(frozen=True)
class Metric:
    key: str  # in metrics.json
    name: str
    example_key: str  # in predictions.jsonl
    higher_is_better: bool
    digits: int


METRICS = (
    Metric("eval_loss", "eval loss", "loss_sum", False, 4),  # weighted by n_tokens: see _example_level
    Metric("bleu", "BLEU", "bleu_stats", True, 2),
    Metric("rouge1", "ROUGE-1", "rouge1", True, 4),
    Metric("rouge2", "ROUGE-2", "rouge2", True, 4),
    Metric("rougeL", "ROUGE-L", "rougeL", True, 4),
)
SUMMARY_KEYS = tuple(m.key for m in METRICS) + ("val_loss", "train_seconds", "train_tokens_per_s")
# A verdict rests on the seed level from this many paired seeds on; below it, a t interval on n − 1 degrees of
# freedom is too wide to say anything (t = 12.7 at 1 df, 4.3 at 2) and the verdict rests on the example level.
SEED_LEVEL_MIN_SEEDS = 3
SEEDS, EXAMPLES = "seeds", "examples"


# --- groups and their summary rows ---------------------------------------------------------------


@dataclass
class Group:
    """The seeds of one (method, lr_ratio, lr)."""

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

    def values(self, key: str) -> list[Any]:
        return [r.metrics.get(key) for r in self.finished]


def group_runs(study: Study) -> list[Group]:
    """Groups ordered by lr, then baseline first, then grid method order, then lr_ratio."""
    groups: dict[tuple[str, float, float], Group] = {}
    for run in sorted(study.runs, key=lambda r: r.seed):
        key = (run.method, run.lr_ratio, run.lr)
        groups.setdefault(key, Group(*key)).runs.append(run)
    order = [study.baseline] + [m for m in study.grid.methods if m != study.baseline]

    def rank(g: Group) -> tuple:
        m = order.index(g.method) if g.method in order else len(order)
        return (g.lr, m, g.method, g.lr_ratio)

    return sorted(groups.values(), key=rank)


def diverged_note(group: Group) -> str:
    """'1 of 3 diverged at step 40'; '' when none did. A results.json field, so it is worded here, with the numbers."""
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
    for key in SUMMARY_KEYS:
        ci = mean_ci(group.values(key))
        row[key] = {"mean": ci.mean, "ci95": ci.half_width, "n": ci.n}
    return row


def row_ci(row: dict[str, Any], key: str) -> MeanCI:
    """One metric of a summary row, as the MeanCI it was made from."""
    d = row[key]
    return MeanCI(d["mean"], d["ci95"], d["n"])


# --- protocol fixed: against the baseline at the same lr --------------------------------------------


def baseline_group(groups: list[Group], baseline: str, lr: float) -> Group | None:
    """The baseline at this lr (lr_ratio = 1 when it has several), if any of its runs finished."""
    cands = [g for g in groups if g.method == baseline and g.lr == lr and g.finished]
    cands.sort(key=lambda g: (g.lr_ratio != 1.0, abs(math.log(g.lr_ratio))))
    return cands[0] if cands else None


def paired_runs(x: Group, base: Group) -> tuple[list[Run], list[Run], bool]:
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


def example_columns(preds: list[dict[int, dict]], key: str) -> tuple[list[int], list[list[Any]]]:
    """Test indices every run has a usable `key` for, and the per-run values on them, in index order."""
    shared = set.intersection(*(set(p) for p in preds)) if preds else set()
    idx = sorted(i for i in shared if all(_usable(p[i].get(key)) for p in preds))
    return idx, [[p[i][key] for i in idx] for p in preds]


def _example_level(
    m: Metric, xp: list[dict[int, dict]], bp: list[dict[int, dict]], n_resamples: int, seed: int
) -> BootstrapResult | None:
    """The paired bootstrap of one metric on the test examples every run has it for; None when there are none."""
    preds = xp + bp
    idx, values = example_columns(preds, m.example_key)
    if m.key == "eval_loss":  # token-weighted: Σ loss_sum / Σ n_tokens, each run with its own token counts
        idx = [i for i in idx if all(int(p[i].get("n_tokens") or 0) > 0 for p in preds)]
        values = [[p[i]["loss_sum"] for i in idx] for p in preds]
    if not idx:
        return None
    xv, bv = values[: len(xp)], values[len(xp) :]
    if m.key == "eval_loss":
        tokens = [[p[i]["n_tokens"] for i in idx] for p in preds]
        return paired_bootstrap_ratio(xv, tokens[: len(xp)], bv, tokens[len(xp) :], False, n_resamples, seed)
    if m.key == "bleu":
        return paired_bootstrap_bleu(xv, bv, n_resamples, seed)
    return paired_bootstrap(xv, bv, m.higher_is_better, n_resamples, seed)


def compare(
    x: Group, base: Group, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, protocol: str = "fixed"
) -> dict[str, Any]:
    """Every metric, x − baseline, on the test examples both have: example level (paired bootstrap) and, when
    the seeds pair, seed level (paired t test); Holm's correction and the verdicts are added by with_holm."""
    xr, br, paired = paired_runs(x, base)
    xp, bp = [r.predictions for r in xr], [r.predictions for r in br]
    out: dict[str, Any] = {
        "protocol": protocol,
        "method": x.method,
        "lr_ratio": x.lr_ratio,
        "lr": x.lr,
        "baseline": base.method,
        "baseline_lr_ratio": base.lr_ratio,
        "baseline_lr": base.lr,
        "seeds": [r.seed for r in xr],
        "baseline_seeds": [r.seed for r in br],
        "paired_by_seed": paired,
        "pairs": [check_pair(a, b) for a, b in zip(xr, br)] if paired else [],
        "metrics": {},
        "seed_level": {},
    }
    for m in METRICS:
        res = _example_level(m, xp, bp, n_resamples, seed)
        if res is None:
            continue
        if not paired:  # seeds that do not pair by seed have no per-seed differences
            res = replace(res, seed_diffs=())
        out["metrics"][m.key] = res
        out["seed_level"][m.key] = seed_level(res.seed_diffs, m.higher_is_better) if paired else None
    return out


@dataclass(frozen=True)
class Verdict:
    """One metric's verdict: the level it rests on, and what that level says before and after Holm's correction."""

    level: str  # SEEDS or EXAMPLES
    raw: str  # the level's 95% interval excludes 0
    holm: str  # the level's Holm-adjusted p-value < 0.05: the verdict the report gives


def verdict_level(n_paired_seeds: int) -> str:
    return SEEDS if n_paired_seeds >= SEED_LEVEL_MIN_SEEDS else EXAMPLES


def with_holm(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One family (one protocol's table): Holm-adjust each metric's p-values per level, then give the verdicts."""
    for m in METRICS:
        rows = [c for c in comparisons if m.key in c["metrics"]]
        for adjusted, c in zip(holm([c["metrics"][m.key].p_value for c in rows]), rows):
            c["metrics"][m.key] = replace(c["metrics"][m.key], p_holm=adjusted)
        seeded = [c for c in rows if c["seed_level"][m.key] is not None]
        for adjusted, c in zip(holm([c["seed_level"][m.key].p_value for c in seeded]), seeded):
            c["seed_level"][m.key] = replace(c["seed_level"][m.key], p_holm=adjusted)
    for c in comparisons:
        level = verdict_level(len(c["seeds"]) if c["paired_by_seed"] else 0)
        c["verdict_level"] = level
        c["verdicts"] = {}
        for m in METRICS:
            if m.key not in c["metrics"]:
                continue
            res = c["seed_level"][m.key] if level == SEEDS else c["metrics"][m.key]
            diff = res.mean if level == SEEDS else res.diff
            c["verdicts"][m.key] = Verdict(
                level,
                verdict(res.low, res.high, m.higher_is_better),
                verdict_from_p(diff, res.p_holm, m.higher_is_better),
            )
    return comparisons


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
    return with_holm(out)


def orphan_lrs(groups: list[Group], baseline: str) -> list[float]:
    """The lrs with finished runs but no finished baseline run: nothing there is compared."""
    return sorted({g.lr for g in groups if g.finished and baseline_group(groups, baseline, g.lr) is None})


# --- protocol tuned: each at its chosen lr -------------------------------------------------------------


@dataclass
class TunedChoice:
    """One method/lr_ratio under protocol tuned: its selection.json entry and its test runs at the chosen lr."""

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
        lr, method, lr_ratio = entry.get("chosen_lr"), entry["method"], float(entry["lr_ratio"])
        match = [
            g
            for g in groups
            if lr is not None
            and g.method == method
            and g.lr_ratio == lr_ratio
            and math.isclose(g.lr, float(lr), rel_tol=1e-9)
        ]
        out.append(TunedChoice(entry, match[0] if match else None))
    return out


def tuned_baseline(choices: list[TunedChoice], baseline: str) -> TunedChoice | None:
    """The baseline at its own chosen lr (lr_ratio = 1 when it has several), if any of its runs there finished."""
    cands = [c for c in choices if c.method == baseline and c.group is not None and c.group.finished]
    cands.sort(key=lambda c: (c.lr_ratio != 1.0, abs(math.log(c.lr_ratio))))
    return cands[0] if cands else None


def tuned_comparisons(choices: list[TunedChoice], baseline: str, n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """Protocol tuned: each method/lr_ratio at its chosen lr against the baseline at ITS chosen lr."""
    base = tuned_baseline(choices, baseline)
    if base is None:
        return []
    return with_holm(
        [
            compare(c.group, base.group, n_resamples, seed, protocol="tuned")
            for c in choices
            if c is not base and c.group is not None and c.group.finished
        ]
    )


# --- what the figures show ---------------------------------------------------------------------------


def lambda_panels(groups: list[Group], rows: list[dict[str, Any]], base: Group | None) -> list:
    """(metric name, {method: (lr_ratio, mean, CI) points}, baseline (mean, CI)) per metric; the baseline is dashed."""
    panels = []
    for m in METRICS:
        series: dict[str, list[tuple[float, float, float]]] = {}
        for g, row in zip(groups, rows):
            ci = row_ci(row, m.key)
            if g is base or ci.n == 0:
                continue
            series.setdefault(g.method, []).append((g.lr_ratio, ci.mean, ci.half_width))
        base_ci = row_ci(rows[groups.index(base)], m.key) if base is not None and base in groups else None
        has_base = base_ci is not None and base_ci.n > 0
        if series or has_base:
            panels.append((m.name, series, (base_ci.mean, base_ci.half_width) if has_base else None))
    return panels


def heatmap_cells(selection: dict[str, dict[str, Any]], init: str) -> tuple[dict, dict]:
    """({(lr_ratio, lr): val loss or None=diverged}, {lr_ratio: chosen lr}) of the methods with this init."""
    cells: dict[tuple[float, float], float | None] = {}
    chosen: dict[float, float | None] = {}
    for e in selection.values():
        if METHODS.get(e["method"], ("?",))[0] != init:
            continue
        lr_ratio = float(e["lr_ratio"])
        for lr, v in e["val_loss_by_lr"].items():
            cells[(lr_ratio, float(lr))] = v
        chosen[lr_ratio] = e.get("chosen_lr")
    return cells, chosen
