"""Ray Serve's autoscaling control loop, run on a simulated clock.

The decision is Ray's own code: ``ApplicationAutoscalingState`` / ``DeploymentAutoscalingState``
(ray/serve/_private/autoscaling_state.py) build the ``AutoscalingContext`` objects, wrap the
policy with ``_apply_app_level_autoscaling_config`` / ``_apply_autoscaling_config`` (factors,
upscale/downscale delays, the cold-start path) and bound the result. Ray reads ``time.time()``
and ``time.monotonic()`` there, so those modules see a :class:`SimClock` while a simulation
runs (:func:`sim_time`).

What feeds it is modelled as Ray 2.60 does it: replicas and handles sample their metrics every
``min(look_back_period_s * 0.2, metrics_interval_s)`` into Ray's ``InMemoryMetricsStore`` and
push the window every ``metrics_interval_s``; running requests are counted at the handles
(``RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE``, on by default), queued ones too, custom
metrics (``record_autoscaling_stats``) at the replicas. The exact mode sends Ray's real
``ReplicaMetricReport`` / ``HandleMetricReport`` per replica; the fleet mode groups replicas that
started together into cohorts with one series each and hands Ray's aggregation the cohort
series (the same merged step function, summed once instead of once per replica).

The replica lifecycle around it: a higher target starts replicas that run after ``start_s``
(counted STARTING meanwhile); a lower one removes STARTING replicas first, then the newest
RUNNING ones, which leave the routers and drain (STOPPING) until idle, checked every
``graceful_shutdown_wait_loop_s``, at most ``graceful_shutdown_timeout_s``.
"""

from __future__ import annotations

import contextlib
import math
import time as _time
from typing import Any, Callable, Iterator, Optional

import ray.serve._private.autoscaling_state as ray_state
import ray.serve.autoscaling_policy as ray_policy
from ray.serve._private.common import (
    RUNNING_REQUESTS_KEY,
    DeploymentHandleSource,
    DeploymentID,
    HandleMetricReport,
    ReplicaID,
    ReplicaMetricReport,
    TimeStampedValue,
)
from ray.serve._private.metrics_utils import (
    InMemoryMetricsStore,
    merge_instantaneous_total,
    time_weighted_average,
)
from ray.serve.config import AggregationFunction, AutoscalingPolicy

from load_tests.simulation.settings import DeploymentSettings, PolicySpec, SimSettings

#: Simulated epoch: t=0 of a run is this Unix time (Ray rounds merged timestamps to 10 ms).
EPOCH = 1_700_000_000.0
EPS = 1e-9
STARTING, RUNNING, STOPPING = "STARTING", "RUNNING", "STOPPING"
#: Keys of a handle's store: queued requests, and ("running", replica id) per replica.
QUEUED_KEY = "queued"


class SimClock:
    """Stands in for the ``time`` module inside Ray's autoscaling modules."""

    def __init__(self) -> None:
        self.now = 0.0  # seconds since the run started

    def time(self) -> float:
        return EPOCH + self.now

    def monotonic(self) -> float:
        return EPOCH + self.now

    def perf_counter(self) -> float:
        return _time.perf_counter()


@contextlib.contextmanager
def sim_time(clock: SimClock) -> Iterator[SimClock]:
    """Ray's autoscaling modules read ``clock`` instead of the wall clock, for the block."""
    saved = ray_state.time, ray_policy.time
    ray_state.time = ray_policy.time = clock  # type: ignore[assignment]
    try:
        yield clock
    finally:
        ray_state.time, ray_policy.time = saved


class _NoGauge:
    """Ray's controller gauges export to Prometheus; nothing to export here."""

    def set(self, *_: Any, **__: Any) -> None:
        pass


def _no_record(*_: Any, **__: Any) -> None:
    """Ray's record_autoscaling_metrics only sets gauges and stashes a number for its log."""


class Source:
    """A metrics producer (a replica, a cohort of replicas, a handle): Ray's in-memory store,
    sampled every ``record_s`` and pushed every ``push_s`` from ``since``."""

    __slots__ = ("store", "record_s", "push_s", "look_back_s", "next_record", "next_push",
                 "pushed", "pushed_at", "sums")

    def __init__(self, dep: DeploymentSettings, since: float):
        self.store = InMemoryMetricsStore()
        self.record_s = dep.record_interval_s
        self.push_s = dep.autoscaling.metrics_interval_s
        self.look_back_s = dep.autoscaling.look_back_period_s
        self.next_record = since
        self.next_push = since
        self.pushed: dict[Any, list] = {}
        self.sums: dict[Any, tuple] = {}
        self.pushed_at: Optional[float] = None

    def record_due(self, now: float) -> bool:
        return now + EPS >= self.next_record

    def record(self, now: float, points: dict[Any, float]) -> None:
        self.store.add_metrics_point(points, EPOCH + now)
        while self.next_record <= now + EPS:
            self.next_record += self.record_s

    def push_due(self, now: float) -> bool:
        return now + EPS >= self.next_push

    def push(self, now: float) -> dict[Any, list]:
        """The window Ray's pusher sends: pruned to ``look_back_period_s``."""
        self.store.prune_keys_and_compact_data(EPOCH + now - self.look_back_s)
        self.pushed = {k: list(v) for k, v in self.store.data.items()}
        self.sums = {k: series_sums(v) for k, v in self.pushed.items() if v}
        self.pushed_at = now
        while self.next_push <= now + EPS:
            self.next_push += self.push_s
        return self.pushed


class Replica:
    """One replica's lifecycle; the model attaches what it needs in ``state_data``."""

    __slots__ = ("rid", "state", "ready_at", "running_since", "stop_check", "stop_deadline",
                 "source", "data", "count")

    def __init__(self, rid: ReplicaID, ready_at: float, count: int = 1):
        self.rid = rid
        self.state = STARTING
        self.ready_at = ready_at
        self.running_since: Optional[float] = None
        self.stop_check = 0.0
        self.stop_deadline = 0.0
        self.source: Optional[Source] = None
        self.data: Any = None
        self.count = count  # >1: a fleet cohort of identical replicas


class StartupSlots:
    """The node's worker-process starts: each takes ``process_s``, at most ``concurrency`` at
    once (Ray's raylet limits them to min(cores, num_cpus)), then the replica's own start."""

    def __init__(self, concurrency: Optional[int] = None, process_s: float = 0.0):
        self.free_at = [0.0] * concurrency if concurrency else None
        self.process_s = process_s

    def ready_times(self, now: float, n: int, start_s: float) -> list[float]:
        """When each of ``n`` replicas asked for at ``now`` is ready."""
        if self.free_at is None:
            return [now + self.process_s + start_s] * n
        out = []
        for _ in range(n):
            i = min(range(len(self.free_at)), key=self.free_at.__getitem__)
            begins = max(now, self.free_at[i])
            self.free_at[i] = begins + self.process_s
            out.append(begins + self.process_s + start_s)
        return out


class Pool:
    """A deployment's replicas and target, reconciled the way Ray's deployment state does."""

    def __init__(self, app: str, dep: DeploymentSettings, initial: int, cohorts: bool = False,
                 slots: Optional[StartupSlots] = None):
        self.slots = slots or StartupSlots()
        self.dep = dep
        self.id = DeploymentID(name=dep.name, app_name=app)
        self.cohorts = cohorts
        self.replicas: list[Replica] = []
        self.target = initial
        self._n = 0
        self.now = 0.0
        self.version = 0
        self._cache: dict = {}
        self.handle = Source(dep, 0.0)
        self._reconcile(0.0, start_s=0.0)
        self.changed()

    def _new_id(self) -> ReplicaID:
        self._n += 1
        return ReplicaID(unique_id=f"{self._n:06d}", deployment_id=self.id)

    def changed(self) -> None:
        """Replicas were added, removed or changed state: drop the cached views."""
        self.version += 1
        self._cache.clear()

    def count(self, state: str) -> int:
        key = ("count", state)
        if key not in self._cache:
            self._cache[key] = sum(r.count for r in self.replicas if r.state == state)
        return self._cache[key]

    def running(self) -> list[Replica]:
        if "running" not in self._cache:
            self._cache["running"] = [r for r in self.replicas if r.state == RUNNING]
        return self._cache["running"]

    def running_ids(self) -> list[ReplicaID]:
        if "ids" not in self._cache:
            out: list[ReplicaID] = []
            for r in self.running():
                out.extend(r.data["ids"] if self.cohorts else (r.rid,))
            self._cache["ids"] = out
        return self._cache["ids"]

    def set_target(self, target: int, now: float) -> None:
        self.target = target
        self._reconcile(now, self.dep.start_s)
        self.changed()

    def _reconcile(self, now: float, start_s: float) -> None:
        live = [r for r in self.replicas if r.state in (STARTING, RUNNING)]
        have = sum(r.count for r in live)
        if have < self.target:
            if start_s == 0.0:  # the replicas a run starts with
                self._add(self.target - have, now)
                self.promote(now)
            else:
                times = self.slots.ready_times(now, self.target - have, start_s)
                for ready_at in sorted(set(times)):
                    self._add(times.count(ready_at), ready_at)
        elif have > self.target:
            self._remove(have - self.target, now)

    def _add(self, n: int, ready_at: float) -> None:
        if self.cohorts:
            ids = [self._new_id() for _ in range(n)]
            r = Replica(ids[0], ready_at, n)
            r.data = {"ids": ids}
            self.replicas.append(r)
        else:
            self.replicas.extend(Replica(self._new_id(), ready_at) for _ in range(n))

    def _split(self, r: Replica, keep: int) -> Replica:
        """A cohort of ``r.count - keep`` carved off ``r`` (the newest ids)."""
        ids = r.data["ids"]
        part = Replica(ids[keep], r.ready_at, r.count - keep)
        part.state, part.running_since = r.state, r.running_since
        part.data = {**r.data, "ids": ids[keep:]}
        r.data = {**r.data, "ids": ids[:keep]}
        r.count = keep
        return part

    def _remove(self, n: int, now: float) -> None:
        """Ray stops replicas that are not running yet first, then running ones (newest)."""
        for wanted in (STARTING, RUNNING):
            for r in sorted((r for r in self.replicas if r.state == wanted),
                            key=lambda r: (r.ready_at, r.rid.unique_id), reverse=True):
                if n <= 0:
                    return
                if r.count > n:
                    part = self._split(r, r.count - n)
                    self.replicas.append(part)
                    r = part
                n -= r.count
                if wanted == STARTING:
                    self.replicas.remove(r)
                else:
                    r.state = STOPPING
                    r.stop_check = now + self.dep.graceful_wait_loop_s
                    r.stop_deadline = now + self.dep.graceful_timeout_s

    def promote(self, now: float) -> list[Replica]:
        """STARTING replicas whose start time has passed become RUNNING."""
        if not self.count(STARTING):
            return []
        ready = [r for r in self.replicas if r.state == STARTING and r.ready_at <= now + EPS]
        for r in ready:
            r.state = RUNNING
            r.running_since = now
            r.source = Source(self.dep, now)
        if ready:
            self.changed()
        return ready

    def finish_stopping(self, now: float, idle: Callable[[Replica], bool]) -> list[Replica]:
        """Draining replicas that are idle at a wait-loop check (or past the timeout) stop."""
        if not self.count(STOPPING):
            return []
        done = []
        for r in self.replicas:
            if r.state != STOPPING or now + EPS < r.stop_check:
                continue
            if idle(r) or now + EPS >= r.stop_deadline:
                done.append(r)
            else:
                r.stop_check += self.dep.graceful_wait_loop_s
        for r in done:
            self.replicas.remove(r)
        if done:
            self.changed()
        return done


def resolve_policy(spec: PolicySpec) -> Optional[Callable]:
    """The policy callable as Ray resolves it (a class instantiated once with its kwargs)."""
    if spec.function == "default":
        return None
    return ray_state._resolve_policy_callable(
        AutoscalingPolicy(policy_function=spec.function, policy_kwargs=spec.kwargs))


def series_sums(series: list) -> tuple[float, float, float, float]:
    """(first timestamp, integral up to the last point, last timestamp, last value) of a
    step series: what :func:`window_mean` needs, computed once per push."""
    area = sum(p.value * (q.timestamp - p.timestamp) for p, q in zip(series, series[1:]))
    return series[0].timestamp, area, series[-1].timestamp, series[-1].value


def window_mean(sums: tuple[float, float, float, float], now: float) -> float:
    """Ray's MEAN of one replica's series at ``now`` (``_merge_and_aggregate_timeseries`` on
    one series: time-weighted from its first point, the last value holding until ``now``,
    at least 1 ms), in O(1) instead of a pass over the points every 0.1 s tick."""
    t0, area, t_last, v_last = sums
    last = now - t_last
    if last <= 0:
        last = 1e-3
    return (area + v_last * last) / (t_last - t0 + last)


def merged_sums(series: list, aggregation: Any) -> Optional[tuple]:
    """:func:`series_sums` of Ray's merged total of ``series``, with the window start Ray's
    ``_merge_and_aggregate_timeseries`` uses (from when every series has a point). MEAN only."""
    if aggregation != AggregationFunction.MEAN:
        raise ValueError("the fleet mode supports aggregation_function: mean only")
    merged = merge_instantaneous_total(series)
    if not merged:
        return None
    start = merged[0].timestamp
    non_empty = [ts for ts in series if ts]
    if len(non_empty) > 1:
        aligned = max(ts[0].timestamp for ts in non_empty)
        if aligned <= merged[-1].timestamp:
            start = max(aligned, merged[0].timestamp)
    t_last, v_last = merged[-1].timestamp, merged[-1].value
    probe = 1.0  # Ray's mean with the last value held 1 s gives the area up to the last point
    mean = time_weighted_average(merged, window_start=start, last_window_s=probe)
    if mean is None:
        return None
    area = mean * (t_last - start + probe) - v_last * probe
    return start, area, t_last, v_last


class _FleetDeploymentState(ray_state.DeploymentAutoscalingState):
    """Ray's deployment state, its metric inputs read from cohorts of identical replicas.

    A cohort's replicas share one series, so each per-replica dict Ray would build holds the
    cohort's aggregate for each of its replica ids, and the sum over replicas Ray merges is the
    cohort's series times its size. The aggregation itself is Ray's
    (``_merge_and_aggregate_timeseries``).
    """

    pool: Pool

    def _cohort_windows(self) -> list[tuple[Replica, dict]]:
        return [(r, r.source.pushed) for r in self.pool.replicas
                if r.state == RUNNING and r.source is not None and r.source.pushed]

    _total_key: Any = None
    _total_sums: Optional[tuple] = None

    def get_total_num_requests(self) -> float:
        """Ray's total (queued + running, merged and averaged), from a merge done once per
        push: between pushes only ``now`` moves, and the window mean moves with it exactly as
        :func:`window_mean` says."""
        pool = self.pool
        running = [r for r in pool.replicas if r.state == RUNNING]
        key = (pool.handle.pushed_at, tuple((id(r), r.count) for r in running))
        if key != self._total_key:
            handle = pool.handle.pushed
            series = [handle[QUEUED_KEY]] if handle.get(QUEUED_KEY) else []
            for r in running:
                points = handle.get(("running", r.rid))
                if points:
                    series.append([TimeStampedValue(p.timestamp, p.value * r.count)
                                   for p in points])
            self._total_key = key
            self._total_sums = merged_sums(series, self._config.aggregation_function)
        if self._total_sums is None:
            return 0.0
        return window_mean(self._total_sums, EPOCH + pool.now)

    _windows_key: Any = None
    _windows: list = []
    _raw: dict = {}

    def _pushed_windows(self) -> list[tuple[Any, tuple, list, tuple]]:
        """(metric, the cohort's replica ids, its pushed series, their sums) per running
        cohort and metric, and Ray's raw dict of them: rebuilt only when a cohort pushed or
        the running set changed (the policy runs ten times between a cohort's pushes)."""
        windows = self._cohort_windows()
        key = tuple((id(r), r.count, r.source.pushed_at) for r, _ in windows)
        if key != self._windows_key:
            self._windows_key = key
            self._windows = [(metric, tuple(r.data["ids"]), series, r.source.sums[metric])
                             for r, window in windows for metric, series in window.items()]
            raw: dict[str, dict] = {}
            for metric, ids, series, _ in self._windows:
                raw.setdefault(metric, {}).update(dict.fromkeys(ids, series))
            self._raw = raw
        return self._windows

    def _get_aggregated_custom_metrics(self) -> dict:
        out: dict[str, dict] = {}
        mean = self._config.aggregation_function == AggregationFunction.MEAN
        now = EPOCH + self.pool.now
        for metric, ids, series, sums in self._pushed_windows():
            value = window_mean(sums, now) if mean else \
                self._merge_and_aggregate_timeseries([series])
            per_replica = out.get(metric)
            if per_replica is None:
                out[metric] = dict.fromkeys(ids, value)
            else:
                per_replica.update(dict.fromkeys(ids, value))
        return out

    def _get_raw_custom_metrics(self) -> dict:
        """Unchanged between pushes, so the same dict (the policy reads it, never writes)."""
        self._pushed_windows()
        return self._raw


class Controller:
    """The Serve controller's autoscaling for serve_app's three deployments."""

    def __init__(self, settings: SimSettings, fleet: bool = False):
        self.settings = settings
        self.fleet = fleet
        self.pools: dict[str, Pool] = {}
        slots = StartupSlots(settings.startup_concurrency, settings.process_start_s)
        self.app = ray_state.ApplicationAutoscalingState(settings.app_name)
        spec = settings.policy
        policy = resolve_policy(spec)
        cls = _FleetDeploymentState if fleet else ray_state.DeploymentAutoscalingState
        for name, dep in settings.deployments.items():
            cfg = dep.autoscaling
            initial = cfg.initial_replicas if cfg.initial_replicas is not None \
                else cfg.min_replicas
            pool = Pool(settings.app_name, dep, initial, cohorts=fleet, slots=slots)
            self.pools[name] = pool
            state = cls(pool.id)
            if fleet:
                state.pool = pool  # type: ignore[attr-defined]
            state._config = cfg
            state._target_capacity = None
            state._target_capacity_direction = None
            state._policy_state = {}
            dep_policy = cfg.policy
            if spec.function != "default" and spec.scope == "deployment" \
                    and name == "Classifier":
                dep_policy = AutoscalingPolicy(policy_function=spec.function,
                                               policy_kwargs=spec.kwargs)
            if spec.function == "default":
                dep_policy = AutoscalingPolicy()
            state._policy = ray_policy._apply_autoscaling_config(
                ray_state._resolve_policy_callable(dep_policy))
            state.record_autoscaling_metrics = _no_record  # type: ignore[method-assign]
            for gauge in ("autoscaling_decision_gauge", "autoscaling_total_requests_gauge",
                          "autoscaling_policy_execution_time_gauge",
                          "autoscaling_target_ongoing_requests_gauge"):
                setattr(state, gauge, _NoGauge())
            self.app._deployment_autoscaling_states[pool.id] = state
        if spec.function != "default" and spec.scope == "app":
            self.app._policy = ray_policy._apply_app_level_autoscaling_config(policy)
            self.app._policy_state = {}
        self.decisions = 0
        self._seen: dict[str, int] = {}

    def state(self, name: str) -> ray_state.DeploymentAutoscalingState:
        return self.app._deployment_autoscaling_states[self.pools[name].id]

    # ---- metrics, exact mode: Ray's reports, as the replicas and handles send them
    def push_replica(self, name: str, replica: Replica, now: float) -> None:
        window = replica.source.push(now)
        if not self.fleet:
            self.state(name).record_request_metrics_for_replica(
                ReplicaMetricReport(replica.rid, window, EPOCH + now))

    def push_handle(self, name: str, now: float) -> None:
        pool = self.pools[name]
        window = pool.handle.push(now)
        if self.fleet:
            return
        running = {key[1].to_full_id_str(): series for key, series in window.items()
                   if isinstance(key, tuple)}
        self.state(name).record_request_metrics_for_handle(HandleMetricReport(
            deployment_id=pool.id, handle_id=f"{name}-handle", actor_id=None,
            handle_source=DeploymentHandleSource.UNKNOWN,
            queued_requests=window.get(QUEUED_KEY, [TimeStampedValue(EPOCH + now, 0.0)]),
            metrics={RUNNING_REQUESTS_KEY: running}, timestamp=EPOCH + now))

    # ---- the loop
    def decide(self, now: float) -> dict[str, int]:
        """One control-loop iteration's autoscaling: Ray's decision per deployment, applied."""
        for name, pool in self.pools.items():
            pool.now = now
            if self._seen.get(name) != pool.version:  # Ray's call is idempotent in between
                self.app.update_running_replica_ids(pool.id, pool.running_ids())
                self._seen[name] = pool.version
        targets = {pool.id: pool.target for pool in self.pools.values()}
        decisions = self.app.get_decision_num_replicas(targets)
        self.decisions += 1
        out = {}
        for name, pool in self.pools.items():
            target = decisions.get(pool.id, pool.target)
            if target != pool.target:
                pool.set_target(int(target), now)
            out[name] = pool.target
        return out


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-12))
