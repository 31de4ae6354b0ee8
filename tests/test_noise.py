"""Results over seeds: the summary statistics and the noise rule, on numbers worked by hand."""
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


def test_a_difference_within_twice_its_standard_error_is_noise():
    # the three seeds of the study's recipe: 81.54, 82.33, 82.41 -> mean 82.0933, std 0.4809
    study = summarize([0.8154, 0.8233, 0.8241])
    assert study.std == pytest.approx(0.004809, abs=1e-6)
    # a variant 0.5 points better with the same spread: SE = sqrt(2 * 0.4809² / 3) = 0.3927; 2 SE = 0.785 > 0.5
    close = summarize([0.8204, 0.8283, 0.8291])
    gain = difference(study, close)
    assert gain.delta == pytest.approx(0.005) and gain.se == pytest.approx(0.003927, abs=1e-6)
    assert gain.within_noise and gain.points() == "+0.50 ± 0.39 (within noise)"
    # 1 point better: 1.0 > 0.785, a real difference
    far = summarize([0.8254, 0.8333, 0.8341])
    assert not difference(study, far).within_noise
    assert difference(far, study).points() == "-1.00 ± 0.39 (real)"


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
    assert Difference(-0.001, 0.01).points() == "-0.10 ± 1.00 (within noise)"


@pytest.mark.parametrize("name, variant", [("tuned-s2", "tuned"), ("ablation-4-ema-s10", "ablation-4-ema"),
                                           ("final", "final"), ("blocks-1111", "blocks-1111"),
                                           ("cpu-wd-1e-5-s0", "cpu-wd-1e-5"), ("x-sgd", "x-sgd")])
def test_the_sweep_s_seed_suffix_names_the_variant(name, variant):
    assert variant_of(name) == variant
