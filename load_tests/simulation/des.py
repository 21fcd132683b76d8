"""The exact mode: every request an event, through serve_app's graph.

HTTP proxy -> Ingress replica (power of two choices on its requests, at most its
``max_ongoing_requests``) -> the ingress's call slots (serve_app/batching.py: a request that finds
one of ``max_in_flight`` slots free leaves alone, the rest queue, at most ``max_queued``, then
503, and leave in groups of up to ``dispatch.max_batch_size``) -> preprocessing,
``preprocess_ms`` per image of the group (preprocessor replicas are not a bottleneck here: their
count is scaled and reported but a call never waits for one) -> the classifier handle's router
(two random running replicas, the one with fewer ongoing calls below ``max_ongoing_requests``;
when neither accepts, Ray retries with backoff until one does, modelled as any accepting one;
none: the call waits in the handle, counted as queued) -> the replica's ``@serve.batch`` queue
(up to ``max_batch_size`` images per forward pass, after ``batch_wait_timeout_s`` unless full),
each batch holding the replica ``service_time_s(profile, n)``. A call returns when all its images
are done, and its requests are answered then.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from load_tests.sampling import DeploymentReplicas
from load_tests.simulation import arrivals
from load_tests.simulation.controller import RUNNING, STOPPING, Controller, SimClock, sim_time
from load_tests.simulation.settings import SimSettings
from load_tests.timeline import Request
from serve_app import autoscaling as policy_keys
from serve_app import topology
from serve_app.batch_stats import BatchCounter, RateMeter
from serve_app.simulated import service_time_s

ARRIVAL, PRE_DONE, BATCH_DONE, BATCH_TIMER, WAKE, TICK = range(6)
SPAWN_RATE = 100.0  # Locust users started per second (load_tests/locustfile.py)
NAME = "/v1/classify"


@dataclass
class Load:
    """Closed loop (``users``: a Profile, ``wait_s``) or open loop (``rates`` per ``dt``)."""

    profile: Any
    closed: bool
    wait_s: float = 0.1
    rates: Optional[np.ndarray] = None


@dataclass
class _Req:
    start: float
    user: int = -1
    status: int = 0
    end: float = 0.0


@dataclass
class _Call:
    reqs: list
    ingress: Any
    n: int
    remaining: int
    pre: Any = None
    replica: Any = None


@dataclass
class _Classifier:
    """A classifier replica's queue and the counters its record_autoscaling_stats reads."""

    queue: deque = field(default_factory=deque)
    busy: bool = False
    timer_armed: bool = False
    ongoing_calls: int = 0
    load: BatchCounter = field(default_factory=BatchCounter)  # the replica's own bookkeeping


@dataclass
class _Ingress:
    offered: RateMeter  # images/s asked of the model, as the real ingress counts them
    pending: deque = field(default_factory=deque)
    in_flight: int = 0
    ongoing: int = 0


class DiscreteEventSim:
    def __init__(self, settings: SimSettings, load: Load, duration_s: float, seed: int = 0,
                 settle_s: float = 0.0):
        if settings.profile is None:
            raise ValueError("a latency profile is needed (--profile)")
        self.s = settings
        self.load = load
        self.duration_s = duration_s
        self.end_s = duration_s + settle_s
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.clock = SimClock()
        self.ctrl = Controller(settings)
        self._every, self._ticks = settings.decide_every, 0
        self.events: list = []
        self.seq = 0
        self.reqs: list[_Req] = []
        self.proxy_queue: deque = deque()
        self.handle_queue: deque = deque()
        self.pre_calls: dict = {}
        self.samples: list = []
        self.users_active: set[int] = set()
        self.users_stopping: set[int] = set()
        self.next_user = 0
        self.batch_max = settings.classifier.max_batch_size
        self.batch_wait = settings.classifier.batch_wait_timeout_s
        self._service = {n: service_time_s(settings.profile, n)
                         for n in range(1, self.batch_max + 1)}
        for name in (topology.INGRESS, topology.CLASSIFIER):
            for r in self.ctrl.pools[name].replicas:
                self._attach(name, r)

    # ---- plumbing
    def _at(self, t: float, kind: int, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def _attach(self, name: str, r: Any) -> None:
        if r.data is None:
            r.data = _Classifier() if name == topology.CLASSIFIER else (
                _Ingress(RateMeter(self._now)) if name == topology.INGRESS else None)

    def _pool(self, name: str):
        return self.ctrl.pools[name]

    def _pick(self, replicas: list, load: Any, cap: int) -> Any:
        """Ray's power of two choices: two random replicas, the less loaded one that accepts
        (load < cap); neither accepts: any accepting one (Ray's retries); none: None."""
        if not replicas:
            return None
        if len(replicas) == 1:
            return replicas[0] if load(replicas[0]) < cap else None
        a, b = self.rng.sample(replicas, 2)
        ok = [r for r in (a, b) if load(r) < cap]
        if ok:
            return min(ok, key=load) if len(ok) == 2 and load(ok[0]) != load(ok[1]) else ok[0]
        ok = [r for r in replicas if load(r) < cap]
        return self.rng.choice(ok) if ok else None

    def _now(self) -> float:
        return self.clock.now

    # ---- the request path
    def _arrive(self, now: float, user: int = -1) -> None:
        req = _Req(start=now, user=user)
        self.reqs.append(req)
        ing = self._route_ingress()
        if ing is None:
            limit = self.s.dep(topology.INGRESS).max_queued_requests
            if 0 <= limit <= len(self.proxy_queue):
                self._finish(req, now, 503)
            else:
                self.proxy_queue.append(req)
            return
        self._ingress_accept(ing, req, now)

    def _route_ingress(self) -> Any:
        cap = self.s.dep(topology.INGRESS).max_ongoing_requests
        return self._pick(self._pool(topology.INGRESS).running(), lambda r: r.data.ongoing, cap)

    def _ingress_accept(self, ing: Any, req: _Req, now: float) -> None:
        d, g = ing.data, self.s.dispatch
        d.ongoing += 1
        d.offered.add()
        if d.in_flight >= g.max_in_flight and len(d.pending) >= g.max_queued:
            d.ongoing -= 1
            self._finish(req, now, 503)
            return
        d.pending.append(req)
        self._dispatch(ing, now)

    def _dispatch(self, ing: Any, now: float) -> None:
        d, g = ing.data, self.s.dispatch
        while d.pending and d.in_flight < g.max_in_flight:
            group = [d.pending.popleft() for _ in range(min(g.max_batch_size, len(d.pending)))]
            d.in_flight += 1
            call = _Call(group, ing, len(group), len(group))
            pres = self._pool(topology.PREPROCESSOR).running()
            if pres:
                call.pre = min(pres, key=lambda r: self.pre_calls.get(r.rid, 0))
                self.pre_calls[call.pre.rid] = self.pre_calls.get(call.pre.rid, 0) + 1
            self._at(now + call.n * self.s.preprocess_ms / 1000.0, PRE_DONE, call)

    def _pre_done(self, call: _Call, now: float) -> None:
        if call.pre is not None:
            self.pre_calls[call.pre.rid] = self.pre_calls.get(call.pre.rid, 1) - 1
        self.handle_queue.append(call)
        self._route_calls(now)

    def _route_calls(self, now: float) -> None:
        cap = self.s.dep(topology.CLASSIFIER).max_ongoing_requests
        running = self._pool(topology.CLASSIFIER).running()
        while self.handle_queue:
            rep = self._pick(running, lambda r: r.data.ongoing_calls, cap)
            if rep is None:
                return
            call = self.handle_queue.popleft()
            call.replica = rep
            c = rep.data
            c.ongoing_calls += 1
            c.load.images_in_flight += call.n
            c.queue.extend([call] * call.n)
            self._maybe_batch(rep, now)

    def _maybe_batch(self, rep: Any, now: float, timer: bool = False) -> None:
        c = rep.data
        if c.busy or not c.queue:
            return
        if self.batch_wait > 0 and len(c.queue) < self.batch_max and not timer:
            if not c.timer_armed:
                c.timer_armed = True
                self._at(now + self.batch_wait, BATCH_TIMER, rep)
            return
        c.timer_armed = False
        n = min(self.batch_max, len(c.queue))
        batch = [c.queue.popleft() for _ in range(n)]
        c.busy = True
        took = self._service[n]
        self._at(now + took, BATCH_DONE, (rep, batch, took))

    def _batch_done(self, rep: Any, batch: list, took: float, now: float) -> None:
        c = rep.data
        c.busy = False
        c.load.batch(len(batch), took)
        for call in batch:
            call.remaining -= 1
            if call.remaining == 0:
                c.ongoing_calls -= 1
                c.load.images_in_flight -= call.n
                self._call_done(call, now)
        self._maybe_batch(rep, now)
        self._route_calls(now)

    def _call_done(self, call: _Call, now: float) -> None:
        d = call.ingress.data
        d.in_flight -= 1
        d.ongoing -= call.n
        for req in call.reqs:
            self._finish(req, now, 200)
        self._dispatch(call.ingress, now)
        self._drain_proxy(now)

    def _drain_proxy(self, now: float) -> None:
        while self.proxy_queue:
            ing = self._route_ingress()
            if ing is None:
                return
            self._ingress_accept(ing, self.proxy_queue.popleft(), now)

    def _finish(self, req: _Req, now: float, status: int) -> None:
        req.status, req.end = status, now
        if req.user >= 0:
            if req.user in self.users_stopping:
                self.users_stopping.discard(req.user)
                self.users_active.discard(req.user)
            elif req.user in self.users_active:
                self._at(now + self.load.wait_s, WAKE, req.user)

    # ---- closed loop users (Locust's shape, evaluated every second)
    def _set_users(self, now: float, wanted: int) -> None:
        have = len(self.users_active) - len(self.users_stopping)
        if wanted > have:
            for i in range(wanted - have):
                user = self.next_user
                self.next_user += 1
                self.users_active.add(user)
                self._at(now + i / SPAWN_RATE, WAKE, user)
        elif wanted < have:
            live = sorted(self.users_active - self.users_stopping, reverse=True)
            for user in live[:have - wanted]:
                self.users_stopping.add(user)

    def _wake(self, user: int, now: float) -> None:
        if user in self.users_stopping:  # stopped while thinking
            self.users_stopping.discard(user)
            self.users_active.discard(user)
            return
        if user in self.users_active and now < self.duration_s:
            self._arrive(now, user)

    # ---- the controller's loop
    def _tick(self, now: float) -> None:
        ctrl = self.ctrl
        for name, pool in ctrl.pools.items():
            for r in pool.promote(now):
                self._attach(name, r)
            pool.finish_stopping(now, lambda r, n=name: self._idle(n, r))
        self._route_calls(now)
        self._drain_proxy(now)
        self._record(now)
        if self._ticks % self._every == 0:
            ctrl.decide(now)
        self._ticks += 1
        for name, pool in ctrl.pools.items():
            for r in pool.replicas:
                self._attach(name, r)
        # a replica that was stopped leaves the routers; its queue drains where it is

    def _idle(self, name: str, r: Any) -> bool:
        if name == topology.CLASSIFIER:
            return r.data.ongoing_calls == 0 and not r.data.busy
        if name == topology.INGRESS:
            return r.data.ongoing == 0
        return self.pre_calls.get(r.rid, 0) <= 0

    def _record(self, now: float) -> None:
        """Samples and pushes due now, at the handles and the running replicas."""
        ctrl = self.ctrl
        for name, pool in ctrl.pools.items():
            h = pool.handle
            if h.record_due(now):
                h.record(now, self._handle_point(name, pool))
            if h.push_due(now):
                ctrl.push_handle(name, now)
            for r in pool.replicas:
                if r.state != RUNNING or r.source is None:
                    continue
                if r.source.record_due(now):
                    r.source.record(now, self._replica_point(name, r))
                if r.source.push_due(now):
                    ctrl.push_replica(name, r, now)

    def _handle_point(self, name: str, pool: Any) -> dict:
        running = pool.running()
        if name == topology.CLASSIFIER:
            point = {"queued": float(len(self.handle_queue))}
            point.update({("running", r.rid): float(r.data.ongoing_calls) for r in running})
        elif name == topology.INGRESS:
            point = {"queued": float(len(self.proxy_queue))}
            point.update({("running", r.rid): float(r.data.ongoing) for r in running})
        else:
            point = {"queued": 0.0}
            point.update({("running", r.rid): float(self.pre_calls.get(r.rid, 0))
                          for r in running})
        return point

    def _replica_point(self, name: str, r: Any) -> dict:
        if name == topology.CLASSIFIER:
            return r.data.load.report(self.batch_max)
        if name == topology.INGRESS:
            q = float(len(r.data.pending))
            return {policy_keys.IMAGES_QUEUED: q,
                    policy_keys.images_queued_key(topology.CLASSIFIER): q,
                    policy_keys.images_offered_key(topology.CLASSIFIER): r.data.offered.rate()}
        return {topology.FEEDS + topology.CLASSIFIER: 1.0}

    def _sample(self, t: float) -> None:
        counts = {}
        for name, pool in self.ctrl.pools.items():
            counts[name] = DeploymentReplicas(
                target=pool.target, running=pool.count(RUNNING),
                starting=pool.count("STARTING"), stopping=pool.count(STOPPING))
        self.samples.append((t, counts))

    # ---- run
    def run(self) -> "DesResult":
        dt = self.s.control_period_s
        load = self.load
        arrivals_t: np.ndarray = np.empty(0)
        if not load.closed:
            arrivals_t = arrivals.poisson_times(self.np_rng, load.rates, dt)
            arrivals_t = arrivals_t[arrivals_t < self.duration_s]
        ai = 0
        n_ticks = int(round(self.end_s / dt)) + 1
        with sim_time(self.clock):
            for k in range(n_ticks):
                t_tick = k * dt
                while True:
                    nxt_event = self.events[0][0] if self.events else float("inf")
                    nxt_arr = arrivals_t[ai] if ai < len(arrivals_t) else float("inf")
                    nxt = min(nxt_event, nxt_arr)
                    if nxt > t_tick:
                        break
                    self.clock.now = nxt
                    if nxt_arr <= nxt_event:
                        ai += 1
                        self._arrive(float(nxt_arr))
                        continue
                    _, _, kind, payload = heapq.heappop(self.events)
                    if kind == PRE_DONE:
                        self._pre_done(payload, nxt)
                    elif kind == BATCH_DONE:
                        self._batch_done(payload[0], payload[1], payload[2], nxt)
                    elif kind == BATCH_TIMER:
                        payload.data.timer_armed = False
                        self._maybe_batch(payload, nxt, timer=True)
                    elif kind == WAKE:
                        self._wake(payload, nxt)
                self.clock.now = t_tick
                if load.closed and abs(t_tick - round(t_tick)) < 1e-9:
                    users = load.profile.users_at(t_tick)
                    self._set_users(t_tick, users if users is not None else 0)
                self._tick(t_tick)
                if abs(t_tick - round(t_tick)) < 1e-9:
                    self._sample(float(round(t_tick)))
        requests = [Request(r.start, (r.end - r.start), r.status, NAME) for r in self.reqs
                    if r.status]
        unfinished = sum(1 for r in self.reqs if not r.status)
        return DesResult(requests, self.samples, unfinished, self.ctrl.decisions)


@dataclass
class DesResult:
    requests: list
    samples: list
    unfinished: int
    decisions: int
