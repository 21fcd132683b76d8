"""The fleet mode: requests counted per control-loop step, not simulated one by one.

For a day at thousands of requests/s. Each step (``control_period_s``, Ray's 0.1 s loop) takes a
Poisson count of arrivals and moves them through a pooled FIFO backlog: the running classifier
replicas (balanced by the router, so treated as equal) clear up to ``th(max_batch_size)`` images/s
each, ``th(n) = n / service_time_s(profile, n)``; below that, each replica's batch fill is the
size whose throughput matches its share of the arrivals (batching's fixed point), at least 1.
The ingress's call slots bound the images in calls, past them its queue, past ``max_queued`` per
ingress replica 503s. Latency per step's arrivals: the FIFO queueing delay from the cumulative
arrival and departure curves, plus preprocessing (group size x ``preprocess_ms``), plus one
batch, plus a uniform share of a batch in progress (the residual). Percentiles come from those
per-step distributions (:class:`FluidResult`), not per-request records.

Approximated (and why): no per-request randomness inside a step (Poisson counts per step are
drawn); a draining replica's few queued images are counted as served by the others; replicas
that started together form one cohort with one metric series. The control loop, the metrics'
sampling and push cadence, the aggregation and the policy calls are the same as the exact mode.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np

from load_tests.sampling import DeploymentReplicas
from load_tests.simulation.controller import RUNNING, STOPPING, Controller, SimClock, sim_time
from load_tests.simulation.settings import SimSettings
from serve_app import autoscaling as policy_keys
from serve_app import topology
from serve_app.simulated import service_time_s

POINTS_PER_STEP = 4  # quantile points standing for one step's latency distribution


def throughput_table(profile: Any, max_batch: int) -> list[float]:
    """Images/s one replica clears at batch size n = 1..max_batch (index n-1)."""
    return [n / service_time_s(profile, n) for n in range(1, max_batch + 1)]


def service_times(profile: Any, max_batch: int) -> list[float]:
    """Seconds one batch of n = 1..max_batch + 1 takes (index n-1): looked up every step."""
    return [service_time_s(profile, n) for n in range(1, max_batch + 2)]


def fill_for_rate(rate: float, table: list[float]) -> float:
    """The batch size at which one replica's throughput equals ``rate`` (>= 1, <= max):
    a busy replica's next batch holds what arrived during the last one."""
    if rate <= table[0]:
        return 1.0
    if rate >= table[-1]:
        return float(len(table))
    i = bisect.bisect_left(table, rate)  # table[i-1] < rate <= table[i]
    lo, hi = table[i - 1], table[i]
    return i + (rate - lo) / (hi - lo) if hi > lo else float(i + 1)


def service_s(times: list[float], fill: float) -> float:
    """Service time at a fractional batch size (linear between the integer sizes) from
    :func:`service_times`."""
    lo = max(1, int(fill))
    a = times[lo - 1]
    if fill <= lo:
        return a
    return a + (times[lo] - a) * (fill - lo)


def group_size(rate: float, slots: int, preprocess_s: float, batch_s: float,
               most: int) -> float:
    """Images per ingress call at ``rate`` images/s over ``slots`` call slots (1..``most``).

    A call holds its slot while its group is decoded (``preprocess_s`` per image, one after
    another) and classified (``batch_s``), and the images that arrive meanwhile form the next
    group: slots x g / (g x preprocess_s + batch_s) = rate. Dividing a step's arrivals by the
    slots instead, as this mode first did, took a call to last one step: at 5,000 req/s over
    64 slots it made groups of ~6 where the exact mode formed 16, and its p95 was 117 ms
    against the exact mode's 250 (docs/autoscaling.md).
    """
    if rate <= 0:
        return 1.0
    room = slots - rate * preprocess_s
    if room <= 0:
        return float(most)
    return min(float(most), max(1.0, rate * batch_s / room))


@dataclass
class FluidResult:
    dt: float
    arrivals: np.ndarray
    served: np.ndarray
    refused: np.ndarray
    backlog: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    inflight: np.ndarray
    samples: list
    decisions: int
    allocated: dict

    def queue_delay(self) -> np.ndarray:
        """Each step's arrivals' FIFO wait: when the departures reach their middle rank."""
        acc = self.arrivals - self.refused
        a_cum = np.cumsum(acc)
        d_cum = np.cumsum(self.served)
        mid = a_cum - acc / 2.0
        ends = (np.arange(len(acc)) + 1) * self.dt
        d_cum_x = np.concatenate(([0.0], d_cum))
        t_x = np.concatenate(([0.0], ends))
        # d_cum is non-decreasing; np.interp needs increasing x: nudge the flat stretches.
        x = d_cum_x + np.arange(len(d_cum_x)) * 1e-9
        depart = np.interp(mid, x, t_x, right=np.inf)
        return np.maximum(0.0, depart - (np.arange(len(acc)) + 0.5) * self.dt)

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(arrival time, latency s, finish time, weight) of the quantile points."""
        k = POINTS_PER_STEP
        delay = self.queue_delay()
        frac = (np.arange(k) + 0.5) / k
        lat = (delay + self.lo)[:, None] + (self.hi - self.lo)[:, None] * frac[None, :]
        start = np.repeat((np.arange(len(delay)) + 0.5) * self.dt, k)
        weight = np.repeat((self.arrivals - self.refused) / k, k)
        lat = lat.ravel()
        keep = weight > 0
        return start[keep], lat[keep], (start + lat)[keep], weight[keep]


class FluidSim:
    def __init__(self, settings: SimSettings, rates: np.ndarray, duration_s: float,
                 seed: int = 0, settle_s: float = 0.0):
        if settings.profile is None:
            raise ValueError("a latency profile is needed (--profile)")
        self.s = settings
        self.dt = settings.control_period_s
        self.duration_s = duration_s
        self.end_s = duration_s + settle_s
        self.rng = np.random.default_rng(seed)
        self.rates = rates
        self.clock = SimClock()
        self.ctrl = Controller(settings, fleet=True)
        self._due: dict[str, tuple] = {}
        self.table = throughput_table(settings.profile, settings.classifier.max_batch_size)
        self.times = service_times(settings.profile, settings.classifier.max_batch_size)

    def run(self) -> FluidResult:
        s, dt, ctrl = self.s, self.dt, self.ctrl
        n = int(round(self.end_s / dt)) + 1
        counts = np.zeros(n)
        m = min(n, len(self.rates))
        counts[:m] = self.rng.poisson(self.rates[:m] * dt)
        served = np.zeros(n)
        refused = np.zeros(n)
        backlog = np.zeros(n)
        lo = np.zeros(n)
        hi = np.zeros(n)
        inflight = np.zeros(n)
        samples = []
        allocated = {name: 0.0 for name in ctrl.pools}
        pools = ctrl.pools
        cls, ing, pre = (pools[topology.CLASSIFIER], pools[topology.INGRESS],
                         pools[topology.PREPROCESSOR])
        bmax = s.classifier.max_batch_size
        gmax, slots_per, queued_per = (s.dispatch.max_batch_size, s.dispatch.max_in_flight,
                                       s.dispatch.max_queued)
        mor = s.dep(topology.CLASSIFIER).max_ongoing_requests
        th_max = float(self.table[-1])
        p_s = s.preprocess_ms / 1000.0
        b = 0.0
        fill, s_fill, rho, group = 1.0, service_s(self.times, 1.0), 0.0, 1.0
        last_fill = None
        every = s.decide_every
        with sim_time(self.clock):
            for k in range(n):
                now = k * dt
                self.clock.now = now
                r_run = cls.count(RUNNING)
                n_ing = max(1, ing.count(RUNNING))
                a = counts[k]
                work = b + a
                cap = r_run * th_max * dt
                out = min(work, cap)
                slots = n_ing * slots_per
                in_calls_cap = slots * gmax
                ingress_q = max(0.0, work - out - in_calls_cap)
                ref = max(0.0, ingress_q - n_ing * queued_per)
                b = work - out - ref
                rate_r = out / dt / r_run if r_run else 0.0
                if r_run and out > 0:
                    # A group reaches a replica whole, so a batch holds at least one.
                    fill = bmax if out >= cap - 1e-9 else max(
                        fill_for_rate(rate_r, self.table), min(group, float(bmax)))
                    s_fill = service_s(self.times, fill)
                    rho = min(1.0, rate_r * s_fill / fill)
                    last_fill = fill
                # Its own batch and, on average, half of the one in progress.
                group = group_size(a / dt, slots, p_s, s_fill * (1 + rho / 2), gmax) \
                    if ingress_q <= 0 else float(gmax)
                pre_s = group * p_s
                served[k], refused[k], backlog[k] = out, ref, b
                lo[k] = pre_s + s_fill
                hi[k] = lo[k] + rho * s_fill
                arrival_rate = a / dt
                inflight[k] = b + arrival_rate * (lo[k] + hi[k]) / 2
                # ---- the metrics replicas and handles sample and push (when due)
                if self._is_due(cls, now):
                    per_rep = (min(b, r_run * mor * group) / r_run + fill * rho) if r_run \
                        else 0.0
                    handle_q_calls = max(0.0, b - ingress_q - r_run * mor * group) / group
                    stats = {policy_keys.MAX_BATCH_SIZE: float(bmax),
                             policy_keys.IMAGES_IN_FLIGHT: per_rep}
                    if last_fill is not None:
                        stats[policy_keys.BATCH_FILL] = last_fill
                        stats[policy_keys.BATCH_LATENCY_S] = s_fill
                        # What serve_app.batch_stats fits from the sizes a replica ran: exact
                        # for a linear profile once two sizes have run.
                        stats[policy_keys.FULL_BATCH_THROUGHPUT] = th_max
                    self._metrics(now, cls, "Classifier", handle_q_calls, per_rep / group, stats)
                if self._is_due(ing, now):
                    q_per_ing = (ingress_q - ref) / n_ing
                    self._metrics(now, ing, "Ingress", 0.0, inflight[k] / n_ing, {
                        policy_keys.IMAGES_QUEUED: q_per_ing,
                        policy_keys.images_queued_key(topology.CLASSIFIER): q_per_ing,
                        policy_keys.images_offered_key(topology.CLASSIFIER):
                            arrival_rate / n_ing})
                if self._is_due(pre, now):
                    n_pre = max(1, pre.count(RUNNING))
                    self._metrics(now, pre, "Preprocessor", 0.0,
                                  arrival_rate * pre_s / group / n_pre,
                                  {topology.FEEDS + topology.CLASSIFIER: 1.0})
                # ---- the controller's loop
                for pool in pools.values():
                    pool.promote(now)
                    pool.finish_stopping(now, lambda r: True)
                if k % every == 0:
                    ctrl.decide(now)
                for name, pool in pools.items():
                    allocated[name] += (pool.count(RUNNING) + pool.count("STARTING")
                                        + pool.count(STOPPING)) * dt
                if abs(now - round(now)) < 1e-9:
                    samples.append((float(round(now)), {
                        name: DeploymentReplicas(pool.target, pool.count(RUNNING),
                                                 pool.count("STARTING"), pool.count(STOPPING))
                        for name, pool in pools.items()}))
        return FluidResult(dt, counts, served, refused, backlog, lo, hi, inflight, samples,
                           ctrl.decisions, {k: round(v, 1) for k, v in allocated.items()})

    def _is_due(self, pool: Any, now: float) -> bool:
        """Whether a handle or replica of ``pool`` samples or pushes at ``now``."""
        due = self._due.get(pool.dep.name)
        return due is None or due[0] != pool.version or now + 1e-9 >= due[1]

    def _metrics(self, now: float, pool: Any, name: str, queued: float, running: float,
                 replica: dict) -> None:
        h = pool.handle
        if h.record_due(now):
            point = {"queued": queued}
            for r in pool.replicas:
                if r.state == RUNNING:
                    point[("running", r.rid)] = running
            h.record(now, point)
        if h.push_due(now):
            self.ctrl.push_handle(name, now)
        for r in pool.replicas:
            if r.state != RUNNING or r.source is None:
                continue
            if r.source.record_due(now):
                r.source.record(now, replica)
            if r.source.push_due(now):
                self.ctrl.push_replica(name, r, now)
        nxt = min([h.next_record, h.next_push] + [
            t for r in pool.replicas if r.state == RUNNING and r.source is not None
            for t in (r.source.next_record, r.source.next_push)])
        self._due[name] = (pool.version, nxt)
