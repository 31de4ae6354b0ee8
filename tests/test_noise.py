"""Results over seeds: the summary statistics and Welch's t-test, on numbers worked by hand."""
import math

import pytest

from cifar.noise import Difference, difference, summarize, variant_of


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
    assert gain.within_noise and gain.points() == "+5.00 ± 1.41 (t = 3.54, df = 2.0, p = 0.072: within noise)"


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
    assert not gain.within_noise and gain.points() == "+4.00 ± 0.82 (t = 4.90, df = 4.0, p = 0.008: real)"
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
    assert shown == "-0.10 ± 1.00 (t = -0.10, df = 3.0, p = 0.93: within noise)"


@pytest.mark.parametrize("name, variant", [("tuned-s2", "tuned"), ("ablation-4-ema-s10", "ablation-4-ema"),
                                           ("final", "final"), ("blocks-1111", "blocks-1111"),
                                           ("cpu-wd-1e-5-s0", "cpu-wd-1e-5"), ("x-sgd", "x-sgd")])
def test_the_sweep_s_seed_suffix_names_the_variant(name, variant):
    assert variant_of(name) == variant
