"""Means over seeds with 95 % t-intervals (for paired differences: the mean of the per-seed differences between
two models trained with the same seeds; docs/study.md explains the choice)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def _t_pdf(x: np.ndarray, df: int) -> np.ndarray:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom: bisection on its CDF, integrated
    numerically (Simpson's rule over [0, x]; the density is smooth, so 4000 panels give ~1e-9)."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1 (got df={df}, p={p})")

    def half_cdf(x: float) -> float:  # P(0 < T < x)
        grid = np.linspace(0.0, x, 8001)
        y = _t_pdf(grid, df)
        return float((x / 8000) / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))

    lo, hi = 0.0, 1.0
    while half_cdf(hi) < p - 0.5:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if half_cdf(mid) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """A mean over n replicates and the half-width of its 95 % t-interval (nan for n < 2: no interval)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (never without an interval)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "half_width": self.half_width, "n": self.n}

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.4f} (1 seed, no interval)"
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of `values` and its 95 % t-interval: mean ± t(0.975, n-1) * sd / sqrt(n)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_interval needs at least one value")
    if x.size < 2:
        return Interval(float(x.mean()), float("nan"), 1)
    half = t_quantile(0.5 + CONFIDENCE / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(float(x.mean()), half, int(x.size))
