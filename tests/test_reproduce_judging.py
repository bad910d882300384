"""The judging rule of ``switchformer reproduce`` on hand-made numbers; its statistics against closed forms, printed
tables and (when installed) scipy."""

from __future__ import annotations

import math
import random

import pytest

from switchformer.reproduce import judging as J

# ------------------------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.3, 1.0, 2.5, 12.0])
def test_t_sf_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has sf(t) = 1/2 - t / (2 sqrt(2 + t^2))
    assert J.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert J.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize("t, df, p", [(2.919986, 2, 0.05), (2.131847, 4, 0.05), (2.776445, 4, 0.025),
                                      (1.812461, 10, 0.05), (2.763769, 10, 0.01), (1.644854, 1e7, 0.05)])
def test_t_sf_matches_printed_critical_values(t, df, p):
    assert J.t_sf(t, df) == pytest.approx(p, rel=1e-5)


@pytest.mark.parametrize("x", [0.1, 0.5, 1.0, 3.0, 20.0])
@pytest.mark.parametrize("d2", [2, 4, 9])
def test_f_sf_matches_closed_form_for_two_numerator_dof(x, d2):
    assert J.f_sf(x, 2, d2) == pytest.approx((1 + 2 * x / d2) ** (-d2 / 2), rel=1e-10)


@pytest.mark.parametrize("f, d1, d2, p", [(6.388233, 4, 4, 0.05), (4.102821, 2, 10, 0.05), (9.604530, 4, 4, 0.025)])
def test_f_sf_matches_printed_critical_values(f, d1, d2, p):
    assert J.f_sf(f, d1, d2) == pytest.approx(p, rel=1e-5)


def test_betainc_symmetry_and_edges():
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 5.0, 0.2), (7.5, 0.5, 0.9)]:
        assert J.betainc(a, b, x) + J.betainc(b, a, 1 - x) == pytest.approx(1.0, abs=1e-12)
    assert J.betainc(1.0, 1.0, 0.37) == pytest.approx(0.37)  # uniform
    assert J.betainc(2.0, 3.0, 0.0) == 0.0 and J.betainc(2.0, 3.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        J.betainc(0.0, 1.0, 0.5)


def test_paired_t_test_by_hand():
    a, b = [1.0, 2.0, 4.0], [0.0, 1.5, 2.0]  # d = 1, 0.5, 2: mean 7/6, sd sqrt(7/12)
    t, p = J.paired_t_test_greater(a, b)
    t_hand = (7 / 6) / (math.sqrt(7 / 12) / math.sqrt(3))
    assert t == pytest.approx(t_hand)
    assert p == pytest.approx(0.5 - t_hand / (2 * math.sqrt(2 + t_hand ** 2)))  # df = 2 closed form
    assert J.paired_t_test_greater([1, 1], [0, 0]) == (math.inf, 0.0)


def test_spearman_by_hand():
    assert J.spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert J.spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(5 * 4.5)
    assert J.spearman_rho([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert J.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert math.isnan(J.spearman_rho([1, 2, 3], [5, 5, 5]))


def test_pooled_std_by_hand():
    # groups (1, 3) and (2, 4, 6): SS 2 and 8 over 1 + 2 dof
    assert J.pooled_std([[1.0, 3.0], [2.0, 4.0, 6.0], [7.0]]) == pytest.approx(math.sqrt(10 / 3))
    assert J.pooled_std([[1.0], [2.0]]) is None


def test_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for n in (3, 5, 8):
        a = [rng.gauss(0, 1) for _ in range(n)]
        b = [x - 0.3 + rng.gauss(0, 0.5) for x in a]
        ref = stats.ttest_rel(a, b, alternative="greater")
        d = [x - y for x, y in zip(a, b, strict=True)]
        t = J.mean(d) / (J.sample_std(d) / math.sqrt(n))
        assert t == pytest.approx(ref.statistic) and J.t_sf(t, n - 1) == pytest.approx(ref.pvalue, rel=1e-9)
        assert J.spearman_rho(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
        assert J.f_sf(1.7, n - 1, n + 1) == pytest.approx(stats.f.sf(1.7, n - 1, n + 1), rel=1e-9)


# ------------------------------------------------------------------------------------------------ verdicts


def test_margin_rule():
    assert J.margin(0.01, 3) == pytest.approx(2 * 0.01 * math.sqrt(2 / 3))
    assert J.margin(0.001, 3) == pytest.approx(2 * 0.005 * math.sqrt(2 / 3))  # sigma floored at 0.005
    assert J.margin(None, 1) == pytest.approx(2 * 0.005 * math.sqrt(2))
    assert J.margin(0.005, 1000) == pytest.approx(0.005)  # the margin's own floor


def test_held_when_every_seed_agrees_and_the_gap_clears_the_margin():
    switch, dense = [-1.60, -1.61, -1.59], [-1.70, -1.69, -1.71]
    j = J.judge_better(switch, dense, sigma=0.01)
    assert j.verdict == J.HELD
    assert j.delta == pytest.approx(0.1) and j.n == 3 and j.signs_agree and j.p < 0.05


def test_not_resolved_below_the_margin_or_with_disagreeing_seeds():
    assert J.judge_better([-1.600, -1.601], [-1.602, -1.603], sigma=0.01).verdict == J.NOT_RESOLVED
    mixed = J.judge_better([-1.50, -1.50, -1.75], [-1.60, -1.60, -1.60], sigma=0.01)  # delta 0.05 > margin
    assert mixed.delta > mixed.margin and not mixed.signs_agree and mixed.verdict == J.NOT_RESOLVED


def test_three_seeds_also_need_a_significant_t_test():
    # all three differences positive and the mean above the margin, but so spread that p > 0.05
    j = J.judge_better([0.30, 0.011, 0.012], [0.0, 0.0, 0.0], sigma=0.005)
    assert j.delta > j.margin and j.signs_agree and j.p > 0.05
    assert j.verdict == J.NOT_RESOLVED


def test_reversed_beyond_the_margin():
    j = J.judge_better([-1.80], [-1.70], sigma=0.01)
    assert j.verdict == J.REVERSED and j.delta == pytest.approx(-0.1)


def test_equivalence_and_no_benefit():
    assert J.judge_equivalent([-1.716, -1.717], [-1.718, -1.716], sigma=0.01).verdict == J.HELD
    assert J.judge_equivalent([-1.60, -1.61], [-1.70, -1.71], sigma=0.01).verdict == J.REVERSED
    assert J.judge_no_benefit([-1.71, -1.69], [-1.70, -1.70], sigma=0.01).verdict == J.HELD
    assert J.judge_no_benefit([-1.80, -1.81], [-1.70, -1.70], sigma=0.01).verdict == J.HELD  # it hurts: no benefit
    assert J.judge_no_benefit([-1.60, -1.61], [-1.70, -1.70], sigma=0.01).verdict == J.REVERSED


def test_a_diverged_run_counts_as_the_worst_but_one_seed_does_not_decide():
    untrained = -8.3  # a diverged run keeps its untrained quality
    one = J.judge_better([-1.72, -1.75], [untrained, -1.73], sigma=0.01)  # the other seed goes the other way
    assert one.delta > 3 and one.verdict == J.NOT_RESOLVED
    assert J.judge_better([-1.72, -1.71], [untrained, untrained], sigma=0.01).verdict == J.HELD
    assert J.judge_better([untrained, untrained], [-1.72, -1.71], sigma=0.01).verdict == J.REVERSED


def test_sweeps():
    sigma = 0.01
    assert J.judge_sweep([1, 2, 4, 8], [-1.70, -1.68, -1.65, -1.60], sigma).verdict == J.HELD
    flat = J.judge_sweep([1, 2, 4, 8], [-1.700, -1.690, -1.695, -1.680], sigma)  # rho 0.8 but gap 0.02 < 3 sigma
    assert flat.rho == pytest.approx(0.8) and flat.verdict == J.NOT_RESOLVED
    assert J.judge_sweep([1, 2, 4, 8], [-1.60, -1.65, -1.68, -1.70], sigma).verdict == J.REVERSED
    saturating = J.judge_sweep([1, 2, 4, 8, 16], [-1.70, -1.62, -1.60, -1.63, -1.66], sigma)
    # y ranks (1, 4, 5, 3, 2): rho = 1 - 6 * 18 / (5 * 24) = 0.1
    assert saturating.rho == pytest.approx(0.1) and saturating.verdict == J.NOT_RESOLVED


def test_spread():
    narrow, wide = [-2.72, -2.71, -2.73, -2.72, -2.72], [-2.9, -3.6, -4.4, -2.8, -3.3]
    j = J.judge_spread(narrow, wide, sigma=0.01)
    assert j.verdict == J.HELD and j.details["wide_seeds_below_cut"] == 5
    assert J.judge_spread(narrow, [-2.71, -2.73, -2.72, -2.72, -2.715], sigma=0.01).verdict == J.NOT_RESOLVED
    assert J.judge_spread(wide, narrow, sigma=0.01).verdict == J.REVERSED
    assert J.judge_spread([-2.7], wide, sigma=0.01).verdict == J.NOT_RESOLVED
