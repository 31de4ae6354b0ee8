"""Results over seeds: a variant's mean ± standard deviation, and the test that tells a real difference from noise.

The test, named in every report that uses it: Welch's t-test (scipy.stats), two-sided, of the two variants'
runs over seeds: t = Δ / SE with SE = sqrt(s1²/n1 + s2²/n2) (s the sample standard deviations), on the
Welch–Satterthwaite degrees of freedom. A difference is real at p < 0.05. With 2 or 3 seeds a side the degrees
of freedom are few, and the t a difference needs is far above 2: 4.3 at df = 2, 12.7 at df = 1. With a single
run on either side there is no estimate of the noise, and the difference says so."""
import math
import re
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05
RULE = ("a difference is real when Welch's two-sided t-test over seeds gives p < 0.05 (t = Δ/SE, SE = √(s₁²/n₁ + "
        "s₂²/n₂), Welch–Satterthwaite degrees of freedom)")
# tools.sweep --seeds names: VARIANT-sK; tools.compare adds @COMMIT where the experiments span several commits
SEED_SUFFIX = re.compile(r"(?P<variant>.+)-s(?P<seed>\d+)(?P<commit>@[^@]+)?")


def variant_of(name):
    """The variant an experiment's name belongs to: 'tuned-s2' -> 'tuned', 'tuned-s2@abc1234' -> 'tuned@abc1234'
    (one commit's runs are never pooled with another's); a name without a seed is its own."""
    match = SEED_SUFFIX.fullmatch(name)
    return match["variant"] + (match["commit"] or "") if match else name


@dataclass(frozen=True)
class Summary:
    """One variant's values over its seeds (fractions, e.g. accuracies)."""
    n: int
    mean: float
    std: float | None  # the sample standard deviation (n - 1); None for a single run
    low: float
    high: float

    def percent(self):
        """'82.09 ± 0.48 % (n = 3, 81.54–82.41)', or '82.09 % (n = 1)' for a single run."""
        if self.std is None:
            return f"{100 * self.mean:.2f} % (n = 1)"
        return (f"{100 * self.mean:.2f} ± {100 * self.std:.2f} % (n = {self.n}, "
                f"{100 * self.low:.2f}–{100 * self.high:.2f})")


def summarize(values):
    """The Summary of the values that are numbers, or None when none is."""
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None
    n, mean = len(values), math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Summary(n, mean, std, min(values), max(values))


@dataclass(frozen=True)
class Difference:
    """after.mean - before.mean, with its standard error, Welch's t, degrees of freedom and p (None where either
    side has a single run, or where neither side varies)."""
    delta: float
    se: float | None
    t: float | None = None
    df: float | None = None
    p: float | None = None

    @property
    def within_noise(self):
        return None if self.p is None else self.p >= ALPHA

    def points(self):
        """'+0.75 ± 0.40 (t = 1.9, df = 3.8, p = 0.14: within noise)', '+1.03 ± 0.12 (t = 8.6, df = 3.7,
        p = 0.0013: real)' or '+0.60 (n = 1: noise unknown)', in points (± its standard error)."""
        delta = f"{100 * self.delta:+.2f}"
        if self.se is None:
            return f"{delta} (n = 1: noise unknown)"
        if self.p is None:
            return f"{delta} ± {100 * self.se:.2f} (no spread on either side: noise unknown)"
        verdict = "within noise" if self.within_noise else "real"
        return f"{delta} ± {100 * self.se:.2f} (t = {self.t:.2f}, df = {self.df:.1f}, p = {self.p:.2g}: {verdict})"


def difference(before, after):
    """The Difference of two Summaries' means, with Welch's t-test of it."""
    if before.std is None or after.std is None:
        return Difference(after.mean - before.mean, None)
    v1, v2 = before.std ** 2 / before.n, after.std ** 2 / after.n
    se = math.sqrt(v1 + v2)
    if se == 0:
        return Difference(after.mean - before.mean, se)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (before.n - 1) + v2 ** 2 / (after.n - 1))  # Welch–Satterthwaite
    test = stats.ttest_ind_from_stats(after.mean, after.std, after.n, before.mean, before.std, before.n,
                                      equal_var=False)
    return Difference(after.mean - before.mean, se, float(test.statistic), df, float(test.pvalue))
