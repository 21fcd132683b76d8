"""The simulator's outputs in the experiment's shapes: timeline.csv rows, summary.json keys and
timeline.png, as load_tests/autoscale_experiment.py writes them.

The exact mode hands its request records and per-second replica samples to
``timeline.build_timeline`` and ``timeline.summarize``. The fleet mode has no per-request
records: its rows and summary are computed here with the same definitions (5 s percentile
windows, nearest rank, the same scale-up/down and recovery functions of timeline.py) over
weighted latency points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from load_tests import timeline
from load_tests.simulation.fluid import FluidResult


def gpu_hours(replica_seconds: Mapping[str, float], fraction: float) -> dict[str, float]:
    """Replica-seconds to GPU-hours at ``fraction`` of a GPU per replica."""
    return {name: round(v * fraction / 3600.0, 4) for name, v in replica_seconds.items()}


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> Optional[float]:
    """Nearest-rank percentile of weighted values (timeline.percentile's rule, weighted)."""
    if len(values) == 0 or weights.sum() <= 0:
        return None
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    rank = q / 100.0 * cum[-1]
    i = int(np.searchsorted(cum, rank - 1e-9 * cum[-1]))
    return float(values[order][min(i, len(order) - 1)])


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 1)


def fluid_rows(res: FluidResult, samples: Sequence, profile: Any, end_s: float
               ) -> tuple[list[str], list[dict]]:
    """timeline.build_timeline's columns and rows, from the fleet mode's per-step counts."""
    deployments = timeline.deployments_of(samples)
    columns = list(timeline.BASE_COLUMNS[:2])
    for name in deployments:
        columns += [f"{name}_target", f"{name}_running"]
    columns += list(timeline.BASE_COLUMNS[2:])
    start, lat, fin, w = res.points()
    order = np.argsort(fin, kind="stable")
    fin, lat, w = fin[order], lat[order], w[order]
    steps_per_s = int(round(1.0 / res.dt))
    n_s = int(math.ceil(end_s)) + 1
    per_step_done = res.served + res.refused
    pad = n_s * steps_per_s - len(per_step_done)
    done = np.concatenate((per_step_done, np.zeros(max(0, pad))))[:n_s * steps_per_s]
    refused = np.concatenate((res.refused, np.zeros(max(0, pad))))[:n_s * steps_per_s]
    # requests finished in (t-1, t]: the steps that end in it
    rps = np.concatenate(([0.0], done.reshape(n_s, steps_per_s).sum(axis=1)[:-1]))
    errs = np.concatenate(([0.0], refused.reshape(n_s, steps_per_s).sum(axis=1)[:-1]))
    bounds = np.searchsorted(fin, np.arange(n_s + 1) - timeline.PERCENTILE_WINDOW_S, "right")
    ends = np.searchsorted(fin, np.arange(n_s + 1), "right")
    rows = []
    si = 0
    counts: Mapping = {}
    for second in range(n_s):
        while si < len(samples) and samples[si][0] <= second:
            counts = samples[si][1] or counts
            si += 1
        a, b = bounds[second], ends[second]
        lw, ww = lat[a:b] * 1000.0, w[a:b]
        row: dict = {"t_s": second, "users": profile.users_at(float(second)) or 0}
        for name in deployments:
            c = counts.get(name)
            row[f"{name}_target"] = c.target if c else ""
            row[f"{name}_running"] = c.running if c else ""
        step = min(len(res.inflight) - 1, second * steps_per_s)
        n_err = int(round(errs[second]))
        row.update(rps=int(round(rps[second])),
                   p50_ms=_round(weighted_percentile(lw, ww, 50)),
                   p95_ms=_round(weighted_percentile(lw, ww, 95)),
                   p99_ms=_round(weighted_percentile(lw, ww, 99)),
                   ongoing=int(round(res.inflight[step])), errors=n_err,
                   errors_by_status=f"503:{n_err}" if n_err else "")
        rows.append(row)
    return columns, rows


def fluid_summary(res: FluidResult, samples: Sequence, rows: Sequence[dict], profile: Any,
                  end_s: float, min_replicas: Mapping[str, int], p95_target_ms: float,
                  meta: Mapping[str, object]) -> dict:
    """timeline.summarize's keys for the fleet mode."""
    start, lat, _, w = res.points()
    hold = profile.hold
    held = (start >= hold[0]) & (start < hold[1]) if hold else np.zeros(len(start), bool)
    hold_ms = {f"p{q}": _round(weighted_percentile(lat[held] * 1000, w[held], q))
               for q in (50, 95, 99)}
    failed = int(round(res.refused.sum()))
    stopping = [r["t_s"] for r, (_, c) in zip(rows, samples)
                if any(d.stopping for d in c.values())]
    while_stopping = int(sum(rows[t]["ongoing"] + rows[t]["rps"] for t in stopping
                             if t < len(rows)))
    return {
        **timeline.scaling_summary(samples, rows, profile, end_s, min_replicas, p95_target_ms,
                                   meta),
        "requests": int(round(res.arrivals.sum())),
        "failed": failed,
        "failed_by_status": {"503": failed} if failed else {},
        "hold_latency_ms": hold_ms,
        "p95_hold_ms": hold_ms["p95"],
        "requests_while_stopping": while_stopping,
    }


def write(out: Path, columns: list[str], rows: list[dict], summary: dict, deployments: list,
          profile: Any, p95_target_ms: float, title: str, png: bool = True) -> None:
    from load_tests.autoscale_experiment import plot, write_csv

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "timeline.csv", columns, rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if png:
        plot(out / "timeline.png", rows, deployments, profile, p95_target_ms, title)
