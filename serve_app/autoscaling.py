"""Batch-aware autoscaling for serve_app, selected from the Serve config.

Ray's default policy divides ongoing requests by ``target_ongoing_requests``, a number the user
must guess. With ``@serve.batch`` the right number follows from what a replica can actually
serve: one full batch at least (scaling out before batches fill only makes them smaller), and
as many requests as its measured throughput clears within the latency target (Little's law).
The classifier reports its batch size, batch fill and batch latency through
``record_autoscaling_stats``; Ray hands them to the policy per replica, raw and as window means.

Load is counted in images, not calls: the ingress sends the images of concurrent requests as
one call (serve_app/batching.py), so the Classifier reports the images it holds and the Ingress
the images queued for a call slot; Ray's request count is the fallback before any report.
Under that count lies a floor from the rate: the images/s offered to the ingress (refused ones
included) over what one replica clears at a full batch (:func:`rate_replicas`), so demand
that no bounded queue holds is still seen.

Two entry points, both classes so ``policy_kwargs`` in the YAML reach them:

* ``serve_app.autoscaling:BatchAwarePolicy``: a deployment policy for the Classifier.
* ``serve_app.autoscaling:AppPolicy``: an application policy: each Classifier as above, each
  Preprocessor in proportion to the classifiers it feeds, the Ingress on its own CPU
  (:func:`ingress_replicas`).

Every deployment keeps its target while replicas are starting (:func:`hold_while_starting`),
so a replica is never removed sooner than ``downscale_delay_s`` after it became ready.

Ray wraps either one: ``upscale_delay_s``/``downscale_delay_s`` and the scaling factors of each
deployment's ``autoscaling_config`` still apply, and the result is bounded by min/max replicas.
The arithmetic lives in pure functions below, tested without Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from serve_app import topology
# Keys of the classifiers' record_autoscaling_stats (serve_app/batch_stats.py).
from serve_app.batch_stats import (BATCH_FILL, BATCH_LATENCY_S, FULL_BATCH_THROUGHPUT,
                                   IMAGES_IN_FLIGHT, MAX_BATCH_SIZE)

# Keys of Ingress.record_autoscaling_stats (serve_app/gateway.py): the images queued for a call
# slot in all, and per classifier deployment as ``images_queued/<deployment>``.
IMAGES_QUEUED = "images_queued"
#: The images/s the Ingress is offered for a classifier, refused ones included:
#: ``images_offered_per_s/<deployment>``.
IMAGES_OFFERED = "images_offered_per_s"
#: The CPU-seconds per second an Ingress replica's process spent since its last report.
INGRESS_CPU = "cpu_per_s"


def images_queued_key(classifier: str) -> str:
    return f"{IMAGES_QUEUED}/{classifier}"


def images_offered_key(classifier: str) -> str:
    return f"{IMAGES_OFFERED}/{classifier}"


@dataclass(frozen=True)
class BatchSignals:
    """What the classifier replicas reported, averaged across them (None: not reported yet)."""

    max_batch_size: Optional[int]
    throughput_per_replica: Optional[float]  # images/s one replica clears at its current fill
    full_batch_throughput: Optional[float] = None  # images/s one replica clears at a full batch


def _latest(series: Any) -> Optional[float]:
    """The newest value of a Ray TimeSeries (a list of TimeStampedValue), if any."""
    if not series:
        return None
    return max(series, key=lambda point: point.timestamp).value


def batch_signals(metrics: Optional[Mapping[str, Mapping[Any, float]]],
                  raw: Optional[Mapping[str, Mapping[Any, Any]]] = None) -> BatchSignals:
    """Combine per-replica custom metrics ({metric: {replica_id: window value}}).

    Throughput uses each replica's newest report when ``raw`` has one: a load step changes the
    batch fill within one batch, while the window mean over ``look_back_period_s`` still
    describes the light load before it. On a CPU, where a full batch costs more per image than
    a small one, that stale mean overestimates capacity and the first scale-up comes out too
    small. Ray's ``upscale_delay_s`` still filters a single noisy report.
    """
    metrics = metrics or {}
    raw = raw or {}
    sizes = [v for v in (metrics.get(MAX_BATCH_SIZE) or {}).values() if v and v > 0]
    rates = []
    replicas = set(metrics.get(BATCH_FILL) or {}) | set(raw.get(BATCH_FILL) or {})
    for r in replicas:
        fill = _latest((raw.get(BATCH_FILL) or {}).get(r))
        latency = _latest((raw.get(BATCH_LATENCY_S) or {}).get(r))
        if fill is None or latency is None:
            fill = (metrics.get(BATCH_FILL) or {}).get(r)
            latency = (metrics.get(BATCH_LATENCY_S) or {}).get(r)
        if fill and latency and fill > 0 and latency > 0:
            rates.append(fill / latency)
    full = [v for v in (_latest(series) for series in (raw.get(FULL_BATCH_THROUGHPUT) or {})
                        .values()) if v and v > 0]
    if not full:
        full = [v for v in (metrics.get(FULL_BATCH_THROUGHPUT) or {}).values() if v and v > 0]
    return BatchSignals(
        max_batch_size=int(max(sizes)) if sizes else None,
        throughput_per_replica=sum(rates) / len(rates) if rates else None,
        # The best-informed replica's: one that ran only small batches extrapolates as if
        # batching gained nothing (serve_app/batch_stats.py), which kept a load that had ended
        # at 3-8 replicas for a minute (a simulated step: scale-down 72 s instead of 19).
        full_batch_throughput=max(full) if full else None,
    )


def rate_replicas(offered_per_s: Optional[float], full_batch_throughput: Optional[float],
                  utilization_target: float) -> float:
    """Replicas the arriving images need: the rate offered over what one replica clears at a
    full batch, kept ``utilization_target`` full (Little's law on the rate, not the queue).

    Queues alone miss demand on a fast accelerator: its replicas hold few images, and what
    the bounded queues refuse is in no queue. In a simulated day at 5,000 req/s (8 + 0.5n ms
    per batch) this policy cycled 1 -> 7 -> 1 replicas and refused 22% of the requests until
    the rate counted (docs/autoscaling.md). 0 while either is unknown.
    """
    if not offered_per_s or not full_batch_throughput or offered_per_s <= 0:
        return 0.0
    return offered_per_s / (full_batch_throughput * utilization_target)


def reported_sum(metrics: Optional[Mapping[str, Mapping[Any, float]]], key: str) -> Optional[float]:
    """``key``'s window mean summed over replicas; None when no replica reported it."""
    values = [v for v in ((metrics or {}).get(key) or {}).values() if v is not None]
    return float(sum(values)) if values else None


def latest_sum(raw: Optional[Mapping[str, Mapping[Any, Any]]], key: str) -> Optional[float]:
    """``key``'s newest reported value summed over replicas; None when none reported it. For a
    rate, whose window mean over ``look_back_period_s`` (30 s by Ray's default) lags a change
    by that long: kept replicas up half a minute after a load ended."""
    values = [v for v in (_latest(series) for series in ((raw or {}).get(key) or {}).values())
              if v is not None]
    return float(sum(values)) if values else None


def classifier_load(total_requests: float, images_in_flight: Optional[float],
                    images_queued: Optional[float] = None) -> float:
    """Images waiting for or inside the classifier replicas.

    A call carries a group of images, so Ray's request count (calls) understates the load; the
    replicas' own count is used once reported, and never less than the calls. Images queued in
    the ingress for a free call slot count too: that queue is where an overload shows first.
    """
    load = max(total_requests, images_in_flight or 0.0)
    return load + (images_queued or 0.0)


def replica_capacity(signals: BatchSignals, latency_target_s: float, fallback: float) -> float:
    """Requests (running + queued) one replica should carry.

    ``throughput * latency_target_s`` is how many requests a replica can hold and still answer
    each within the target (Little's law); never less than one full batch. Before any replica
    has reported, ``fallback`` (the deployment's ``target_ongoing_requests``) is used.
    """
    if signals.max_batch_size is None:
        return float(fallback)
    floor = float(signals.max_batch_size)
    if signals.throughput_per_replica is None:
        return floor
    return max(floor, signals.throughput_per_replica * latency_target_s)


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def desired_replicas(total_requests: float, current: int, capacity: float,
                     min_replicas: int, max_replicas: int,
                     downscale_headroom: float = 0.8, rate_needed: float = 0.0) -> int:
    """Replicas for ``total_requests`` at ``capacity`` each, with a hold band.

    Up as soon as the load exceeds what ``current`` replicas carry; down only once one replica
    fewer would run at most ``downscale_headroom`` full, so a load hovering near a boundary does
    not flap between two counts (Ray's default rounds up both ways and does).
    ``rate_needed`` (:func:`rate_replicas`, which has its headroom in its utilization target)
    is a floor under the result, rounded up: no second band on it.
    """
    if capacity <= 0:
        raise ValueError("capacity must be positive")
    needed = max(0.0, total_requests) / capacity
    if current <= 0:
        desired = math.ceil(needed)
    elif needed > current:
        desired = math.ceil(needed)
    elif needed <= (current - 1) * downscale_headroom:
        desired = max(1, math.ceil(needed / downscale_headroom)) if needed > 0 else 0
    else:
        desired = current
    return clamp(max(desired, math.ceil(rate_needed - 1e-9)), min_replicas, max_replicas)


def queue_length_replicas(total_requests: float, target_ongoing: float, current: int,
                          target_replicas: int, min_replicas: int, max_replicas: int) -> int:
    """Ray's default rule (total / target_ongoing_requests, rounded up), bounded."""
    if current == 0:
        return clamp(target_replicas, min_replicas, max_replicas)
    return clamp(math.ceil(max(0.0, total_requests) / target_ongoing), min_replicas, max_replicas)


def ingress_replicas(cpu_per_s: Optional[float], target: float, current: int, min_replicas: int,
                     max_replicas: int, downscale_headroom: float) -> Optional[int]:
    """Ingress replicas for the CPU its replicas spend (summed), ``target`` CPU-s/s each, with
    :func:`desired_replicas`'s hold band; None before any report (then Ray's rule applies).

    The Ingress's ongoing requests are mostly waiting on the models (queued for a call slot,
    or in a call), so Ray's count rose past ``target_ongoing_requests`` under any overload of
    the classifiers and added an Ingress that could only take CPU from them: at 3x capacity the
    second one started 7.6 s in, and refusals then took 0.2-0.35 s for 10 s (the HAProxy
    reload, the new replica's start) against 2-5 ms otherwise. An event loop near a core of
    CPU is what another replica relieves.
    """
    if cpu_per_s is None:
        return None
    return desired_replicas(cpu_per_s, current, target, min_replicas, max_replicas,
                            downscale_headroom)


#: Policy-state key: when the deployment last began having replicas that are not running yet.
STARTING_SINCE = "starting_since"


def hold_while_starting(desired: int, target: int, running: int, starting_since: Optional[float],
                        now: float, limit_s: float) -> tuple[int, Optional[float]]:
    """Keep the target while replicas are still starting; returns (desired, starting_since).

    Ray times ``downscale_delay_s`` from the first lower decision, even one made while the
    replica it will remove is still loading: a load that ended during a start removed the
    new replica 9 s after it became ready, with a 30 s delay. Holding until every replica runs
    makes the delay count from readiness, so no replica lives less than it. ``limit_s`` bounds
    the hold for a replica that never starts (no resources for it).
    """
    if running >= target:
        return desired, None
    starting_since = now if starting_since is None else starting_since
    if desired < target and now - starting_since < limit_s:
        desired = target
    return desired, starting_since


def _hold(ctx: Any, desired: int, state: dict[str, Any], limit_s: float) -> int:
    """:func:`hold_while_starting` on a Ray AutoscalingContext, its clock in the policy state."""
    now = ctx.current_time if ctx.current_time is not None else time.time()
    held, since = hold_while_starting(desired, ctx.target_num_replicas,
                                      ctx.current_num_replicas,
                                      (ctx.policy_state or {}).get(STARTING_SINCE), now, limit_s)
    state[STARTING_SINCE] = since
    return held


def _check(latency_target_s: float, downscale_headroom: float,
           utilization_target: float = 0.8) -> None:
    if not 0 < utilization_target <= 1:
        raise ValueError(f"utilization_target must be in (0, 1], got {utilization_target}")
    if latency_target_s <= 0:
        raise ValueError(f"latency_target_s must be > 0, got {latency_target_s}")
    if not 0 < downscale_headroom <= 1:
        raise ValueError(f"downscale_headroom must be in (0, 1], got {downscale_headroom}")


class BatchAwarePolicy:
    """Deployment policy for a ``@serve.batch`` deployment that reports batch stats.

    kwargs (``policy_kwargs``): ``latency_target_s``, the end-to-end wait a request may spend in
    one replica; ``downscale_headroom``, how full the remaining replicas may be after a scale-down;
    ``utilization_target``, how busy the images offered may keep replicas at full batches
    (:func:`rate_replicas`).
    """

    def __init__(self, latency_target_s: float = 1.0, downscale_headroom: float = 0.8,
                 start_hold_limit_s: float = 300.0, utilization_target: float = 0.8):
        _check(latency_target_s, downscale_headroom, utilization_target)
        self.latency_target_s = latency_target_s
        self.downscale_headroom = downscale_headroom
        self.start_hold_limit_s = start_hold_limit_s
        self.utilization_target = utilization_target

    def decide(self, ctx: Any, images_queued: Optional[float] = None,
               offered_per_s: Optional[float] = None) -> tuple[int, dict[str, Any]]:
        """``images_queued``: images waiting upstream (the ingress's queue), when known;
        ``offered_per_s``: the images/s the ingress is offered for this deployment."""
        signals = batch_signals(ctx.aggregated_metrics, ctx.raw_metrics)
        capacity = replica_capacity(signals, self.latency_target_s,
                                    ctx.config.get_target_ongoing_requests())
        load = classifier_load(ctx.total_num_requests,
                               reported_sum(ctx.aggregated_metrics, IMAGES_IN_FLIGHT),
                               images_queued)
        by_rate = rate_replicas(offered_per_s, signals.full_batch_throughput,
                                self.utilization_target)
        desired = desired_replicas(load, ctx.current_num_replicas, capacity,
                                   ctx.capacity_adjusted_min_replicas,
                                   ctx.capacity_adjusted_max_replicas, self.downscale_headroom,
                                   by_rate)
        # Kept in the policy state: visible in the controller log when debugging a decision.
        state = {"capacity": round(capacity, 2), "load": round(load, 2),
                 "by_rate": round(by_rate, 2)}
        state["desired"] = desired = _hold(ctx, desired, state, self.start_hold_limit_s)
        return desired, state

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return self.decide(ctx)


class AppPolicy:
    """Application policy for serve_app's deployments (serve_app/topology.py).

    Each Classifier (one per model) scales with :class:`BatchAwarePolicy`, counting the images
    queued for it in the Ingress as well as its own. A Preprocessor gets at least
    ``preprocessors_per_classifier`` replicas per replica of the classifiers it feeds (rounded
    up), so image decoding keeps pace with the models before its own queue builds; its queue
    still raises it. The Ingress scales on its own CPU, ``ingress_cpu_target`` CPU-seconds per
    second per replica (:func:`ingress_replicas`). Any other deployment, and the Ingress before
    it reports, follows Ray's default rule.
    """

    def __init__(self, latency_target_s: float = 1.0, downscale_headroom: float = 0.8,
                 preprocessors_per_classifier: float = 0.5, start_hold_limit_s: float = 300.0,
                 utilization_target: float = 0.8, ingress_cpu_target: float = 0.7):
        if preprocessors_per_classifier < 0:
            raise ValueError("preprocessors_per_classifier must be >= 0")
        if ingress_cpu_target <= 0:
            raise ValueError(f"ingress_cpu_target must be > 0, got {ingress_cpu_target}")
        self.ingress_cpu_target = ingress_cpu_target
        self.classifier = BatchAwarePolicy(latency_target_s, downscale_headroom,
                                           start_hold_limit_s, utilization_target)
        self.preprocessors_per_classifier = preprocessors_per_classifier

    def __call__(self, contexts: Mapping[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict]]:
        decisions: dict[Any, int] = {}
        states: dict[Any, dict] = {}
        classifiers: dict[str, int] = {}  # classifier deployment name -> decided replicas
        ingress_metrics: Optional[Mapping] = None
        ingress_raw: Optional[Mapping] = None
        for dep_id, ctx in contexts.items():
            if topology.role(dep_id.name) == topology.INGRESS:
                ingress_metrics, ingress_raw = ctx.aggregated_metrics, ctx.raw_metrics
        for dep_id, ctx in contexts.items():
            if topology.role(dep_id.name) == topology.CLASSIFIER:
                queued = reported_sum(ingress_metrics, images_queued_key(dep_id.name))
                if queued is None and dep_id.name == topology.CLASSIFIER:
                    queued = reported_sum(ingress_metrics, IMAGES_QUEUED)
                offered = latest_sum(ingress_raw, images_offered_key(dep_id.name))
                decisions[dep_id], states[dep_id] = self.classifier.decide(ctx, queued, offered)
                classifiers[dep_id.name] = decisions[dep_id]
        for dep_id, ctx in contexts.items():
            if dep_id in decisions:
                continue
            desired = None
            if topology.role(dep_id.name) == topology.INGRESS:
                desired = ingress_replicas(
                    reported_sum(ctx.aggregated_metrics, INGRESS_CPU), self.ingress_cpu_target,
                    ctx.current_num_replicas, ctx.capacity_adjusted_min_replicas,
                    ctx.capacity_adjusted_max_replicas, self.classifier.downscale_headroom)
            if desired is None:
                desired = queue_length_replicas(
                    ctx.total_num_requests, ctx.config.get_target_ongoing_requests(),
                    ctx.current_num_replicas, ctx.target_num_replicas,
                    ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
            if topology.role(dep_id.name) == topology.PREPROCESSOR:
                fed = [classifiers[c] for c in
                       topology.preprocessor_feeds(dep_id.name, ctx.aggregated_metrics)
                       if c in classifiers]
                if fed:
                    floor = math.ceil(self.preprocessors_per_classifier * sum(fed))
                    desired = clamp(max(desired, floor), ctx.capacity_adjusted_min_replicas,
                                    ctx.capacity_adjusted_max_replicas)
            states[dep_id] = {}
            decisions[dep_id] = states[dep_id]["desired"] = _hold(
                ctx, desired, states[dep_id], self.classifier.start_hold_limit_s)
        return decisions, states
