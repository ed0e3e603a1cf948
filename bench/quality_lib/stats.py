"""Paired statistics over seeds × tasks: mean ± std, and the paired difference to the flat arm with a 95% interval."""

from __future__ import annotations

import math
import random
import statistics

from scipy.stats import t as student_t


def t975(df: int) -> float:
    """The two-sided 95% Student-t quantile for `df` degrees of freedom."""
    return float(student_t.ppf(0.975, df))


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired(diffs: list[float], boot: int = 10_000, seed: int = 0) -> dict:
    """Mean paired difference with a t interval and a percentile bootstrap interval (both 95%).

    With one pair no interval exists; both ends are then reported as None and the verdict says so.
    """
    n = len(diffs)
    mean = statistics.fmean(diffs)
    out = {"mean": mean, "n": n, "ci95_t": None, "ci95_boot": None}
    if n < 2:
        return out
    sd = statistics.stdev(diffs)
    half = t975(n - 1) * sd / math.sqrt(n)
    out["ci95_t"] = [mean - half, mean + half]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(boot))
    out["ci95_boot"] = [means[int(0.025 * boot)], means[int(0.975 * boot) - 1]]
    return out


def ratio_of_means(numerator: list[float], denominator: list[float], boot: int = 10_000, seed: int = 0) -> dict:
    """mean(numerator) / mean(denominator) over paired cells, with a 95% percentile bootstrap interval.

    The cells are resampled together, so the interval carries the noise of both means and their correlation
    (the share of the oracle's gain: an arm's gain over flat against the oracle's, cell by cell). Resamples
    whose denominator mean is 0 are skipped; with fewer than two cells there is no interval.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("ratio_of_means needs the same, non-zero number of values on both sides.")
    n = len(numerator)
    den = statistics.fmean(denominator)
    out = {"ratio": statistics.fmean(numerator) / den if den else None, "n": n, "ci95_boot": None}
    if n < 2:
        return out
    rng = random.Random(seed)
    ratios = []
    for _ in range(boot):
        picks = [rng.randrange(n) for _ in range(n)]
        d = statistics.fmean(denominator[i] for i in picks)
        if d:
            ratios.append(statistics.fmean(numerator[i] for i in picks) / d)
    ratios.sort()
    if ratios:
        out["ci95_boot"] = [ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]]
    return out


def verdict(name: str, other: str, metric: str, stat: dict, lower_is_better: bool = True) -> str:
    """One honest sentence: significant only when the t interval excludes 0."""
    mean = stat["mean"]
    ci = stat["ci95_t"]
    if ci is None:
        return f"{name} vs {other}, {metric}: diff {mean:+.5f} from a single pair: no interval, no conclusion."
    span = f"diff {mean:+.5f}, 95% CI [{ci[0]:+.5f}, {ci[1]:+.5f}], n={stat['n']}"
    if ci[0] <= 0.0 <= ci[1]:
        return f"{name} vs {other}, {metric}: {span}: no significant difference."
    better = (ci[1] < 0) == lower_is_better
    return f"{name} vs {other}, {metric}: {span}: significantly {'better' if better else 'worse'} than {other}."
