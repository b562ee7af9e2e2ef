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


# --- Student's t without scipy ------------------------------------------------------------------------------------


def test_t_distribution_matches_closed_forms_and_published_values():
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert stats.t_cdf(-1.5, 7) == pytest.approx(0.0886492, abs=1e-6)  # R: pt(-1.5, 7)
    assert stats.t_two_sided_p(2.0, 10) == pytest.approx(0.0733880, abs=1e-6)  # R: 2 * pt(-2, 10)
    assert stats.t_two_sided_p(1.959964, 10**5) == pytest.approx(0.05, abs=1e-4)  # the normal limit
    assert stats.t_two_sided_p(math.inf, 3) == 0.0 and stats.t_two_sided_p(0.0, 3) == pytest.approx(1.0)


def test_t_quantile_table_is_the_inverse_of_the_t_distribution():
    for df in range(1, 31):
        assert stats.t_cdf(stats.t_quantile_975(df), df) == pytest.approx(0.975, abs=5e-6), df


# --- seed level ---------------------------------------------------------------------------------------------------


def test_seed_level_against_hand_computed_t_test():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) on 2 df; two-sided p = 1 - t / sqrt(2 + t^2)
    res = stats.seed_level([1.0, 2.0, 3.0], higher_is_better=True)
    t = 2 * math.sqrt(3)
    assert res.mean == pytest.approx(2.0) and res.n_seeds == 3
    assert (res.low, res.high) == pytest.approx((2.0 - 4.3027 / math.sqrt(3), 2.0 + 4.3027 / math.sqrt(3)), rel=1e-4)
    assert res.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert res.verdict == UNDECIDED  # [-0.48, 4.48] holds 0: p > 0.05 says the same
    shifted = stats.seed_level([2.0, 3.0, 4.0], higher_is_better=False)  # [0.52, 5.48]: a loss that rose
    assert shifted.verdict == WORSE and shifted.p_value < 0.05


def test_seed_level_with_one_seed_or_none_has_no_interval():
    one = stats.seed_level([0.3], higher_is_better=True)
    assert one.n_seeds == 1 and one.mean == 0.3 and one.verdict == UNDECIDED
    assert math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.p_value)
    assert stats.seed_level([], True).n_seeds == 0
    same = stats.seed_level([0.2, 0.2], higher_is_better=True)  # no spread: every seed moved by exactly 0.2
    assert (same.low, same.high, same.p_value, same.verdict) == (0.2, 0.2, 0.0, BETTER)


def test_seed_level_interval_can_hold_zero_where_the_example_level_does_not():
    """Two seeds that disagree: each one's gap is sure over its examples, their mean is not sure over seeds."""
    rng = np.random.default_rng(6)
    base = rng.normal(size=(2, 300))
    method = base + np.array([[0.5], [-0.1]]) + rng.normal(scale=0.05, size=(2, 300))
    examples = stats.paired_bootstrap(method, base, higher_is_better=True, n_resamples=500)
    assert examples.verdict == BETTER and examples.low > 0 and examples.p_value < 0.01
    assert examples.seed_diffs == pytest.approx((0.5, -0.1), abs=0.02)  # per seed, the same examples
    seeds = stats.seed_level(examples.seed_diffs, higher_is_better=True)
    assert seeds.mean == pytest.approx(examples.diff, rel=1e-12)  # one point estimate, two intervals
    assert seeds.low < 0 < seeds.high and seeds.verdict == UNDECIDED and seeds.p_value > 0.05


# --- Holm's correction ----------------------------------------------------------------------------------------------


def test_holm_adjusts_by_rank_keeps_order_and_skips_missing_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> made monotone: 0.06 for the last
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[4])  # not computed: not in the family, and m stays 4
    assert stats.holm([0.2, 0.6]) == pytest.approx([0.4, 0.6])
    assert stats.holm([0.9, 0.3]) == pytest.approx([0.9, 0.6])
    assert stats.holm([0.8, 0.7]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([0.04]) == [0.04] and stats.holm([]) == []
    raw = [0.001, 0.2, 0.013, 0.04, 0.5, 0.011]
    adj = stats.holm(raw)
    assert all(a >= r for a, r in zip(adj, raw))  # never below the raw p-value
    order = sorted(range(len(raw)), key=raw.__getitem__)
    assert [adj[i] for i in order] == sorted(adj)  # a smaller raw p never gets a larger adjusted p
    assert stats.holm([raw[i] for i in order]) == pytest.approx([adj[i] for i in order])  # input order is irrelevant


def test_verdict_from_p_uses_the_sign_and_the_threshold():
    assert stats.verdict_from_p(-0.1, 0.01, higher_is_better=False) == BETTER
    assert stats.verdict_from_p(-0.1, 0.01, higher_is_better=True) == WORSE
    assert stats.verdict_from_p(0.3, 0.05, higher_is_better=True) == UNDECIDED  # p must be below 0.05
    assert stats.verdict_from_p(0.3, math.nan, higher_is_better=True) == UNDECIDED


# --- bootstrap p-values and the token-weighted loss ------------------------------------------------------------------


def test_bootstrap_p_value_is_smallest_for_an_exact_shift_and_one_for_no_difference():
    base = np.random.default_rng(7).normal(size=100)
    shift = stats.paired_bootstrap(base + 1.0, base, True, n_resamples=999)
    assert shift.p_value == pytest.approx(2 / 1000)  # no resample at or below 0: the +1-smoothed floor
    same = stats.paired_bootstrap(base, base.copy(), True, n_resamples=999)
    assert same.p_value == 1.0
    assert stats.bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(2 * 2 / 5)


def test_ratio_bootstrap_weights_examples_by_tokens_where_a_plain_mean_gets_the_sign_wrong():
    # example 0: 1 token, the method much better; example 1: 99 tokens, the method slightly worse
    base_loss, method_loss, tokens = [10.0, 1.0], [9.0, 1.1], [1, 99]
    base_sum = [loss * n for loss, n in zip(base_loss, tokens)]
    method_sum = [loss * n for loss, n in zip(method_loss, tokens)]
    res = stats.paired_bootstrap_ratio(method_sum, tokens, base_sum, tokens, False, n_resamples=300)
    weighted = sum(method_sum) / sum(tokens) - sum(base_sum) / sum(tokens)  # 1.179 - 1.09 = +0.089: worse
    plain = sum(m - b for m, b in zip(method_loss, base_loss)) / 2  # -0.45: would read as better
    assert res.diff == pytest.approx(weighted, rel=1e-12) and weighted > 0 > plain
    assert res.seed_diffs == pytest.approx((weighted,))


def test_ratio_bootstrap_takes_each_runs_own_token_counts_and_averages_seeds():
    rng = np.random.default_rng(8)
    n_tok = rng.integers(1, 40, size=(2, 30)).astype(float)  # per run: the counts differ between runs too
    b_tok = rng.integers(1, 40, size=(2, 30)).astype(float)
    x_sum, b_sum = rng.uniform(0.5, 3, size=(2, 30)) * n_tok, rng.uniform(0.5, 3, size=(2, 30)) * b_tok
    res = stats.paired_bootstrap_ratio(x_sum, n_tok, b_sum, b_tok, False, n_resamples=200, seed=3)
    per_seed = x_sum.sum(axis=1) / n_tok.sum(axis=1) - b_sum.sum(axis=1) / b_tok.sum(axis=1)
    assert res.seed_diffs == pytest.approx(tuple(per_seed), rel=1e-12)
    assert res.diff == pytest.approx(per_seed.mean(), rel=1e-12)
    assert res.low <= res.diff <= res.high and res.n_resamples == 200
    again = stats.paired_bootstrap_ratio(x_sum, n_tok, b_sum, b_tok, False, n_resamples=200, seed=3)
    assert again == res
    assert math.isnan(stats.paired_bootstrap_ratio([1.0], [0.0], [1.0], [1.0], False).diff)  # no token: no ratio
    with pytest.raises(ValueError):
        stats.paired_bootstrap_ratio(x_sum, n_tok[:, :5], b_sum, b_tok, False)


def test_bleu_bootstrap_reports_each_seeds_corpus_bleu_difference(bleu_tools):
    bleu_statistics, bleu_from_statistics = bleu_tools
    good, bad = bleu_statistics(GOOD, REFS), bleu_statistics(BAD, REFS)
    res = stats.paired_bootstrap_bleu([good, bad], [bad, good], n_resamples=50)
    gap = bleu_from_statistics(good) - bleu_from_statistics(bad)
    assert res.seed_diffs == pytest.approx((gap, -gap))
    assert stats.paired_bootstrap_bleu([good, bad], [bad], n_resamples=50).seed_diffs == ()  # seeds do not pair
