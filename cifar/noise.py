"""Results over seeds: a variant's mean ± standard deviation, and the rule that tells a real difference from noise.

The rule, named in every report that uses it: a difference of two variants' means is within noise when it is
smaller than twice its standard error, SE = sqrt(s1²/n1 + s2²/n2) (Welch's, s the sample standard deviations
over seeds): for normal noise, about a two-sided test at the 5 % level. With a single run on either side there
is no estimate of the noise, and the difference says so."""
import math
import re
from dataclasses import dataclass

RULE = "a difference is within noise when |Δ| < 2·SE, SE = √(s₁²/n₁ + s₂²/n₂) over seeds"
SEED_SUFFIX = re.compile(r"(?P<variant>.+)-s(?P<seed>\d+)")  # tools.sweep --seeds names: VARIANT-sK


def variant_of(name):
    """The variant an experiment's name belongs to: 'tuned-s2' -> 'tuned'; a name without a seed is its own."""
    match = SEED_SUFFIX.fullmatch(name)
    return match["variant"] if match else name


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
    """after.mean - before.mean, with its standard error (None where either side has a single run)."""
    delta: float
    se: float | None

    @property
    def within_noise(self):
        return None if self.se is None else abs(self.delta) < 2 * self.se

    def points(self):
        """'+0.75 ± 0.40 (real)', '-0.10 ± 0.30 (within noise)' or '+0.60 (n = 1: noise unknown)', in points."""
        delta = f"{100 * self.delta:+.2f}"
        if self.se is None:
            return f"{delta} (n = 1: noise unknown)"
        return f"{delta} ± {100 * self.se:.2f} ({'within noise' if self.within_noise else 'real'})"


def difference(before, after):
    """The Difference of two Summaries' means."""
    se = None if before.std is None or after.std is None else math.sqrt(
        before.std ** 2 / before.n + after.std ** 2 / after.n)
    return Difference(after.mean - before.mean, se)
