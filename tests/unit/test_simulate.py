"""The simulator (load_tests/simulate.py): queueing theory, Ray's autoscaling rules, policies.

No Ray cluster: Ray's autoscaling state and policy wrappers run on a simulated clock.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter

import pytest
from ray.serve._private.autoscaling_state import DeploymentAutoscalingState
from ray.serve._private.common import DeploymentID, TimeStampedValue
from ray.serve.config import AutoscalingConfig

from load_tests import timeline
from load_tests.simulate import main, simulate
from load_tests.simulation import controller
from load_tests.simulation.settings import PolicySpec, from_config
from serve_app.config import SimulatedModelConfig
from serve_app.simulated import load_profile

from tests.conftest import CONFIGS

class StubPolicy:
    """A deployment policy that wants ``first`` replicas, then ``then`` from ``switch_s``
    seconds into the run (Ray pickles policies by value, so it reports through its state)."""

    def __init__(self, first: int = 2, then: int = 4, switch_s: float = 20.0):
        self.first, self.then, self.switch_s = first, then, switch_s

    def __call__(self, ctx):
        t = ctx.current_time - controller.EPOCH
        calls = ctx.policy_state.get("calls", 0) + 1
        return (self.first if t < self.switch_s else self.then), {"calls": calls}


def config(classifier: dict | None = None, *, batch: int = 8, dispatch: dict | None = None,
           max_ongoing: int = 32, app_policy: dict | None = None) -> dict:
    """A serve_app Serve config as configfile.load returns it."""
    app = {
        "name": "serve_app", "import_path": "serve_app.app:build_app",
        "args": {"model": {"name": "simulated",
                           "simulated": {"base_ms": 20, "per_image_ms": 5, "start_s": 5}},
                 "dispatch": {"max_batch_size": 16, "max_in_flight": 64, "max_queued": 10_000,
                              **(dispatch or {})}},
        "deployments": [
            {"name": "Ingress", "max_ongoing_requests": 100_000,
             "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
            {"name": "Preprocessor", "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
            {"name": "Classifier", "max_ongoing_requests": max_ongoing,
             "user_config": {"max_batch_size": batch, "batch_wait_timeout_s": 0},
             "autoscaling_config": {"min_replicas": 1, "max_replicas": 1,
                                    "metrics_interval_s": 1, "look_back_period_s": 5,
                                    "upscale_delay_s": 2, "downscale_delay_s": 15,
                                    **(classifier or {})}},
        ],
    }
    if app_policy:
        app["autoscaling_policy"] = app_policy
    return {"applications": [app]}


def settings(cfg: dict, **kw):
    kw.setdefault("preprocess_ms", 0.0)
    return from_config(cfg, **kw)


# ---- queueing theory -------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_single_replica_batch_one_matches_md1(rho):
    """Poisson arrivals, one replica, batches of 1, a deterministic 10 ms service:
    the mean wait is M/D/1's W_q = rho / (2 mu (1 - rho))."""
    mu = 100.0
    s = settings(config(batch=1, dispatch={"max_batch_size": 1, "max_in_flight": 1000}),
                 profile=SimulatedModelConfig(service_ms={1: 1000.0 / mu}),
                 policy=PolicySpec("default"))
    out = simulate(s, "step", 1500, closed=False, base=rho * mu, peak=rho * mu, seed=1,
                   mode="exact", settle_s=5)
    waits = [r.latency_s - 1 / mu for r in out.requests if r.ok and r.start > 20]
    expected = rho / (2 * mu * (1 - rho))
    measured = sum(waits) / len(waits)
    assert measured == pytest.approx(expected, rel=0.05), (measured, expected)


def test_closed_loop_obeys_littles_law():
    """N users, each waiting Z between answers: throughput = N / (R + Z)."""
    s = settings(config(), profile=load_profile("20+5n"), policy=PolicySpec("default"))
    users, think = 12, 0.1
    out = simulate(s, "step", 200, closed=True, base=users, peak=users, wait_s=think, seed=3,
                   mode="exact", settle_s=0)
    window = [r for r in out.requests if 20 <= r.start < 180]
    throughput = len(window) / 160
    response = sum(r.latency_s for r in window) / len(window)
    assert throughput == pytest.approx(users / (response + think), rel=0.03)


# ---- Ray's autoscaling rules -----------------------------------------------------------------

def _first(samples, test, after=0.0):
    return next((t for t, c in samples if t >= after and test(c["Classifier"])), None)


def test_max_replicas_caps_a_load_that_needs_more():
    """~10 replicas' worth of load, max_replicas 3: three run, never more."""
    s = settings(config({"max_replicas": 3, "target_ongoing_requests": 1}, batch=1,
                        dispatch={"max_batch_size": 1}),
                 profile=SimulatedModelConfig(service_ms={1: 100.0}),
                 policy=PolicySpec("default"))
    out = simulate(s, "step", 80, closed=False, base=100, peak=100, mode="exact", settle_s=0)
    assert out.summary["max_replicas_seen"]["Classifier"] == 3
    assert max(c["Classifier"].target for _, c in out.samples) == 3


def test_upscale_and_downscale_wait_their_delays():
    s = settings(config({"max_replicas": 4, "upscale_delay_s": 6, "downscale_delay_s": 20,
                         "target_ongoing_requests": 2}),
                 profile=load_profile("20+5n"), policy=PolicySpec("default"))
    out = simulate(s, "step", 120, closed=True, base=1, peak=40, seed=0, mode="exact",
                   settle_s=40)
    rise, end = out.profile.rises[0], out.profile.load_end_s
    up = _first(out.samples, lambda c: c.target > 1)
    assert up is not None and up >= rise + 6
    top = max(c["Classifier"].target for _, c in out.samples)
    assert top > 1
    down = _first(out.samples, lambda c: c.target < top, after=end)
    assert down is not None and down >= end + 20
    assert out.summary["max_replicas_seen"]["Classifier"] <= 4
    assert min(c["Classifier"].running for _, c in out.samples) >= 1  # min_replicas


def test_min_replicas_holds_without_load():
    s = settings(config({"min_replicas": 2, "max_replicas": 5}), profile=load_profile("20+5n"),
                 policy=PolicySpec("default"))
    out = simulate(s, "step", 60, closed=False, base=0, peak=1, mode="exact", settle_s=30)
    assert all(c["Classifier"].running == 2 for t, c in out.samples if t > 0)


# ---- determinism, policies -------------------------------------------------------------------

def _summary(seed):
    s = settings(config({"max_replicas": 3}), profile=load_profile("50+25n"),
                 policy=PolicySpec("serve_app.autoscaling:AppPolicy",
                                   {"latency_target_s": 0.5}, "app"))
    out = simulate(s, "spike", 60, closed=False, base=5, peak=60, seed=seed, mode="exact")
    return {k: v for k, v in out.summary.items() if k != "sim_wall_s"}


def test_same_seed_same_summary_other_seed_differs():
    first, again, other = _summary(0), _summary(0), _summary(1)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert json.dumps(first, sort_keys=True) != json.dumps(other, sort_keys=True)
    assert set(timeline.SUMMARY_KEYS) <= set(first)


def _r(value):
    return None if value is None else round(value, 1)


def _reference_timeline(requests: list, samples: list, profile, end_s: float):
    """timeline.build_timeline as it was before bisection: every request per second."""
    deployments = timeline.deployments_of(samples)
    columns = list(timeline.BASE_COLUMNS[:2])
    for name in deployments:
        columns += [f"{name}_target", f"{name}_running"]
    columns += list(timeline.BASE_COLUMNS[2:])
    by_end = sorted(requests, key=lambda r: r.end)
    rows = []
    for second in range(int(math.ceil(end_s)) + 1):
        t = float(second)
        counts = timeline._sample_at(samples, t) or {}
        finished = [r for r in by_end if t - 1 < r.end <= t]
        window = [r.latency_s * 1000 for r in by_end if t - timeline.PERCENTILE_WINDOW_S < r.end <= t]
        errors = Counter(r.status for r in finished if not r.ok)
        row: dict = {"t_s": second, "users": profile.users_at(t) or 0}
        for name in deployments:
            c = counts.get(name)
            row[f"{name}_target"] = c.target if c else ""
            row[f"{name}_running"] = c.running if c else ""
        row.update(
            rps=len(finished),
            p50_ms=_r(timeline.percentile(window, 50)),
            p95_ms=_r(timeline.percentile(window, 95)),
            p99_ms=_r(timeline.percentile(window, 99)),
            ongoing=sum(1 for r in requests if r.start <= t < r.end),
            errors=sum(errors.values()),
            errors_by_status=" ".join(f"{code}:{n}" for code, n in sorted(errors.items())),
        )
        rows.append(row)
    return columns, rows


def test_timeline_rows_equal_a_scan_of_every_request():
    s = settings(config({"max_replicas": 3}), profile=load_profile("50+25n"),
                 policy=PolicySpec("default"))
    out = simulate(s, "spike", 40, closed=True, base=2, peak=20, mode="exact", settle_s=20)
    assert _reference_timeline(out.requests, out.samples, out.profile, 60.0) == \
        timeline.build_timeline(out.requests, out.samples, out.profile, 60.0)


def test_a_stub_policy_is_followed():
    s = settings(config({"max_replicas": 5, "upscale_delay_s": 3}), profile=load_profile("20+5n"),
                 policy=PolicySpec(f"{__name__}:StubPolicy", {"first": 2, "then": 4},
                                   "deployment"))
    out = simulate(s, "step", 40, closed=False, base=1, peak=1, mode="exact", settle_s=0)
    assert _first(out.samples, lambda c: c.target == 2) == 3  # after upscale_delay_s
    assert _first(out.samples, lambda c: c.target == 4) == 23
    assert out.samples[-1][1]["Classifier"].running == 4
    assert out.summary["policy_decisions"] == 401  # every 0.1 s control-loop tick


@pytest.mark.parametrize("policy", [
    PolicySpec("serve_app.autoscaling:AppPolicy", {"latency_target_s": 0.5}, "app"),
    PolicySpec("serve_app.autoscaling:BatchAwarePolicy", {"latency_target_s": 0.5}),
    PolicySpec("default"),
])
def test_policies_scale_up_under_load_and_back(policy):
    s = settings(config({"max_replicas": 3, "target_ongoing_requests": 8}),
                 profile=load_profile("50+25n"), policy=policy)
    out = simulate(s, "step", 100, closed=True, base=2, peak=32, mode="exact", settle_s=40)
    assert out.summary["max_replicas_seen"]["Classifier"] >= 2
    assert out.summary["scale_down_s"]["Classifier"] is not None
    assert out.summary["failed"] == 0 and out.summary["policy_decisions"] > 1000


def test_cli_writes_the_experiments_files(tmp_path):
    rc = main(["--config", str(CONFIGS / "autoscale-demo.yaml"), "--shape", "spike",
               "--profile", "50+25n", "--start-s", "10", "--duration", "40",
               "--base-users", "2", "--peak-users", "16", "--out", str(tmp_path),
               "--gpu-fraction", "0.25", "--settle", "10"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(timeline.SUMMARY_KEYS) <= set(summary)
    assert summary["policy"].startswith("serve_app.autoscaling:AppPolicy")
    assert summary["gpu_hours"] == pytest.approx(
        summary["replica_seconds"]["Classifier"] * 0.25 / 3600, abs=1e-4)
    header = (tmp_path / "timeline.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["t_s", "users"] and "Classifier_running" in header
    assert (tmp_path / "timeline.png").stat().st_size > 0


# ---- the fleet mode --------------------------------------------------------------------------

def test_fleet_aggregation_equals_rays():
    """The O(1)-per-tick window means equal Ray's _merge_and_aggregate_timeseries."""
    state = DeploymentAutoscalingState(DeploymentID("Classifier", "app"))
    state._config = AutoscalingConfig(look_back_period_s=5)
    e = controller.EPOCH
    a = [TimeStampedValue(e + t, v) for t, v in ((0.0, 3), (1.0, 5), (2.0, 4), (3.0, 8))]
    b = [TimeStampedValue(e + t, v) for t, v in ((0.5, 1), (1.5, 2), (2.5, 0))]
    clock = controller.SimClock()
    with controller.sim_time(clock):
        for now in (3.0, 3.05, 3.7, 4.9):
            clock.now = now
            assert controller.window_mean(controller.series_sums(a), e + now) == \
                pytest.approx(state._merge_and_aggregate_timeseries([a]), rel=1e-6)
            merged = controller.merged_sums([a, b], state._config.aggregation_function)
            assert controller.window_mean(merged, e + now) == \
                pytest.approx(state._merge_and_aggregate_timeseries([a, b]), rel=1e-6)


def test_fleet_and_exact_modes_agree_on_a_steady_load():
    s = settings(config({"max_replicas": 10}), profile=load_profile("20+5n"),
                 policy=PolicySpec("serve_app.autoscaling:AppPolicy",
                                   {"latency_target_s": 0.5}, "app"), preprocess_ms=10.0)
    exact = simulate(s, "ramp", 300, closed=False, base=50, peak=400, mode="exact")
    fleet = simulate(s, "ramp", 300, closed=False, base=50, peak=400, mode="fleet")
    for out in (exact, fleet):
        assert out.summary["failed"] == 0
    e, f = exact.summary, fleet.summary
    assert f["requests"] == pytest.approx(e["requests"], rel=0.02)
    assert f["replica_seconds"]["Classifier"] == pytest.approx(
        e["replica_seconds"]["Classifier"], rel=0.25)
    assert f["hold_latency_ms"]["p50"] == pytest.approx(e["hold_latency_ms"]["p50"], rel=0.35)


def test_fleet_group_size_is_the_fixed_point_of_call_slots():
    """A call holds its slot while its images decode one by one and their batch runs; what
    arrives meanwhile is the next group: slots x g / (g x p + b) = rate."""
    from load_tests.simulation.fluid import group_size

    g = group_size(5000, 64, 0.01, 0.04, 16)
    assert 64 * g / (g * 0.01 + 0.04) == pytest.approx(5000)
    assert group_size(5000, 64, 0.01, 0.2, 16) == 16  # the fixed point is past the cap
    assert group_size(7000, 64, 0.01, 0.04, 16) == 16  # decoding alone outruns the slots
    assert group_size(10, 64, 0.01, 0.04, 16) == 1.0 and group_size(0, 64, 0.01, 0.04, 16) == 1


def test_a_longer_decision_period_calls_the_policy_less_and_changes_little():
    """--decision-period-s: the policy every 5th step of Ray's 0.1 s loop; the model still
    steps every 0.1 s. On a ramp the result moves by a few percent at most, and a period that
    is not a whole number of steps is refused."""
    s = settings(config({"max_replicas": 10}), profile=load_profile("20+5n"),
                 policy=PolicySpec("serve_app.autoscaling:AppPolicy",
                                   {"latency_target_s": 0.5}, "app"), preprocess_ms=10.0)
    slow = dataclasses.replace(s, decision_period_s=0.5)
    assert (s.decide_every, slow.decide_every) == (1, 5)
    every = simulate(s, "ramp", 300, closed=False, base=50, peak=400, mode="fleet").summary
    fifth = simulate(slow, "ramp", 300, closed=False, base=50, peak=400, mode="fleet").summary
    assert fifth["policy_decisions"] == pytest.approx(every["policy_decisions"] / 5, abs=1)
    assert fifth["decision_period_s"] == 0.5 and every["decision_period_s"] == 0.1
    assert fifth["requests"] == every["requests"]  # the same arrivals
    assert fifth["replica_seconds"]["Classifier"] == pytest.approx(
        every["replica_seconds"]["Classifier"], rel=0.1)
    assert fifth["hold_latency_ms"]["p95"] == pytest.approx(every["hold_latency_ms"]["p95"],
                                                           rel=0.1)
    with pytest.raises(ValueError, match="whole multiple"):
        settings(config(), profile=load_profile("20+5n"), decision_period_s=0.25).decide_every


@pytest.mark.slow
def test_fleet_mode_simulates_a_diurnal_climb_to_5000_per_second():
    """Two hours of the diurnal shape, 100 -> 5000 -> 100 requests/s, in fleet mode. (A whole
    day takes about 45 s here: a figure of `python -m load_tests.simulate`, docs/autoscaling.md,
    not a unit test's.)"""
    cfg = config({"max_replicas": 100}, batch=32, max_ongoing=64,
                 dispatch={"max_in_flight": 256},
                 app_policy={"policy_function": "serve_app.autoscaling:AppPolicy",
                             "policy_kwargs": {"latency_target_s": 0.5}})
    cfg["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] = 4
    # The policy once a second (docs/autoscaling.md: on gpu.yaml's day the same p95 and
    # GPU-hours within 0.3% of Ray's 0.1 s cadence, in about a quarter of the time).
    s = settings(cfg, profile=load_profile("8+0.5n"), start_s=30, preprocess_ms=10.0,
                 gpu_fraction=0.25, decision_period_s=1.0)
    started = time.perf_counter()
    out = simulate(s, "sine", 7_200, closed=False, base=100, peak=5000, mode="fleet",
                   settle_s=0)
    took = time.perf_counter() - started
    assert took < 240, took  # a hang, not a speed: measured times are in the report
    assert out.summary["requests"] == pytest.approx(7_200 * 2550, rel=0.01)
    assert out.summary["max_replicas_seen"]["Classifier"] >= 4
    assert not math.isnan(out.summary["gpu_hours"])


def test_worker_starts_queue_behind_the_nodes_startup_concurrency():
    """Ray's raylet starts at most min(cores, num_cpus) worker processes at once (2 here): 5
    replicas asked for together become ready in waves."""
    slots = controller.StartupSlots(concurrency=2, process_s=3.0)
    assert slots.ready_times(0.0, 5, 10.0) == [13.0, 13.0, 16.0, 16.0, 19.0]
    assert slots.ready_times(20.0, 1, 10.0) == [33.0]  # the slots are free again by then
    assert controller.StartupSlots().ready_times(5.0, 2, 10.0) == [15.0, 15.0]
    s = settings(config({"max_replicas": 5, "upscale_delay_s": 3}), profile=load_profile("20+5n"),
                 policy=PolicySpec(f"{__name__}:StubPolicy", {"first": 5, "then": 5},
                                   "deployment"),
                 process_start_s=3.0, startup_concurrency=2)
    out = simulate(s, "step", 40, closed=False, base=1, peak=1, mode="exact", settle_s=0)
    # Decided at 3 s; start_s 5 after each process (3 s, two at a time): running at 11, 14.
    running = {t: c["Classifier"].running for t, c in out.samples}
    assert running[10] == 1 and running[11] == 3 and running[14] == 5
