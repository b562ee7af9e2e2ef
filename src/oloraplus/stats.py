"""Statistics for the study report: mean ± 95% CI over seeds and a paired bootstrap over test examples.

Seeds tell how much a method's score moves with the training randomness; the
paired bootstrap tells whether the gap between two methods on the SAME test
examples is larger than what the choice of test examples alone would produce.
Everything here is pure (numbers in, numbers out) so it can be tested exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from oloraplus.scoring import bleu_from_statistics

# Two-sided 95% Student t quantiles (t_{0.975, df}) for df = 1..30; beyond that a
# Cornish-Fisher expansion around the normal quantile is accurate to ~1e-4.
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
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


@dataclass(frozen=True)
class BootstrapResult:
    """Observed difference (method − baseline), its 95% percentile CI and the plain-words verdict."""

    diff: float
    low: float
    high: float
    verdict: str
    n_examples: int
    n_resamples: int


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """'better' / 'worse' when the CI of (method − baseline) excludes 0, else 'not distinguishable'."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
        return UNDECIDED
    improved = low > 0 if higher_is_better else high < 0
    return BETTER if improved else WORSE


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


def _percentile_result(observed: float, boot: np.ndarray, higher_is_better: bool, n: int) -> BootstrapResult:
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return BootstrapResult(observed, low, high, verdict(low, high, higher_is_better), n, len(boot))


def _undecidable(n: int) -> BootstrapResult:
    return BootstrapResult(math.nan, math.nan, math.nan, UNDECIDED, n, 0)


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
    return _percentile_result(float(d.mean()), boot, higher_is_better, n)


def _mean_corpus_bleu(stats: np.ndarray, weights: np.ndarray, bleu: Callable[[list[list[int]]], float]) -> np.ndarray:
    """Per resample, corpus BLEU of each seed from its summed statistics, averaged over seeds."""
    # stats: (seeds, examples, 10); weights: (resamples, examples) -> summed: (seeds, resamples, 10)
    summed = np.rint(np.einsum("re,sek->srk", weights, stats)).astype(np.int64)
    scores = [[bleu([row.tolist()]) for row in per_seed] for per_seed in summed]
    return np.asarray(scores, dtype=np.float64).mean(axis=0)


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
    observed = float(_mean_corpus_bleu(x, full, bleu)[0] - _mean_corpus_bleu(b, full, bleu)[0])
    boot = np.concatenate(
        [_mean_corpus_bleu(x, w, bleu) - _mean_corpus_bleu(b, w, bleu) for w in resample_weights(n, n_resamples, seed)]
    )
    return _percentile_result(observed, boot, True, n)
