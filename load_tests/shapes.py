"""Load profiles: how many simulated users at each second of a run.

Pure arithmetic, no Locust here: ``locustfile.py`` wraps one of these in a ``LoadTestShape`` and
the experiment builds the same profile to know when the steps, the hold and the end of load are.
Every profile is built from a total duration and base/peak user counts; the phases are fixed
fractions of the duration so one ``--duration`` scales the whole run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Profile:
    """A load profile. ``rises``: when load steps up (scale-up is timed from these);
    ``hold``: the window at peak load; ``load_end_s``: when the load falls back for good."""

    name: str
    duration_s: float
    base_users: int
    peak_users: int
    rises: tuple[float, ...]
    hold: Optional[tuple[float, float]]
    load_end_s: float

    def users_at(self, t: float) -> Optional[int]:
        """Users at ``t`` seconds into the run; None once the run is over."""
        if t < 0 or t >= self.duration_s:
            return None
        return self._users(t)

    def _users(self, t: float) -> int:
        raise NotImplementedError

    def as_args(self) -> list[str]:
        """The Locust command-line options that rebuild this profile in ``locustfile.py``."""
        return ["--shape", self.name, "--shape-duration", f"{self.duration_s:g}",
                "--base-users", str(self.base_users), "--peak-users", str(self.peak_users)]


@dataclass(frozen=True)
class Step(Profile):
    """base -> peak (held) -> base: the classic scale-up, hold, scale-down run."""

    up_s: float = 0.0
    down_s: float = 0.0

    def _users(self, t: float) -> int:
        return self.peak_users if self.up_s <= t < self.down_s else self.base_users


@dataclass(frozen=True)
class Spike(Step):
    """A short burst at peak: tests how fast replicas arrive and whether they leave cleanly."""


@dataclass(frozen=True)
class Ramp(Profile):
    """Linear rise from base to peak, a hold at peak, then a linear fall back to base."""

    up_end_s: float = 0.0
    down_start_s: float = 0.0

    def _users(self, t: float) -> int:
        span = self.peak_users - self.base_users
        if t < self.up_end_s:
            return self.base_users + round(span * t / self.up_end_s)
        if t < self.down_start_s:
            return self.peak_users
        fall = (t - self.down_start_s) / max(1e-9, self.duration_s - self.down_start_s)
        return self.base_users + round(span * (1 - fall))


@dataclass(frozen=True)
class Sine(Profile):
    """One day-like cycle compressed into the run: night (base), midday peak, night again."""

    def _users(self, t: float) -> int:
        phase = (1 - math.cos(2 * math.pi * t / self.duration_s)) / 2
        return self.base_users + round((self.peak_users - self.base_users) * phase)


SHAPES = ("step", "spike", "ramp", "sine")


def build(shape: str, duration_s: float, base_users: int = 1, peak_users: int = 16) -> Profile:
    """The named profile over ``duration_s`` seconds."""
    if duration_s <= 0:
        raise ValueError("duration must be > 0")
    if not 0 <= base_users <= peak_users or peak_users < 1:
        raise ValueError(f"need 0 <= base_users <= peak_users and peak_users >= 1, "
                         f"got {base_users}, {peak_users}")
    d = float(duration_s)
    common = dict(duration_s=d, base_users=base_users, peak_users=peak_users)
    if shape == "step":  # 15% base, 50% peak, 35% base: long enough after to see scale-down
        up, down = 0.15 * d, 0.65 * d
        return Step(name="step", rises=(up,), hold=(up, down), load_end_s=down,
                    up_s=up, down_s=down, **common)
    if shape == "spike":  # 20% base, 15% peak, 65% base
        up, down = 0.20 * d, 0.35 * d
        return Spike(name="spike", rises=(up,), hold=(up, down), load_end_s=down,
                     up_s=up, down_s=down, **common)
    if shape == "ramp":  # 35% rising, 30% at peak, 35% falling
        up_end, down_start = 0.35 * d, 0.65 * d
        return Ramp(name="ramp", rises=(0.0,), hold=(up_end, down_start), load_end_s=d,
                    up_end_s=up_end, down_start_s=down_start, **common)
    if shape == "sine":  # the peak third of the cycle counts as the hold
        return Sine(name="sine", rises=(0.0,), hold=(d / 3, 2 * d / 3), load_end_s=d, **common)
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
