"""Statistics for the study report: mean ± 95% CI over seeds, and paired comparisons at two levels.

Example level: the paired bootstrap tells whether the gap between two methods on
the SAME test examples is larger than what the choice of test examples alone
would produce (for these trained adapters). Seed level: a paired t test over the
per-seed differences tells whether it is larger than what the training
randomness alone would produce. Holm's step-down correction adjusts the p-values
of a family of comparisons (several λ against one baseline). Everything here is
pure (numbers in, numbers out) so it can be tested exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from oloraplus.scoring import bleu_from_statistics

# Two-sided 95% Student t quantiles (t_{0.975, df}) for df = 1..30; beyond that a
# Cornish-Fisher expansion around the normal quantile is accurate to ~1e-4.
# fmt: off
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
# fmt: on
_Z975 = 1.959964

BETTER, WORSE, UNDECIDED = "better", "worse", "not distinguishable"
DEFAULT_RESAMPLES = 2000


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (no scipy needed)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class MeanCI:
    """Mean over seeds and the half-width of its 95% t interval (nan when n < 2: no spread to measure)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that are real numbers (drops None, NaN and inf)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Iterable[float | None]) -> MeanCI:
    """Mean ± 95% Student-t CI of the finite values; n=0 gives nan mean, n=1 a nan half-width."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return MeanCI(math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return MeanCI(mean, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return MeanCI(mean, t_quantile_975(n - 1) * sd / math.sqrt(n), n)


def format_mean_ci(ci: MeanCI, digits: int = 4) -> str:
    """'1.2345 ± 0.0123', '1.2345 (n=1)' or '—' (nothing to show)."""
    if ci.n == 0 or not math.isfinite(ci.mean):
        return "—"
    if ci.n == 1 or not math.isfinite(ci.half_width):
        return f"{ci.mean:.{digits}f} (n=1)"
    return f"{ci.mean:.{digits}f} ± {ci.half_width:.{digits}f}"


# --- Student's t distribution (no scipy: the regularized incomplete beta by its continued fraction) ---------------


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / (df + t * t), df / 2, 0.5)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = t_two_sided_p(t, df) / 2
    return 1.0 - tail if t > 0 else tail


# --- example level: the paired bootstrap over test examples -------------------------------------------------------


@dataclass(frozen=True)
class BootstrapResult:
    """Observed difference (method − baseline), its 95% percentile CI, p-value and the plain-words verdict.

    seed_diffs: the same difference seed by seed (method and baseline paired by
    position), for the seed-level test; () when the two have different seed counts.
    p_holm: the p-value after Holm's correction over the comparison's family (nan until adjusted).
    """

    diff: float
    low: float
    high: float
    verdict: str
    n_examples: int
    n_resamples: int
    p_value: float = math.nan
    seed_diffs: tuple[float, ...] = ()
    p_holm: float = math.nan


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """'better' / 'worse' when the CI of (method − baseline) excludes 0, else 'not distinguishable'."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
        return UNDECIDED
    improved = low > 0 if higher_is_better else high < 0
    return BETTER if improved else WORSE


def verdict_from_p(diff: float, p: float, higher_is_better: bool, alpha: float = 0.05) -> str:
    """'better' / 'worse' (by the sign of diff) when p < alpha, else 'not distinguishable'."""
    if not (math.isfinite(p) and math.isfinite(diff)) or p >= alpha or diff == 0:
        return UNDECIDED
    return BETTER if (diff > 0) == higher_is_better else WORSE


def resample_weights(n: int, n_resamples: int, seed: int, chunk: int = 256) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n examples as count matrices (chunk x n), so memory stays bounded.

    Row r counts how often each example was drawn in resample r; a weighted sum
    with these rows equals a sum over the drawn (repeated) examples.
    """
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        k = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(k, n)) + n * np.arange(k)[:, None]
        yield np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)
        done += k


def bootstrap_p(boot: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 'the difference is 0': twice the smaller tail at 0, +1 smoothed."""
    b = len(boot)
    if b == 0:
        return math.nan
    tail = min(int(np.sum(boot <= 0)), int(np.sum(boot >= 0)))
    return min(1.0, 2 * (tail + 1) / (b + 1))


def _percentile_result(
    observed: float, boot: np.ndarray, higher_is_better: bool, n: int, seed_diffs: np.ndarray | None
) -> BootstrapResult:
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    per_seed = tuple(float(v) for v in seed_diffs) if seed_diffs is not None else ()
    return BootstrapResult(
        observed, low, high, verdict(low, high, higher_is_better), n, len(boot), bootstrap_p(boot), per_seed
    )


def _undecidable(n: int) -> BootstrapResult:
    return BootstrapResult(math.nan, math.nan, math.nan, UNDECIDED, n, 0)


def _seeds_paired(x: np.ndarray, b: np.ndarray) -> bool:
    return x.shape[0] == b.shape[0]


def paired_bootstrap(
    method: Sequence[Sequence[float]] | np.ndarray,
    baseline: Sequence[Sequence[float]] | np.ndarray,
    higher_is_better: bool,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap of the mean per-example difference (method − baseline).

    Each argument is (seeds x examples) or one row of examples, column j being the
    same test example in both. Per example the metric is first averaged over the
    seeds (pooling), then example indices are resampled with replacement.
    """
    x = np.atleast_2d(np.asarray(method, dtype=np.float64))
    b = np.atleast_2d(np.asarray(baseline, dtype=np.float64))
    if x.shape[1] != b.shape[1]:
        raise ValueError(f"method and baseline cover different numbers of examples: {x.shape[1]} vs {b.shape[1]}")
    d = x.mean(axis=0) - b.mean(axis=0)
    n = d.size
    if n == 0 or not np.all(np.isfinite(d)):
        return _undecidable(n)
    boot = np.concatenate([w @ d / n for w in resample_weights(n, n_resamples, seed)])
    per_seed = x.mean(axis=1) - b.mean(axis=1) if _seeds_paired(x, b) else None
    return _percentile_result(float(d.mean()), boot, higher_is_better, n, per_seed)


def _mean_ratio(num: np.ndarray, den: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per resample, each seed's Σ w·num / Σ w·den, averaged over seeds: (resamples,)."""
    return ((weights @ num.T) / (weights @ den.T)).mean(axis=1)


def paired_bootstrap_ratio(
    method_num: Sequence[Sequence[float]] | np.ndarray,
    method_den: Sequence[Sequence[float]] | np.ndarray,
    baseline_num: Sequence[Sequence[float]] | np.ndarray,
    baseline_den: Sequence[Sequence[float]] | np.ndarray,
    higher_is_better: bool,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap of a ratio of sums (method − baseline), e.g. the token-weighted loss Σ loss_sum / Σ n_tokens.

    Arguments are (seeds x examples) or one row; column j is the same test example
    everywhere. Every resample draws one set of example indices for every seed of
    both methods; each seed's ratio is taken over the drawn examples, then the
    ratios are averaged over seeds: the seed-averaged loss a run's eval_loss reports.
    """
    xn, xd, bn, bd = (
        np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (method_num, method_den, baseline_num, baseline_den)
    )
    if xn.shape != xd.shape or bn.shape != bd.shape or xn.shape[1] != bn.shape[1]:
        raise ValueError(
            f"ratio parts must be (seeds x examples) on the same examples: {xn.shape} {xd.shape} vs {bn.shape} {bd.shape}"
        )
    n = xn.shape[1]
    parts = np.concatenate([xn, xd, bn, bd])
    if n == 0 or not np.all(np.isfinite(parts)) or np.any(xd <= 0) or np.any(bd <= 0):
        return _undecidable(n)
    full = np.ones((1, n))
    observed = float(_mean_ratio(xn, xd, full)[0] - _mean_ratio(bn, bd, full)[0])
    boot = np.concatenate(
        [_mean_ratio(xn, xd, w) - _mean_ratio(bn, bd, w) for w in resample_weights(n, n_resamples, seed)]
    )
    per_seed = xn.sum(axis=1) / xd.sum(axis=1) - bn.sum(axis=1) / bd.sum(axis=1) if _seeds_paired(xn, bn) else None
    return _percentile_result(observed, boot, higher_is_better, n, per_seed)


def _corpus_bleu(stats: np.ndarray, weights: np.ndarray, bleu: Callable[[list[list[int]]], float]) -> np.ndarray:
    """Per seed and resample, corpus BLEU from the summed statistics: (seeds, resamples)."""
    # stats: (seeds, examples, 10); weights: (resamples, examples) -> summed: (seeds, resamples, 10)
    summed = np.rint(np.einsum("re,sek->srk", weights, stats)).astype(np.int64)
    return np.asarray([[bleu([row.tolist()]) for row in per_seed] for per_seed in summed], dtype=np.float64)


def paired_bootstrap_bleu(
    method_stats: Sequence[Sequence[Sequence[int]]] | np.ndarray,
    baseline_stats: Sequence[Sequence[Sequence[int]]] | np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    bleu: Callable[[list[list[int]]], float] | None = None,
) -> BootstrapResult:
    """Paired bootstrap of corpus BLEU (method − baseline), higher is better.

    Arguments are (seeds x examples x 10) sacreBLEU sufficient statistics (or one
    seed's examples x 10). Every resample draws one set of example indices, used
    for every seed of both methods; corpus BLEU is recomputed from the summed
    statistics of the drawn examples and averaged over seeds.
    """
    bleu = bleu or bleu_from_statistics
    x = np.asarray(method_stats, dtype=np.float64)
    b = np.asarray(baseline_stats, dtype=np.float64)
    x, b = (a[None] if a.ndim == 2 else a for a in (x, b))
    if x.ndim != 3 or b.ndim != 3 or x.shape[1] != b.shape[1]:
        raise ValueError(
            f"BLEU statistics must be (seeds x examples x 10) on the same examples: {x.shape} vs {b.shape}"
        )
    n = x.shape[1]
    if n == 0:
        return _undecidable(0)
    full = np.ones((1, n))
    x_full, b_full = _corpus_bleu(x, full, bleu)[:, 0], _corpus_bleu(b, full, bleu)[:, 0]
    observed = float(x_full.mean() - b_full.mean())
    boot = np.concatenate(
        [
            _corpus_bleu(x, w, bleu).mean(axis=0) - _corpus_bleu(b, w, bleu).mean(axis=0)
            for w in resample_weights(n, n_resamples, seed)
        ]
    )
    per_seed = x_full - b_full if _seeds_paired(x, b) else None
    return _percentile_result(observed, boot, True, n, per_seed)


# --- seed level: a paired t test over the per-seed differences ------------------------------------------------------


@dataclass(frozen=True)
class SeedLevelResult:
    """Mean of the per-seed differences (method − baseline, same seed), its 95% t interval (n−1 df) and p-value.

    With one seed there is no spread to measure: low, high and p are nan and the verdict is undecided.
    """

    diffs: tuple[float, ...]
    mean: float
    low: float
    high: float
    p_value: float
    verdict: str
    p_holm: float = math.nan

    @property
    def n_seeds(self) -> int:
        return len(self.diffs)


def seed_level(diffs: Iterable[float | None], higher_is_better: bool) -> SeedLevelResult:
    """The one-sample t test of the paired per-seed differences against 0."""
    xs = finite(diffs)
    ci = mean_ci(xs)
    if ci.n < 2:
        return SeedLevelResult(tuple(xs), ci.mean, math.nan, math.nan, math.nan, UNDECIDED)
    if ci.half_width == 0:  # every seed moved by exactly the same amount
        p = 1.0 if ci.mean == 0 else 0.0
    else:
        se = ci.half_width / t_quantile_975(ci.n - 1)
        p = t_two_sided_p(ci.mean / se, ci.n - 1)
    return SeedLevelResult(tuple(xs), ci.mean, ci.low, ci.high, p, verdict(ci.low, ci.high, higher_is_better))


# --- several comparisons at once -----------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order; nan entries stay nan and are not counted in the family.

    The k-th smallest of m p-values is multiplied by (m − k + 1), capped at 1, and
    never falls below the adjusted value of a smaller p: rejecting where the
    adjusted p < alpha keeps the chance of any false 'better'/'worse' in the family below alpha.
    """
    ps = [float(p) for p in p_values]
    tested = sorted((i for i, p in enumerate(ps) if math.isfinite(p)), key=lambda i: ps[i])
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, i in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * ps[i]))
        out[i] = running
    return out
