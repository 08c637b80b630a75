"""The statistics of a comparison's paired differences (row minus control, seed by seed): mean, standard error,
the paired t test's 95% interval and p value, Holm's adjustment over a study's many comparisons, and the seeds a
paired t test would need for 80% power."""
import math

import numpy as np


ALPHA, POWER = 0.05, 0.8  # two-sided paired t tests at 5%; the seeds for 80% power


MAX_SEEDS = 100_000  # "seeds for 80% power" beyond this reads "> 100,000"


def meanStd(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def pairedDifference(row, control):
    """row's final validation value minus control's, seed by seed over the seeds both finished: {'seeds', 'deltas',
    'mean', 'sd' (sample std), 'se' (sd / sqrt(n)), 'ci' (the paired t test's 95% interval, mean ± t(0.975, n-1)
    se), 'p' (its two-sided p value), 'seedsFor80' (seedsForPower), 'won' (seeds where row's value is lower)}; sd,
    se, ci, p and seedsFor80 None for one seed; None when they share no finished seed."""
    from scipy import stats

    seeds = sorted(set(row["seedValue"]) & set(control["seedValue"]))
    if not seeds:
        return None
    deltas = np.array([row["seedValue"][s] - control["seedValue"][s] for s in seeds])
    n, mean = len(deltas), float(deltas.mean())
    paired = {"seeds": seeds, "deltas": deltas.tolist(), "mean": mean, "sd": None, "se": None, "ci": None, "p": None,
              "seedsFor80": None, "won": int((deltas < 0).sum())}
    if n > 1:
        sd = float(deltas.std(ddof=1))
        se = sd / math.sqrt(n)
        half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * se
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1)) if se > 0 else float(mean == 0)
        paired.update(sd=sd, se=se, ci=(mean - half, mean + half), p=p, seedsFor80=seedsForPower(mean, sd))
    return paired


def tTestPower(n, effect):
    """Power of the two-sided paired t test at ALPHA with n seeds when the true mean difference is `effect` standard
    deviations: P(|T| > t(1 - ALPHA/2, n-1)) for T noncentral t with n-1 degrees of freedom and noncentrality
    effect * sqrt(n)."""
    from scipy import stats

    critical = stats.t.ppf(1 - ALPHA / 2, n - 1)
    shift = effect * math.sqrt(n)
    return float(stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(-critical, n - 1, shift))


def seedsForPower(mean, sd):
    """The fewest seeds (>= 2) at which the two-sided paired t test at 5% has 80% power, if the true mean difference
    and its spread were the observed ones; None beyond MAX_SEEDS (or for a mean of 0)."""
    if sd == 0:
        return 2 if mean != 0 else None
    effect = abs(mean) / sd
    if effect == 0 or tTestPower(MAX_SEEDS, effect) < POWER:
        return None
    low, high = 1, 2  # power grows with n: double until it is reached, then bisect
    while tTestPower(high, effect) < POWER:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if tTestPower(middle, effect) < POWER else (low, middle)
    return high


def holmAdjusted(pValues):
    """Holm's step-down adjustment of the p values (None stays None) for testing them all at once: the k-th smallest
    of m becomes max over j <= k of min(1, (m - j + 1) p_(j))."""
    present = sorted((p, i) for i, p in enumerate(pValues) if p is not None)
    adjusted, running = [None] * len(pValues), 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted
