"""Per-volume statistics of a study: mean ± std over test volumes, paired differences with 95% CIs.

A comparison ``a - b`` is made on the *same* test volumes: ``d_i = m_a(i) - m_b(i)``. Two
intervals for the mean difference are reported:

- **paired t** (the primary one): ``mean(d) ± t_{1-alpha/2, n-1} * sd(d) / sqrt(n)``, ``sd`` with
  ``n - 1`` in the denominator; exact if the differences are normal, and the same interval as
  ``scipy.stats.ttest_rel(a, b).confidence_interval()`` (tested);
- **bootstrap**: the percentile interval of the mean of ``n`` differences resampled with
  replacement (``scipy.stats.bootstrap``, paired by construction since the differences are
  resampled), which does not assume normality but is too narrow for very small ``n``.

With ``n < 2`` no interval exists (NaN) and the report says so; the number of volumes is always
reported next to the interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof = 1; NaN for n = 1) of ``n`` values."""

    mean: float
    std: float
    n: int

    def fmt(self, digits: int = 2) -> str:
        if self.n == 0:
            return "n/a"
        std = "n/a" if math.isnan(self.std) else f"{self.std:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {std}"


def summarize(values: Sequence[float]) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Summary(math.nan, math.nan, 0)
    return Summary(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference ``a - b`` over ``n`` volumes with its 95% (``level``) intervals."""

    mean: float
    n: int
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    p_value: float
    level: float = 0.95

    def fmt(self, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (n = {self.n}: no CI)"
        return f"{self.mean:+.{digits}f} [{self.t_low:+.{digits}f}, {self.t_high:+.{digits}f}] (n = {self.n})"


def t_interval(d: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The t confidence interval of the mean of ``d`` (NaNs for fewer than 2 values)."""
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        return math.nan, math.nan
    half = _st.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return float(d.mean() - half), float(d.mean() + half)


def bootstrap_interval(d: Sequence[float], level: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``d`` (NaNs for fewer than 2 values; a
    constant ``d`` gives the degenerate interval [d, d])."""
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2:
        return math.nan, math.nan
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    res = _st.bootstrap((d,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """Paired difference ``a - b`` (same volumes in the same order) with t and bootstrap CIs and
    the two-sided paired t-test p-value."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_difference: a {a.shape} and b {b.shape} must be 1-D of equal length")
    d = a - b
    n = int(d.size)
    t_low, t_high = t_interval(d, level)
    boot_low, boot_high = bootstrap_interval(d, level, seed=seed)
    p = math.nan
    if n >= 2 and d.std(ddof=1) > 0:
        p = float(_st.ttest_1samp(d, 0.0).pvalue)
    return PairedDifference(float(d.mean()) if n else math.nan, n, t_low, t_high, boot_low, boot_high, p, level)
