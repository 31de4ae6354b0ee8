"""Results over seeds: the summary statistics, the paired and Welch's t-tests and the confirmation's fresh seeds,
on numbers worked by hand."""
import math

import pytest

from cifar.noise import PAIRED, WELCH, Difference, confirmation_seeds, difference, seed_of, summarize, variant_of
from cifar.workspace import UserError


def test_a_summary_is_the_mean_the_sample_std_and_the_range():
    # 0.80, 0.82, 0.84: mean 0.82; deviations -0.02, 0, 0.02; squares summed 0.0008; / (3 - 1) = 0.0004
    summary = summarize([0.80, 0.82, 0.84])
    assert (summary.n, summary.low, summary.high) == (3, 0.80, 0.84)
    assert summary.mean == pytest.approx(0.82) and summary.std == pytest.approx(0.02)
    assert summary.percent() == "82.00 ± 2.00 % (n = 3, 80.00–84.00)"


def test_a_single_run_has_no_spread_and_says_n_1():
    summary = summarize([0.8154])
    assert summary.std is None and summary.percent() == "81.54 % (n = 1)"
    assert summarize([None, "!"]) is None and summarize([0.5, None]).n == 1  # missing values are left out


def two_sided_p(t, df):
    """The t distribution's two-sided tail by hand, in its closed forms: with sin θ = t / sqrt(df + t²),
    p = 1 - sin θ at df = 2, and p = 1 - sin θ (1 + cos² θ / 2) at df = 4."""
    sin = abs(t) / math.sqrt(df + t * t)
    return {2: 1 - sin, 4: 1 - sin * (1 + (1 - sin * sin) / 2)}[df]


def test_welch_s_t_test_on_two_seeds_a_side_needs_far_more_than_two_standard_errors():
    # 80, 82 against 85, 87: Δ = 5 points, s = 1.414 each, SE = sqrt(2 * 2 / 2) = 1.414, t = 3.54: |Δ| > 2 SE,
    # but with df = (2 + 2)² / (2² + 2²) = 2 the two-sided p is 1 - 3.54 / sqrt(2 + 12.5) = 0.0715: noise
    gain = difference(summarize([0.80, 0.82]), summarize([0.85, 0.87]))
    assert gain.delta == pytest.approx(0.05) and gain.se == pytest.approx(math.sqrt(0.0002))
    assert gain.t == pytest.approx(0.05 / math.sqrt(0.0002)) and gain.df == pytest.approx(2)
    assert gain.p == pytest.approx(two_sided_p(gain.t, 2)) and gain.p == pytest.approx(0.071523, abs=1e-6)
    assert gain.within_noise and gain.test == WELCH
    assert gain.points() == "+5.00 ± 1.41 (Welch's t-test: t = 3.54, df = 2.0, p = 0.072: within noise)"


def test_a_difference_is_real_at_p_below_0_05():
    # the three seeds of the study's recipe: 81.54, 82.33, 82.41 -> mean 82.0933, std 0.4809
    study = summarize([0.8154, 0.8233, 0.8241])
    assert study.std == pytest.approx(0.004809, abs=1e-6)
    # the same spread 0.5 and 1.0 points higher: SE = sqrt(2 * 0.4809² / 3) = 0.3927, df = 4 (equal spreads
    # and counts). t = 1.27: p = 0.272; t = 2.55: p = 0.064, noise too, although 1.0 > 2 SE = 0.785
    for shift, t, p in [(0.005, 1.2733, 0.2719), (0.010, 2.5465, 0.0635)]:
        gain = difference(study, summarize([v + shift for v in [0.8154, 0.8233, 0.8241]]))
        assert gain.se == pytest.approx(0.003927, abs=1e-6) and gain.df == pytest.approx(4)
        assert gain.t == pytest.approx(t, abs=1e-3) and gain.p == pytest.approx(two_sided_p(gain.t, 4))
        assert gain.p == pytest.approx(p, abs=1e-3) and gain.within_noise
    # 80, 81, 82 against 84, 85, 86: t = 4 / 0.8165 = 4.90, df = 4, p = 0.0081: real, and so is its negative
    gain = difference(summarize([0.80, 0.81, 0.82]), summarize([0.84, 0.85, 0.86]))
    assert gain.p == pytest.approx(two_sided_p(gain.t, 4)) and gain.p == pytest.approx(0.00805, abs=1e-5)
    assert not gain.within_noise and gain.test == WELCH
    assert gain.points() == "+4.00 ± 0.82 (Welch's t-test: t = 4.90, df = 4.0, p = 0.008: real)"
    back = difference(summarize([0.84, 0.85, 0.86]), summarize([0.80, 0.81, 0.82]))
    assert back.t == pytest.approx(-gain.t) and back.p == pytest.approx(gain.p) and not back.within_noise


def test_no_spread_on_either_side_leaves_the_noise_unknown():
    gain = difference(summarize([0.80, 0.80]), summarize([0.81, 0.81]))
    assert gain.se == 0 and gain.p is None and gain.within_noise is None
    assert gain.points() == "+1.00 ± 0.00 (no spread on either side: noise unknown)"


def test_welch_s_standard_error_weighs_each_side_by_its_own_runs():
    # s = 0.01 over 4 runs and s = 0.03 over 9: SE = sqrt(0.0001 / 4 + 0.0009 / 9) = sqrt(0.000125) = 0.01118
    a = summarize([0.49, 0.51, 0.49, 0.51])  # mean 0.50, std 0.011547 (n - 1)
    b = summarize([0.47, 0.53] * 4 + [0.50])  # mean 0.50, std 0.03
    assert a.std == pytest.approx(0.011547, abs=1e-6) and b.std == pytest.approx(0.03)
    assert difference(a, b).se == pytest.approx(math.sqrt(a.std ** 2 / 4 + 0.03 ** 2 / 9))


def test_with_one_run_on_either_side_the_noise_is_unknown():
    gain = difference(summarize([0.80]), summarize([0.81, 0.83]))
    assert gain.se is None and gain.within_noise is None
    assert gain.points() == "+2.00 (n = 1: noise unknown)"
    shown = Difference(-0.001, 0.01, -0.1, 3.0, 0.93).points()
    assert shown == "-0.10 ± 1.00 (Welch's t-test: t = -0.10, df = 3.0, p = 0.93: within noise)"


@pytest.mark.parametrize("name, variant", [("tuned-s2", "tuned"), ("ablation-4-ema-s10", "ablation-4-ema"),
                                           ("final", "final"), ("blocks-1111", "blocks-1111"),
                                           ("cpu-wd-1e-5-s0", "cpu-wd-1e-5"), ("x-sgd", "x-sgd")])
def test_the_sweep_s_seed_suffix_names_the_variant(name, variant):
    assert variant_of(name) == variant


@pytest.mark.parametrize("name, seed", [("tuned-s2", 2), ("tuned-s2@abc1234", 2), ("ablation-4-ema-s10", 10),
                                        ("final", None), ("final@abc1234", None), ("x-sgd", None)])
def test_the_sweep_s_seed_suffix_names_the_seed(name, seed):
    assert seed_of(name) == seed


def test_the_paired_t_test_where_both_ran_the_same_seeds_sees_what_welch_s_cannot():
    # seeds spread 80..84, but each seed's run gains 2.0, 2.1 and 1.9 points: d has mean 2, s_d = 0.1, SE = 0.1 /
    # sqrt(3) = 0.0577, t = 34.64 on df = 2: p = 1 - 34.64 / sqrt(2 + 1200) = 0.00083, real
    before, after = summarize([0.80, 0.82, 0.84], [0, 1, 2]), summarize([0.841, 0.82, 0.859], [1, 0, 2])
    gain = difference(before, after)
    assert gain.test == PAIRED and gain.delta == pytest.approx(0.02) and gain.se == pytest.approx(0.001 / math.sqrt(3))
    assert gain.t == pytest.approx(34.641, abs=1e-3) and gain.df == 2
    assert gain.p == pytest.approx(two_sided_p(gain.t, 2)) and gain.p == pytest.approx(0.000832, abs=1e-6)
    assert gain.points() == "+2.00 ± 0.06 (paired t-test: t = 34.64, df = 2.0, p = 0.00083: real)"
    assert difference(after, before).t == pytest.approx(-gain.t)
    # the same values without seeds: Welch's t-test, whose SE holds the seeds' spread, t = 1.24: within noise
    welch = difference(summarize([0.80, 0.82, 0.84]), summarize([0.82, 0.841, 0.859]))
    assert welch.test == WELCH and welch.t == pytest.approx(1.2396, abs=1e-4) and welch.within_noise


@pytest.mark.parametrize("before_seeds, after_seeds", [([0, 1, 2], [1, 2, 3]), ([0, 1, 2], None), (None, [0, 1, 2]),
                                                       ([0, 1, None], [0, 1, None]), ([0, 0, 1], [0, 0, 1])])
def test_runs_that_do_not_pair_up_by_seed_are_compared_by_welch_s_t_test(before_seeds, after_seeds):
    # other seeds, runs without one, or a seed twice: no pairs; the same numbers as Welch's own test above
    gain = difference(summarize([0.80, 0.81, 0.82], before_seeds), summarize([0.84, 0.85, 0.86], after_seeds))
    assert gain.test == WELCH and gain.df == pytest.approx(4) and gain.p == pytest.approx(0.00805, abs=1e-5)


def test_a_summary_keeps_each_value_with_its_seed_and_drops_a_missing_value_with_its_seed():
    assert summarize([0.80, None, 0.82], [0, 1, 2]).seeds() == {0: 0.80, 2: 0.82}
    assert summarize([0.80, 0.82], [0, None]).by_seed == () and summarize([0.80, 0.82]).by_seed == ()


def test_the_same_difference_at_every_seed_leaves_the_noise_unknown_even_through_rounding():
    # 0.11 - 0.10 and 0.31 - 0.30 differ in the 17th digit: the test would be that rounding's (t ~ 1e15, real)
    assert 0.11 - 0.10 != 0.31 - 0.30
    gain = difference(summarize([0.10, 0.30], [0, 1]), summarize([0.11, 0.31], [0, 1]))
    assert gain.test == PAIRED and gain.se == 0 and gain.p is None and gain.within_noise is None
    assert gain.points() == "+1.00 ± 0.00 (the same difference at every seed: noise unknown)"
    same = difference(summarize([0.80, 0.81], [0, 1]), summarize([0.80, 0.81], [0, 1]))  # tuned without its TTA
    assert same.delta == 0 and same.p is None


def test_one_pair_leaves_the_noise_unknown():
    gain = difference(summarize([0.80], [3]), summarize([0.83], [3]))
    assert gain.test == PAIRED and gain.se is None and gain.points() == "+3.00 (n = 1: noise unknown)"


def test_a_confirmation_never_runs_the_search_s_selected_trial_again():
    confirmation_seeds([1, 2, 3], {"tuned": 0})
    confirmation_seeds([0, 1, 2], {})  # no variant a search selected
    with pytest.raises(UserError) as refused:
        confirmation_seeds([0, 1, 2], {"tuned": 0})
    assert str(refused.value) == (
        "--seeds 0 1 2: tuned's run at seed 0 is its search's selected trial again (the search trained at "
        "train.seed 0): confirm it over seeds the search never trained, the same for every variant so that the "
        "runs pair up, e.g. --seeds 1 2 3")
    with pytest.raises(UserError, match=r"^--seeds 5 6: s-best's run at seed 5 is .*train.seed 5\): .* --seeds 6 7$"):
        confirmation_seeds([5, 6], {"tuned": 0, "s-best": 5})
