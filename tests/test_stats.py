"""Statistics with known answers: t intervals, paired bootstrap, corpus-BLEU bootstrap."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_REFS

from oloraplus import stats
from oloraplus.stats import BETTER, UNDECIDED, WORSE


def test_t_quantiles_match_tables_and_large_df_approximation():
    assert stats.t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert stats.t_quantile_975(40) == pytest.approx(2.0211, abs=1e-3)  # beyond the table
    assert stats.t_quantile_975(120) == pytest.approx(1.9799, abs=1e-3)
    assert stats.t_quantile_975(10**6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        stats.t_quantile_975(0)


def test_mean_ci_against_hand_computed_value():
    # values 1, 2, 3: mean 2, sample sd 1, t(0.975, 2) = 4.3027 -> half-width 4.3027 / sqrt(3)
    ci = stats.mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == pytest.approx(2.0)
    assert ci.half_width == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert (ci.low, ci.high) == pytest.approx((2.0 - 2.48417, 2.0 + 2.48417), abs=1e-4)
    assert ci.n == 3
    assert stats.format_mean_ci(ci, 2) == "2.00 ± 2.48"


def test_mean_ci_single_seed_and_missing_values():
    one = stats.mean_ci([0.5, None, float("nan")])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.half_width)
    assert stats.format_mean_ci(one, 3) == "0.500 (n=1)"
    none = stats.mean_ci([])
    assert none.n == 0 and stats.format_mean_ci(none) == "—"


def test_verdict_directions():
    assert stats.verdict(0.1, 0.3, higher_is_better=True) == BETTER
    assert stats.verdict(0.1, 0.3, higher_is_better=False) == WORSE
    assert stats.verdict(-0.3, -0.1, higher_is_better=False) == BETTER
    assert stats.verdict(-0.1, 0.3, higher_is_better=True) == UNDECIDED
    assert stats.verdict(0.0, 0.0, higher_is_better=True) == UNDECIDED
    assert stats.verdict(math.nan, math.nan, higher_is_better=True) == UNDECIDED


def test_resample_weights_are_counts_of_n_draws():
    chunks = list(stats.resample_weights(7, 600, seed=3, chunk=256))
    assert [c.shape for c in chunks] == [(256, 7), (256, 7), (88, 7)]
    assert all(np.all(c.sum(axis=1) == 7) for c in chunks)


def test_bootstrap_exact_shift_has_zero_width_interval():
    base = np.random.default_rng(0).normal(size=200)
    up = stats.paired_bootstrap(base + 1.0, base, higher_is_better=True)
    assert up.diff == pytest.approx(1.0)
    assert (up.low, up.high) == pytest.approx((1.0, 1.0))
    assert up.verdict == BETTER and up.n_examples == 200 and up.n_resamples == stats.DEFAULT_RESAMPLES
    # the same shift on a loss (lower is better) is a worse method
    assert stats.paired_bootstrap(base + 1.0, base, higher_is_better=False).verdict == WORSE


def test_bootstrap_identical_is_not_distinguishable():
    base = np.random.default_rng(1).normal(size=50)
    res = stats.paired_bootstrap(base, base.copy(), higher_is_better=True)
    assert res.diff == 0 and res.low == 0 and res.high == 0
    assert res.verdict == UNDECIDED


def test_bootstrap_detects_large_noisy_shift_and_not_zero_mean_noise():
    rng = np.random.default_rng(2)
    base = rng.normal(size=300)
    shifted = stats.paired_bootstrap(base - 0.5 + rng.normal(scale=0.5, size=300), base, higher_is_better=False)
    assert shifted.verdict == BETTER and shifted.high < 0 and shifted.low < shifted.diff < shifted.high
    noise = rng.normal(size=150)
    zero_mean = stats.paired_bootstrap(base + np.concatenate([noise, -noise]), base, higher_is_better=True)
    assert zero_mean.diff == pytest.approx(0.0, abs=1e-12)
    assert zero_mean.low < 0 < zero_mean.high and zero_mean.verdict == UNDECIDED


def test_bootstrap_pools_seeds_per_example_and_is_reproducible():
    base = np.random.default_rng(4).normal(size=(2, 40))
    method = np.stack([base[0] + 1.0, base[1] + 3.0])  # paired by seed: mean shift 2
    res = stats.paired_bootstrap(method, base, higher_is_better=True, n_resamples=300, seed=9)
    assert res.diff == pytest.approx(2.0) and res.low == pytest.approx(2.0) and res.high == pytest.approx(2.0)
    noisy = np.random.default_rng(5).normal(size=40)
    a = stats.paired_bootstrap(noisy, np.zeros(40), True, n_resamples=300, seed=9)
    b = stats.paired_bootstrap(noisy, np.zeros(40), True, n_resamples=300, seed=9)
    assert a == b
    with pytest.raises(ValueError):
        stats.paired_bootstrap(np.zeros(3), np.zeros(4), True)


REFS = SAMPLE_REFS
GOOD = [r.replace("the", "a", 1) for r in REFS]  # close to the references
BAD = [" ".join(r.split()[:3]) + " something else entirely" for r in REFS]


@pytest.fixture(scope="module")
def bleu_tools():
    from oloraplus.scoring import bleu_from_statistics, bleu_statistics

    return bleu_statistics, bleu_from_statistics


def test_bleu_bootstrap_observed_difference_is_corpus_bleu_difference(bleu_tools):
    bleu_statistics, bleu_from_statistics = bleu_tools
    good, bad = bleu_statistics(GOOD, REFS), bleu_statistics(BAD, REFS)
    res = stats.paired_bootstrap_bleu(good, bad, n_resamples=400, seed=0)
    expected = bleu_from_statistics(good) - bleu_from_statistics(bad)
    assert res.diff == pytest.approx(expected)
    assert res.low <= res.diff <= res.high
    assert res.verdict == BETTER
    assert stats.paired_bootstrap_bleu(bad, good, n_resamples=400).verdict == WORSE


def test_bleu_bootstrap_identical_and_pooled_seeds(bleu_tools):
    bleu_statistics, bleu_from_statistics = bleu_tools
    good, bad = bleu_statistics(GOOD, REFS), bleu_statistics(BAD, REFS)
    same = stats.paired_bootstrap_bleu(good, good, n_resamples=200)
    assert (same.diff, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, UNDECIDED)
    # two seeds each: the observed value is the seed-averaged corpus BLEU difference
    pooled = stats.paired_bootstrap_bleu([good, bad], [bad, bad], n_resamples=200)
    expected = (bleu_from_statistics(good) + bleu_from_statistics(bad)) / 2 - bleu_from_statistics(bad)
    assert pooled.diff == pytest.approx(expected)


def test_bleu_bootstrap_uses_summed_statistics_of_the_drawn_examples():
    seen: list[list[list[int]]] = []

    def fake_bleu(stats_list):
        seen.append(stats_list)
        return float(sum(stats_list[0]))

    rows = [[1] * 10, [2] * 10, [3] * 10]
    res = stats.paired_bootstrap_bleu(rows, [[0] * 10] * 3, n_resamples=50, bleu=fake_bleu)
    assert res.diff == pytest.approx(60.0)  # summed over all three examples: (1+2+3) * 10
    assert all(len(s) == 1 and len(s[0]) == 10 for s in seen)  # one summed row per call
    assert 30.0 <= res.low <= res.high <= 90.0  # between all-ones and all-threes resamples


def test_importing_stats_loads_no_torch():
    """The report's statistics (and its BLEU bootstrap) are numbers in, numbers out: no torch behind them."""
    env = {**os.environ, "PYTHONPATH": str(Path(stats.__file__).parents[1])}
    code = (
        "import sys, oloraplus.stats as s; s.paired_bootstrap_bleu([[2, 1, 1, 1, 2, 1, 1, 1, 2, 2]] * 3, "
        "[[1, 1, 1, 1, 2, 1, 1, 1, 2, 2]] * 3, n_resamples=5); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "False"
