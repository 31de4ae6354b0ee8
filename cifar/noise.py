"""Results over seeds: a variant's mean ± standard deviation, and the test that tells a real difference from noise.

The test, named in every difference it gives (two-sided, real at p < 0.05):
- the paired t-test (scipy.stats.ttest_rel) where the two variants ran the same seeds (tools.sweep --seeds):
  runs of one seed share their initialization, data order and augmentation, so that noise cancels in each
  seed's difference d; t = mean(d) / SE with SE = s_d / sqrt(n), on n - 1 degrees of freedom;
- Welch's t-test otherwise: t = Δ / SE with SE = sqrt(s1²/n1 + s2²/n2) (s the sample standard deviations), on
  the Welch–Satterthwaite degrees of freedom.
With 2 or 3 seeds the degrees of freedom are few, and the t a difference needs is far above 2: 4.3 at df = 2,
12.7 at df = 1. With a single run (or pair) there is no estimate of the noise, and the difference says so.

A search's selected trial is the best of many tries and flatters itself: a confirmation over seeds never runs
it again (confirmation_seeds)."""
import math
import re
from dataclasses import dataclass

from scipy import stats

from cifar.workspace import UserError

ALPHA = 0.05
PAIRED = "paired t-test"
WELCH = "Welch's t-test"
RULE = ("a difference is real when a two-sided t-test over seeds gives p < 0.05: the paired t-test where both "
        "variants ran the same seeds (t = mean(d)/SE, d each seed's difference, SE = s_d/√n, n − 1 degrees of "
        "freedom), else Welch's (t = Δ/SE, SE = √(s₁²/n₁ + s₂²/n₂), Welch–Satterthwaite degrees of freedom)")
# tools.sweep --seeds names: VARIANT-sK; tools.compare adds @COMMIT where the experiments span several commits
SEED_SUFFIX = re.compile(r"(?P<variant>.+)-s(?P<seed>\d+)(?P<commit>@[^@]+)?")


def variant_of(name):
    """The variant an experiment's name belongs to: 'tuned-s2' -> 'tuned', 'tuned-s2@abc1234' -> 'tuned@abc1234'
    (one commit's runs are never pooled with another's); a name without a seed is its own."""
    match = SEED_SUFFIX.fullmatch(name)
    return match["variant"] + (match["commit"] or "") if match else name


def seed_of(name):
    """The seed an experiment's name gives: 'tuned-s2' -> 2, 'tuned-s2@abc1234' -> 2; None for a name without."""
    match = SEED_SUFFIX.fullmatch(name)
    return int(match["seed"]) if match else None


@dataclass(frozen=True)
class Summary:
    """One variant's values over its seeds (fractions, e.g. accuracies)."""
    n: int
    mean: float
    std: float | None  # the sample standard deviation (n - 1); None for a single run
    low: float
    high: float
    by_seed: tuple = ()  # ((seed, value), ...) where every run named its own seed, else empty: what pairs up

    def seeds(self):
        return dict(self.by_seed)

    def percent(self):
        """'82.09 ± 0.48 % (n = 3, 81.54–82.41)', or '82.09 % (n = 1)' for a single run."""
        if self.std is None:
            return f"{100 * self.mean:.2f} % (n = 1)"
        return (f"{100 * self.mean:.2f} ± {100 * self.std:.2f} % (n = {self.n}, "
                f"{100 * self.low:.2f}–{100 * self.high:.2f})")


def summarize(values, seeds=None):
    """The Summary of the values that are numbers, or None when none is; `seeds`, one per value (None for a run
    without one), lets a difference pair the runs up by seed."""
    runs = [(seed, v) for seed, v in zip(seeds or [None] * len(values), values) if isinstance(v, (int, float))]
    if not runs:
        return None
    values = [v for _, v in runs]
    n, mean = len(values), math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    seeded = all(seed is not None for seed, _ in runs) and len({seed for seed, _ in runs}) == n
    return Summary(n, mean, std, min(values), max(values), tuple(runs) if seeded else ())


@dataclass(frozen=True)
class Difference:
    """after.mean - before.mean, with its standard error, t, degrees of freedom and p of `test` (None where a
    side has a single run, or where nothing varies)."""
    delta: float
    se: float | None
    t: float | None = None
    df: float | None = None
    p: float | None = None
    test: str = WELCH

    @property
    def within_noise(self):
        return None if self.p is None else self.p >= ALPHA

    def points(self):
        """'+0.75 ± 0.40 (Welch's t-test: t = 1.9, df = 3.8, p = 0.14: within noise)', '+1.61 ± 0.21 (paired
        t-test: t = 7.75, df = 2.0, p = 0.016: real)' or '+0.60 (n = 1: noise unknown)', in points (± its
        standard error)."""
        delta = f"{100 * self.delta:+.2f}"
        if self.se is None:
            return f"{delta} (n = 1: noise unknown)"
        if self.p is None:
            spread = "the same difference at every seed" if self.test == PAIRED else "no spread on either side"
            return f"{delta} ± {100 * self.se:.2f} ({spread}: noise unknown)"
        verdict = "within noise" if self.within_noise else "real"
        return (f"{delta} ± {100 * self.se:.2f} ({self.test}: t = {self.t:.2f}, df = {self.df:.1f}, "
                f"p = {self.p:.2g}: {verdict})")


def difference(before, after):
    """The Difference of two Summaries' means: the paired t-test where both ran the same seeds, else Welch's."""
    if before.by_seed and before.seeds().keys() == after.seeds().keys():
        return paired_difference(before.seeds(), after.seeds())
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


def paired_difference(before, after):
    """The paired t-test of two {seed: value} of the same seeds: each seed's difference is one sample."""
    seeds = list(before)
    d = [after[s] - before[s] for s in seeds]
    n, delta = len(d), math.fsum(d) / len(d)
    if n == 1:
        return Difference(delta, None, test=PAIRED)
    se = math.sqrt(math.fsum((x - delta) ** 2 for x in d) / (n - 1) / n)
    # the same difference at every seed, up to rounding: t would be that rounding's, not the noise's
    if math.isclose(max(d), min(d), rel_tol=1e-9, abs_tol=1e-12):
        return Difference(delta, 0.0, test=PAIRED)
    test = stats.ttest_rel([after[s] for s in seeds], [before[s] for s in seeds])
    return Difference(delta, se, float(test.statistic), n - 1, float(test.pvalue), PAIRED)


def confirmation_seeds(seeds, searched):
    """A one-line error where a confirmation over `seeds` would run a search's selected trial again: `searched`
    is {variant: the train.seed its search's trials trained at} of the variants queued that a search selected.
    That seed's run repeats the selected trial (bit for bit on a CPU), the best of many tries, which flatters
    itself: a confirmation measures the variant afresh, at seeds the search never trained."""
    reused = {name: seed for name, seed in searched.items() if seed in seeds}
    if reused:
        after = max(reused.values()) + 1
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: " + ", ".join(
            f"{name}'s run at seed {seed} is its search's selected trial again (the search trained at train.seed "
            f"{seed})" for name, seed in reused.items()) + ": confirm it over seeds the search never trained, the "
            f"same for every variant so that the runs pair up, e.g. --seeds "
            f"{' '.join(map(str, range(after, after + len(seeds))))}")
