"""serve_app/batch_stats.py: what a classifier replica reports to the policy, and the ingress's
offered rate; and the policy's rate term (serve_app.autoscaling.rate_replicas) that reads them."""

import pytest

from serve_app import autoscaling
from serve_app.batch_stats import (BATCH_FILL, BATCH_LATENCY_S, FULL_BATCH_THROUGHPUT,
                                   BatchCounter, RateMeter, full_batch_latency)
from tests.unit.test_autoscaling_policy import APP, context, reported


def test_full_batch_latency_measured_fitted_or_assumed_linear():
    assert full_batch_latency({1: 0.010, 32: 0.024}, 32) == 0.024  # measured
    # 8 + 0.5n ms seen at 2 and 6 images: the line gives 24 ms at 32.
    assert full_batch_latency({2: 0.009, 6: 0.011}, 32) == pytest.approx(0.024)
    assert full_batch_latency({4: 0.040}, 8) == pytest.approx(0.080)  # one size: no gain
    # A noisy fit never says a full batch is quicker than the slowest batch seen.
    assert full_batch_latency({2: 0.050, 4: 0.030}, 8) == 0.050
    with pytest.raises(ValueError):
        full_batch_latency({}, 8)


def test_counter_reports_fill_latency_and_full_batch_throughput():
    counter = BatchCounter()
    assert counter.report(8) == {"max_batch_size": 8.0, "images_in_flight": 0.0}
    counter.batch(2, 0.30)
    counter.batch(4, 0.40)  # t(n) = 0.2 + 0.05 n: 8 images in 0.6 s
    counter.images_in_flight = 5
    first = counter.report(8)
    assert first[BATCH_FILL] == 3 and first[BATCH_LATENCY_S] == pytest.approx(0.35)
    assert first[FULL_BATCH_THROUGHPUT] == pytest.approx(8 / 0.6)
    assert first["images_in_flight"] == 5
    assert counter.report(8)[BATCH_FILL] == 3  # no batch since: the last values again
    counter.batch(4, 0.50)  # a batch size's latency is a moving average, not the last one
    assert counter.latency_by_size[4] == pytest.approx(0.42)


def test_rate_meter_counts_per_second_between_reads():
    now = [0.0]
    meter = RateMeter(lambda: now[0])
    assert meter.rate() == 0.0
    meter.add(30)
    now[0] = 2.0
    assert meter.rate() == 15.0
    now[0] = 3.0
    assert meter.rate() == 0.0
    assert meter.rate() == 0.0  # no time passed: the last rate


def test_rate_meter_of_a_running_total_gives_cpu_seconds_per_second():
    """The Ingress's own load: its process's CPU time over wall time between reports."""
    now, cpu = [0.0], [10.0]
    meter = RateMeter(lambda: now[0], total=lambda: cpu[0])
    assert meter.rate() == 0.0
    now[0], cpu[0] = 2.0, 11.5
    assert meter.rate() == pytest.approx(0.75)
    meter.add(100)  # the count plays no part
    now[0], cpu[0] = 4.0, 11.5
    assert meter.rate() == 0.0


def test_rate_term_sizes_for_demand_no_queue_holds():
    """A fast replica (1333 images/s at a full batch of 32) holds few images, so the queues say
    one replica is plenty at 5000 images/s offered; the rate says 5000 / (1333 * 0.8) = 4.7."""
    assert autoscaling.rate_replicas(5000, 1333.3, 0.8) == pytest.approx(4.69, abs=0.01)
    assert autoscaling.rate_replicas(None, 1333.3, 0.8) == 0.0
    assert autoscaling.rate_replicas(5000, None, 0.8) == 0.0
    metrics = {**reported(batch=32, fill=8, latency_s=0.012),
               FULL_BATCH_THROUGHPUT: {"r0": 1333.3},
               autoscaling.IMAGES_IN_FLIGHT: {"r0": 40.0}}
    ctx = context(total=4, current=1, metrics=metrics, max_replicas=10)
    assert _decide(ctx, None) == 1
    assert _decide(ctx, 5000.0) == 5
    with pytest.raises(ValueError):
        autoscaling.BatchAwarePolicy(utilization_target=0)


def test_the_rate_floor_has_no_band_of_its_own():
    """The queue count keeps a hold band; the rate term (its headroom is its utilization
    target) rounds up and lets go as soon as one replica fewer is enough."""
    assert autoscaling.desired_replicas(3, 2, 8, 1, 8, rate_needed=0.9) == 1
    assert autoscaling.desired_replicas(3, 2, 8, 1, 8, rate_needed=1.2) == 2
    assert autoscaling.desired_replicas(14, 2, 8, 1, 8, rate_needed=0.5) == 2  # the band holds
    assert autoscaling.desired_replicas(3, 1, 8, 1, 4, rate_needed=9.0) == 4  # max_replicas


def _decide(ctx, offered):
    return autoscaling.BatchAwarePolicy(latency_target_s=0.5).decide(ctx, None, offered)[0]


def test_app_policy_reads_the_rate_the_ingress_reports():
    from ray.serve._private.common import DeploymentID, TimeStampedValue

    classifier = {**reported(batch=32, fill=8, latency_s=0.012),
                  FULL_BATCH_THROUGHPUT: {"r0": 1333.3}}
    # The newest report of each ingress replica counts, not the window mean (which lags by the
    # Ingress's look_back_period_s, 30 s by Ray's default).
    key = autoscaling.images_offered_key("Classifier")
    window = {key: {"i0": 300.0, "i1": 300.0}}
    raw = {key: {r: [TimeStampedValue(1.0, 100.0), TimeStampedValue(2.0, 2500.0)]
                 for r in ("i0", "i1")}}
    contexts = {
        DeploymentID("Ingress", APP): context("Ingress", total=2, current=2, metrics=window,
                                              raw=raw),
        DeploymentID("Classifier", APP): context(total=4, current=1, metrics=classifier,
                                                 max_replicas=10),
    }
    decisions, states = autoscaling.AppPolicy(latency_target_s=0.5)(contexts)
    assert decisions[DeploymentID("Classifier", APP)] == 5
    assert states[DeploymentID("Classifier", APP)]["by_rate"] == pytest.approx(4.69, abs=0.01)
