"""The load: users or a request rate over time, from load_tests/shapes.py or a trace.

A closed loop follows ``Profile.users_at`` exactly (as locustfile.py's shape does). An open loop
draws Poisson arrivals whose rate follows the same shape between a base and a peak rate, or a
``t_s,rate`` trace (the rate holds until the next row). The summaries need a ``Profile``
(rises, hold, end of load): :class:`RateProfile` and :class:`TraceProfile` are ones whose
``users_at`` is the rate in requests/s, which is what the timeline's ``users`` column then shows.
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from load_tests import shapes
from load_tests.shapes import Profile

RATE_SCALE = 1000  # the shape is built in milli-requests/s, so its rounding is to 0.001


@dataclass(frozen=True)
class RateProfile(Profile):
    """A shape of request rates: ``rate(t)`` unrounded, ``users_at`` rounded (for the CSV)."""

    inner: Optional[Profile] = None

    def rate(self, t: float) -> float:
        value = self.inner.users_at(t) if self.inner else None
        return 0.0 if value is None else value / RATE_SCALE

    def _users(self, t: float) -> int:
        return int(round(self.rate(t)))


@dataclass(frozen=True)
class TraceProfile(Profile):
    """A ``t_s,rate`` trace; the hold is the span at 90% of its peak rate or more."""

    times: tuple[float, ...] = ()
    rates: tuple[float, ...] = ()

    def rate(self, t: float) -> float:
        if t < 0 or t >= self.duration_s or not self.times:
            return 0.0
        i = bisect.bisect_right(self.times, t) - 1
        return self.rates[max(0, i)]

    def _users(self, t: float) -> int:
        return int(round(self.rate(t)))


def rate_profile(shape: str, duration_s: float, base_rate: float, peak_rate: float
                 ) -> RateProfile:
    inner = shapes.build(shape, duration_s, int(round(base_rate * RATE_SCALE)),
                         int(round(peak_rate * RATE_SCALE)))
    return RateProfile(name=inner.name, duration_s=inner.duration_s,
                       base_users=int(round(base_rate)), peak_users=int(round(peak_rate)),
                       rises=inner.rises, hold=inner.hold, load_end_s=inner.load_end_s,
                       inner=inner)


def read_trace(path: str | Path, duration_s: Optional[float] = None) -> TraceProfile:
    """A trace of ``t_s,rate`` rows (a header row is skipped); it lasts ``duration_s``, else
    to its last row plus that row's step."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                rows.append((float(row[0]), float(row[1])))
            except ValueError:
                continue  # header
    if not rows:
        raise ValueError(f"{path}: no t_s,rate rows")
    rows.sort()
    times = tuple(t for t, _ in rows)
    rates = tuple(max(0.0, r) for _, r in rows)
    if duration_s is None:
        step = times[-1] - times[-2] if len(times) > 1 else 1.0
        duration_s = times[-1] + step
    peak = max(rates)
    high = [t for t, r in rows if peak > 0 and r >= 0.9 * peak]
    hold = (high[0], min(duration_s, high[-1] + 1.0)) if high else None
    return TraceProfile(name=Path(path).stem, duration_s=float(duration_s),
                        base_users=int(round(min(rates))), peak_users=int(round(peak)),
                        rises=(0.0,), hold=hold, load_end_s=float(duration_s),
                        times=times, rates=rates)


def rates_at(rate: Callable[[float], float], duration_s: float, dt: float) -> np.ndarray:
    """The rate at the start of each ``dt`` step of the run."""
    n = int(math.ceil(duration_s / dt - 1e-9))
    return np.fromiter((rate(i * dt) for i in range(n)), dtype=np.float64, count=n)


def poisson_counts(rng: np.random.Generator, rates: np.ndarray, dt: float) -> np.ndarray:
    """Arrivals per step of a Poisson process with a piecewise-constant rate."""
    return rng.poisson(rates * dt)


def poisson_times(rng: np.random.Generator, rates: np.ndarray, dt: float) -> np.ndarray:
    """Arrival times of the same process, sorted: each step's count spread uniformly in it."""
    counts = poisson_counts(rng, rates, dt)
    starts = np.repeat(np.arange(len(rates)) * dt, counts)
    return np.sort(starts + rng.random(len(starts)) * dt)
