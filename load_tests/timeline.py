"""From raw observations to the experiment's timeline and summary. Pure: no Ray, no HTTP.

Inputs: one record per request (start, latency, status) from the Locust request log, and one
replica-count sample per second from Serve's status API. Times are seconds since the load
profile started (t=0 is Locust's first tick).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from load_tests.sampling import DeploymentReplicas
from load_tests.shapes import Profile

PIPELINE_ORDER = ("Ingress", "Preprocessor", "Classifier")
PERCENTILE_WINDOW_S = 5.0  # latency percentiles at second t cover requests finished in (t-5, t]
BASE_COLUMNS = ("t_s", "users", "rps", "p50_ms", "p95_ms", "p99_ms", "ongoing", "errors",
                "errors_by_status")
SUMMARY_KEYS = ("config", "shape", "policy", "profile", "p95_target_ms", "scale_up_s",
                "p95_recover_s", "scale_down_s", "replica_seconds", "requests", "failed",
                "failed_by_status", "hold_latency_ms", "p95_hold_ms", "min_replicas",
                "max_replicas_seen", "requests_while_stopping")


@dataclass(frozen=True)
class Request:
    start: float
    latency_s: float
    status: int
    name: str = ""

    @property
    def end(self) -> float:
        return self.start + self.latency_s

    @property
    def ok(self) -> bool:
        return self.status == 200


Sample = tuple[float, Mapping[str, DeploymentReplicas]]


def parse_request_log(lines: Iterable[str]) -> tuple[Optional[float], list[Request]]:
    """(profile start epoch, requests relative to it) from the Locust request log."""
    start: Optional[float] = None
    raw: list[tuple[float, float, int, str]] = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("# start "):
            start = start if start is not None else float(line.split()[2])
            continue
        t, ms, status, name = line.split(",", 3)
        raw.append((float(t), float(ms) / 1000, int(status), name))
    origin = start if start is not None else min((r[0] for r in raw), default=0.0)
    return start, [Request(t - origin, lat, status, name) for t, lat, status, name in raw]


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def deployments_of(samples: Sequence[Sample]) -> list[str]:
    names = {name for _, counts in samples for name in counts}
    return sorted(names, key=lambda n: (PIPELINE_ORDER.index(n) if n in PIPELINE_ORDER
                                        else len(PIPELINE_ORDER), n))


def _sample_at(samples: Sequence[Sample], t: float) -> Optional[Mapping[str, DeploymentReplicas]]:
    """The last sample taken at or before ``t``."""
    found = None
    for ts, counts in samples:
        if ts > t:
            break
        if counts:
            found = counts
    return found


def build_timeline(requests: Sequence[Request], samples: Sequence[Sample], profile: Profile,
                   end_s: float) -> tuple[list[str], list[dict]]:
    """One row per second from 0 to ``end_s``: (columns, rows). Requests sorted once and
    found by bisection: a long run (the simulator's) has hundreds of thousands."""
    deployments = deployments_of(samples)
    columns = list(BASE_COLUMNS[:2])
    for name in deployments:
        columns += [f"{name}_target", f"{name}_running"]
    columns += list(BASE_COLUMNS[2:])
    by_end = sorted(requests, key=lambda r: r.end)
    ends = [r.end for r in by_end]
    starts = sorted(r.start for r in requests)
    rows = []
    si, counts = 0, None
    for second in range(int(math.ceil(end_s)) + 1):
        t = float(second)
        while si < len(samples) and samples[si][0] <= t:
            if samples[si][1]:
                counts = samples[si][1]
            si += 1
        c_map = counts or {}
        lo, hi = bisect_right(ends, t - 1), bisect_right(ends, t)
        finished = by_end[lo:hi]
        w_lo = bisect_right(ends, t - PERCENTILE_WINDOW_S)
        window = [r.latency_s * 1000 for r in by_end[w_lo:hi]]
        errors = Counter(r.status for r in finished if not r.ok)
        row: dict = {"t_s": second, "users": profile.users_at(t) or 0}
        for name in deployments:
            c = c_map.get(name)
            row[f"{name}_target"] = c.target if c else ""
            row[f"{name}_running"] = c.running if c else ""
        row.update(
            rps=len(finished),
            p50_ms=_round(percentile(window, 50)),
            p95_ms=_round(percentile(window, 95)),
            p99_ms=_round(percentile(window, 99)),
            ongoing=bisect_right(starts, t) - bisect_right(ends, t),
            errors=sum(errors.values()),
            errors_by_status=" ".join(f"{code}:{n}" for code, n in sorted(errors.items())),
        )
        rows.append(row)
    return columns, rows


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def first_time(samples: Sequence[Sample], after: float, test) -> Optional[float]:
    """Seconds from ``after`` to the first sample at or after it that passes ``test``."""
    for ts, counts in samples:
        if ts >= after and counts and test(counts):
            return round(ts - after, 1)
    return None


def scale_up_times(samples: Sequence[Sample], rises: Sequence[float]
                   ) -> dict[str, list[Optional[float]]]:
    """Per deployment, per load rise: seconds until more replicas are RUNNING than at the rise."""
    out: dict[str, list[Optional[float]]] = {}
    for name in deployments_of(samples):
        times = []
        for rise in rises:
            before = _sample_at(samples, rise) or {}
            base = before[name].running if name in before else 1
            times.append(first_time(samples, rise, lambda c, n=name, b=base:
                                    n in c and c[n].running > b))
        out[name] = times
    return out


def scale_down_times(samples: Sequence[Sample], load_end: float, min_replicas: Mapping[str, int]
                     ) -> dict[str, Optional[float]]:
    """Per deployment: seconds from the end of load until it is back at min and nothing stops."""
    return {name: first_time(samples, load_end, lambda c, n=name, m=low: n in c
                             and c[n].target <= m and c[n].running <= m and c[n].stopping == 0)
            for name, low in min_replicas.items()}


def p95_recovery(rows: Sequence[dict], rises: Sequence[float], load_end: float,
                 target_ms: float) -> list[Optional[float]]:
    """Per rise: seconds until p95 is back under ``target_ms`` for good (until the load ends)
    after going over (0.0 if it never went over; None if it was still over at the end)."""
    out: list[Optional[float]] = []
    for i, rise in enumerate(rises):
        until = min([load_end] + [r for r in rises[i + 1:]])
        window = [(row["t_s"], row["p95_ms"]) for row in rows
                  if rise <= row["t_s"] <= until and row["p95_ms"] is not None]
        over = [t for t, p95 in window if p95 > target_ms]
        if not over:
            out.append(0.0)
            continue
        back = [t for t, _ in window if t > over[-1]]
        out.append(round(back[0] - rise, 1) if back else None)
    return out


def replica_seconds(samples: Sequence[Sample], end_s: float) -> dict[str, float]:
    """Running replicas integrated over time (each sample holds until the next), 0..end_s."""
    totals: dict[str, float] = {name: 0.0 for name in deployments_of(samples)}
    points = [(ts, c) for ts, c in samples if c and 0 <= ts <= end_s]
    for (ts, counts), nxt in zip(points, [p[0] for p in points[1:]] + [end_s]):
        for name, c in counts.items():
            totals[name] = totals.get(name, 0.0) + c.running * (nxt - ts)
    return {name: round(v, 1) for name, v in totals.items()}


def requests_while_stopping(requests: Sequence[Request], samples: Sequence[Sample]) -> int:
    """Requests in flight while some replica was STOPPING: the ones a scale-down could have
    dropped (Ray issue #43034), so a clean run with this > 0 shows the drain works. A sample
    that shows STOPPING stands for the interval from the sample before it to the one after,
    since the state began and ended somewhere in between."""
    times = [ts for ts, _ in samples]
    spans = []
    for i, (ts, counts) in enumerate(samples):
        if any(d.stopping for d in counts.values()):
            spans.append((times[max(0, i - 1)], times[min(len(times) - 1, i + 1)]))
    return sum(1 for r in requests if any(r.start < hi and r.end > lo for lo, hi in spans))


def summarize(requests: Sequence[Request], samples: Sequence[Sample], rows: Sequence[dict],
              profile: Profile, end_s: float, min_replicas: Mapping[str, int],
              p95_target_ms: float, meta: Mapping[str, object]) -> dict:
    """The numbers an experiment is run for (keys in SUMMARY_KEYS)."""
    failed = [r for r in requests if not r.ok]
    hold = profile.hold
    held = [r.latency_s * 1000 for r in requests if hold and hold[0] <= r.start < hold[1]]
    return {
        **scaling_summary(samples, rows, profile, end_s, min_replicas, p95_target_ms, meta),
        "requests": len(requests),
        "failed": len(failed),
        "failed_by_status": {str(k): v for k, v in sorted(Counter(r.status for r in failed).items())},
        "hold_latency_ms": {f"p{q}": _round(percentile(held, q)) for q in (50, 95, 99)},
        "p95_hold_ms": _round(percentile(held, 95)),
        "requests_while_stopping": requests_while_stopping(requests, samples),
    }


def scaling_summary(samples: Sequence[Sample], rows: Sequence[dict], profile: Profile,
                    end_s: float, min_replicas: Mapping[str, int], p95_target_ms: float,
                    meta: Mapping[str, object]) -> dict:
    """The summary's keys that come from replica samples and timeline rows alone (the
    simulator's fleet mode has no per-request records for the rest)."""
    hold = profile.hold
    per_dep = replica_seconds(samples, end_s)
    return {
        **meta,
        "profile": {"shape": profile.name, "duration_s": profile.duration_s,
                    "base_users": profile.base_users, "peak_users": profile.peak_users,
                    "rises_s": list(profile.rises), "hold_s": list(hold) if hold else None,
                    "load_end_s": profile.load_end_s},
        "p95_target_ms": p95_target_ms,
        "scale_up_s": scale_up_times(samples, profile.rises),
        "p95_recover_s": p95_recovery(rows, profile.rises, profile.load_end_s, p95_target_ms),
        "scale_down_s": scale_down_times(samples, profile.load_end_s, min_replicas),
        "replica_seconds": {**per_dep, "total": round(sum(per_dep.values()), 1)},
        "min_replicas": dict(min_replicas),
        "max_replicas_seen": {name: max((c[name].running for _, c in samples if name in c),
                                        default=0) for name in deployments_of(samples)},
    }
