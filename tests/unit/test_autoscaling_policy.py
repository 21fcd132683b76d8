"""serve_app.autoscaling on synthetic contexts: no Ray cluster, Ray's own wrapper for delays."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from ray.serve import autoscaling_policy as ray_policy
from ray.serve._private.common import DeploymentID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve_app import autoscaling
from serve_app.autoscaling import (
    AppPolicy,
    BatchAwarePolicy,
    BatchSignals,
    batch_signals,
    desired_replicas,
    replica_capacity,
)

ROOT = Path(__file__).resolve().parents[2]
APP = "serve_app"


def context(name: str = "Classifier", *, total: float, current: int, target: int | None = None,
            metrics: dict | None = None, raw: dict | None = None, min_replicas: int = 1,
            max_replicas: int = 4,
            state: dict | None = None, now: float = 0.0, **config) -> AutoscalingContext:
    cfg = AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas,
                            target_ongoing_requests=config.pop("target_ongoing_requests", 8),
                            upscale_delay_s=config.pop("upscale_delay_s", 0),
                            downscale_delay_s=config.pop("downscale_delay_s", 0), **config)
    return AutoscalingContext(
        deployment_id=DeploymentID(name=name, app_name=APP), deployment_name=name, app_name=APP,
        current_num_replicas=current, target_num_replicas=current if target is None else target,
        running_replicas=[f"r{i}" for i in range(current)], total_num_requests=total,
        total_queued_requests=0.0, aggregated_metrics=metrics or {}, raw_metrics=raw or {},
        capacity_adjusted_min_replicas=min_replicas, capacity_adjusted_max_replicas=max_replicas,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=now, config=cfg)


def reported(replicas: int = 1, batch: int = 8, fill: float = 8.0, latency_s: float = 0.5) -> dict:
    """Classifier.record_autoscaling_stats as Ray aggregates it: {metric: {replica: value}}."""
    ids = [f"r{i}" for i in range(replicas)]
    return {autoscaling.MAX_BATCH_SIZE: {r: float(batch) for r in ids},
            autoscaling.BATCH_FILL: {r: fill for r in ids},
            autoscaling.BATCH_LATENCY_S: {r: latency_s for r in ids}}


# ---- pure arithmetic ----

def test_signals_average_per_replica_throughput():
    metrics = reported(2)
    metrics[autoscaling.BATCH_LATENCY_S]["r1"] = 1.0  # 8/0.5 = 16/s and 8/1.0 = 8/s
    s = batch_signals(metrics)
    assert s.max_batch_size == 8 and s.throughput_per_replica == pytest.approx(12.0)


def test_signals_prefer_the_newest_report():
    """Window means still show small, cheap batches after a step; the newest report does not."""
    window = reported(fill=2.0, latency_s=0.08)  # 25 images/s at light load
    raw = {autoscaling.BATCH_FILL: {"r0": [TimeStampedValue(1.0, 2.0), TimeStampedValue(3.0, 8.0)]},
           autoscaling.BATCH_LATENCY_S: {"r0": [TimeStampedValue(3.0, 0.8),
                                                TimeStampedValue(1.0, 0.08)]}}
    assert batch_signals(window).throughput_per_replica == pytest.approx(25.0)
    assert batch_signals(window, raw).throughput_per_replica == pytest.approx(10.0)
    desired, _ = BatchAwarePolicy()(context(total=30, current=1, metrics=window, raw=raw))
    assert desired == 3  # 30 requests / 10 per replica; the window mean alone would say 2


def test_signals_before_any_report():
    assert batch_signals({}) == BatchSignals(None, None)
    only_size = {autoscaling.MAX_BATCH_SIZE: {"r0": 8.0}}
    assert batch_signals(only_size) == BatchSignals(8, None)


def test_capacity_is_littles_law_but_at_least_one_batch():
    fast = BatchSignals(max_batch_size=8, throughput_per_replica=20.0)
    assert replica_capacity(fast, latency_target_s=1.0, fallback=2) == 20.0
    slow = BatchSignals(max_batch_size=8, throughput_per_replica=4.0)
    assert replica_capacity(slow, latency_target_s=1.0, fallback=2) == 8.0  # one full batch
    assert replica_capacity(BatchSignals(8, None), 1.0, fallback=2) == 8.0
    assert replica_capacity(BatchSignals(None, None), 1.0, fallback=3) == 3.0


def test_scale_up_on_a_queue():
    assert desired_replicas(40, current=1, capacity=16, min_replicas=1, max_replicas=4) == 3


def test_hold_within_band():
    # 2 replicas carry up to 32; one fewer would be at 20/16 > 80%: hold.
    for total in (13, 20, 32):
        assert desired_replicas(total, current=2, capacity=16, min_replicas=1,
                                max_replicas=4) == 2


def test_scale_down_only_below_headroom():
    assert desired_replicas(12.8, current=2, capacity=16, min_replicas=1, max_replicas=4) == 1
    assert desired_replicas(12.9, current=2, capacity=16, min_replicas=1, max_replicas=4) == 2
    assert desired_replicas(0, current=3, capacity=16, min_replicas=1, max_replicas=4) == 1


def test_respects_min_and_max():
    assert desired_replicas(1000, current=2, capacity=8, min_replicas=1, max_replicas=3) == 3
    assert desired_replicas(0, current=3, capacity=8, min_replicas=2, max_replicas=3) == 2


def test_ray_default_would_flap_where_the_band_holds():
    """At 17 requests and capacity 8 Ray's rule wants 3 replicas, at 15 it wants 2; the band
    keeps 3 replicas at 15 (2 replicas would run 15/16 > 80% full)."""
    assert math.ceil(17 / 8) == 3 and math.ceil(15 / 8) == 2
    assert desired_replicas(15, current=3, capacity=8, min_replicas=1, max_replicas=4) == 3


def test_bad_kwargs_fail_at_construction():
    with pytest.raises(ValueError):
        BatchAwarePolicy(latency_target_s=0)
    with pytest.raises(ValueError):
        BatchAwarePolicy(downscale_headroom=1.5)
    with pytest.raises(ValueError):
        AppPolicy(preprocessors_per_classifier=-1)


# ---- the policy on contexts ----

def test_policy_uses_measured_throughput():
    # 8 images per 0.5 s batch = 16/s per replica: 16 requests per replica within 1 s.
    policy = BatchAwarePolicy(latency_target_s=1.0)
    desired, state = policy(context(total=40, current=1, metrics=reported()))
    assert desired == 3 and state["capacity"] == 16.0
    desired, _ = policy(context(total=16, current=1, metrics=reported()))
    assert desired == 1


def test_policy_falls_back_to_target_ongoing_requests():
    desired, state = BatchAwarePolicy()(context(total=20, current=1, target_ongoing_requests=5))
    assert desired == 4 and state["capacity"] == 5.0


# ---- through Ray's wrapper: what the controller actually runs ----

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(ray_policy, "time", fake)  # the module's clock for delay bookkeeping
    return fake


def test_scale_down_only_after_delay(clock):
    wrapped = ray_policy._apply_autoscaling_config(BatchAwarePolicy())
    state: dict = {}
    decisions = []
    for step in range(5):  # idle, 2 replicas, downscale_delay_s=10, one tick every 3 s
        clock.now = 1000.0 + 3 * step
        ctx = context(total=0, current=2, metrics=reported(2), state=state, downscale_delay_s=10)
        decision, state = wrapped(ctx)
        decisions.append(decision)
    assert decisions == [2, 2, 2, 2, 1]  # t=0,3,6,9 hold; t=12 >= 10 s after the first wish


@pytest.mark.parametrize("policy", [BatchAwarePolicy, AppPolicy])
def test_a_new_replica_lives_at_least_the_downscale_delay(clock, policy):
    """The load ends while the second replica is still starting: Ray alone would start the
    downscale clock at once and remove the replica seconds after it became ready (seen: 9 s
    with a 30 s delay). The hold starts it when every replica runs."""
    app_level = policy is AppPolicy
    wrapped = (ray_policy._apply_app_level_autoscaling_config(policy()) if app_level
               else ray_policy._apply_autoscaling_config(policy()))
    state: dict = {}
    decisions = []
    ready_at = 1015.0
    for step in range(12):  # idle; target 2; one tick every 3 s; downscale_delay_s 10
        clock.now = 1000.0 + 3 * step
        running = 2 if clock.now >= ready_at else 1
        ctx = context(total=0, current=running, target=2, metrics=reported(running),
                      state=state, now=clock.now, downscale_delay_s=10)
        if app_level:
            decision_of, states = wrapped({ctx.deployment_id: ctx})
            decision, state = decision_of[ctx.deployment_id], states[ctx.deployment_id]
        else:
            decision, state = wrapped(ctx)
        decisions.append((clock.now, decision))
    removed_at = next(t for t, n in decisions if n == 1)
    assert removed_at - ready_at >= 10, decisions
    assert removed_at == 1027.0, decisions  # and no later than the delay after readiness


def test_the_start_hold_gives_up_on_a_replica_that_never_starts():
    assert autoscaling.hold_while_starting(1, 2, 1, None, 50.0, 300.0) == (2, 50.0)
    assert autoscaling.hold_while_starting(1, 2, 1, 50.0, 349.0, 300.0) == (2, 50.0)
    assert autoscaling.hold_while_starting(1, 2, 1, 50.0, 351.0, 300.0) == (1, 50.0)
    assert autoscaling.hold_while_starting(3, 2, 1, 50.0, 60.0, 300.0) == (3, 50.0)  # up: as is
    assert autoscaling.hold_while_starting(1, 2, 2, 50.0, 60.0, 300.0) == (1, None)  # all run


def test_scale_up_waits_for_upscale_delay(clock):
    wrapped = ray_policy._apply_autoscaling_config(BatchAwarePolicy())
    state: dict = {}
    decisions = []
    for step in range(3):
        clock.now = 1000.0 + 2 * step
        ctx = context(total=48, current=1, metrics=reported(), state=state, upscale_delay_s=3)
        decision, state = wrapped(ctx)
        decisions.append(decision)
    assert decisions == [1, 1, 3]


def test_app_policy_keeps_preprocessors_in_proportion(clock):
    wrapped = ray_policy._apply_app_level_autoscaling_config(
        AppPolicy(preprocessors_per_classifier=0.5))
    contexts = {
        DeploymentID("Classifier", APP): context(total=48, current=1, metrics=reported()),
        DeploymentID("Preprocessor", APP): context("Preprocessor", total=0, current=1,
                                                   target_ongoing_requests=4),
        DeploymentID("Ingress", APP): context("Ingress", total=3, current=1,
                                              target_ongoing_requests=32, max_replicas=2),
    }
    decisions, states = wrapped(contexts)
    by_name = {dep.name: n for dep, n in decisions.items()}
    assert by_name == {"Classifier": 3, "Preprocessor": 2, "Ingress": 1}
    assert set(states) == set(contexts)


def test_app_policy_preprocessor_queue_still_counts():
    policy = AppPolicy(preprocessors_per_classifier=0.25)
    contexts = {
        DeploymentID("Classifier", APP): context(total=4, current=1, metrics=reported()),
        DeploymentID("Preprocessor", APP): context("Preprocessor", total=12, current=1,
                                                   target_ongoing_requests=4),
    }
    decisions, _ = policy(contexts)
    assert {d.name: n for d, n in decisions.items()} == {"Classifier": 1, "Preprocessor": 3}


def test_load_counts_images_not_calls():
    # Two calls in the replica carrying 24 images: 3 replicas of 8, not 1.
    metrics = {**reported(latency_s=1.0), autoscaling.IMAGES_IN_FLIGHT: {"r0": 24.0}}
    decision, state = BatchAwarePolicy().decide(context(total=2, current=1, metrics=metrics))
    assert decision == 3 and state["load"] == 24
    assert autoscaling.classifier_load(5, None) == 5  # before any report: Ray's count
    assert autoscaling.classifier_load(5, 2.0) == 5  # never below the calls
    assert autoscaling.classifier_load(2, 24.0, 16.0) == 40


def test_app_policy_adds_images_queued_in_the_ingress():
    metrics = {**reported(latency_s=1.0), autoscaling.IMAGES_IN_FLIGHT: {"r0": 8.0}}
    contexts = {
        DeploymentID("Classifier", APP): context(total=1, current=1, metrics=metrics),
        DeploymentID("Ingress", APP): context(
            "Ingress", total=24, current=2, target_ongoing_requests=32, max_replicas=2,
            metrics={autoscaling.IMAGES_QUEUED: {"i0": 10.0, "i1": 6.0}}),
    }
    decisions, states = AppPolicy()(contexts)
    assert {d.name: n for d, n in decisions.items()}["Classifier"] == 3  # (8 + 16) / 8
    assert states[DeploymentID("Classifier", APP)]["load"] == 24


def test_the_ingress_scales_on_its_own_cpu_not_on_requests_waiting_for_the_models():
    """An overload of the classifiers fills the Ingress with requests waiting for a call slot
    (96 ongoing, target 32): Ray's rule adds an Ingress that only takes CPU from the models.
    Its CPU says whether its event loop needs help."""
    def ingress(cpu: dict | None, current: int = 1, total: float = 96):
        return DeploymentID("Ingress", APP), context(
            "Ingress", total=total, current=current, target_ongoing_requests=32,
            max_replicas=3, metrics={} if cpu is None else {autoscaling.INGRESS_CPU: cpu})

    def decide(cpu: dict | None, **kw) -> int:
        dep, ctx = ingress(cpu, **kw)
        return AppPolicy(ingress_cpu_target=0.7)({dep: ctx})[0][dep]

    assert decide({"i0": 0.35}) == 1  # waiting requests, an idle loop
    assert decide({"i0": 0.95}) == 2  # its loop is the bottleneck
    assert decide({"i0": 0.9, "i1": 0.9}, current=2) == 3
    assert decide({"i0": 0.5, "i1": 0.45}, current=2) == 2  # 0.95 > 0.7 * 0.8: the band holds
    assert decide({"i0": 0.2, "i1": 0.2}, current=2) == 1
    assert decide(None) == 3  # before any report: Ray's rule, ceil(96 / 32)
    assert autoscaling.ingress_replicas(None, 0.7, 1, 1, 2, 0.8) is None
    with pytest.raises(ValueError, match="ingress_cpu_target"):
        AppPolicy(ingress_cpu_target=0)


# ---- the configs that select it ----

def _app(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())["applications"][0]


def test_demo_configs_differ_only_in_the_policy():
    """The comparison is fair only if everything but the policy is the same."""
    demo, default = _app("autoscale-demo.yaml"), _app("autoscale-demo-default.yaml")
    assert demo.pop("autoscaling_policy")["policy_function"] == "serve_app.autoscaling:AppPolicy"
    assert "autoscaling_policy" not in default
    # Ray's default counts calls (groups of images), serve_app's policy counts images, so the
    # targets Ray's default uses are in calls.
    for d in default["deployments"]:
        if d["name"] in ("Classifier", "Preprocessor"):
            d["autoscaling_config"].pop("target_ongoing_requests")
    for d in demo["deployments"]:
        if d["name"] == "Classifier":
            assert d["autoscaling_config"].pop("target_ongoing_requests") == 8  # the fallback
        if d["name"] == "Preprocessor":
            assert d["autoscaling_config"].pop("target_ongoing_requests") == 4
    assert demo == default


def test_simulated_configs_differ_only_in_the_policy():
    """On the simulated accelerator each call carries one image, so Ray's default and serve_app's
    policy count the same thing and share every setting, the targets included."""
    sim, default = _app("autoscale-sim.yaml"), _app("autoscale-sim-default.yaml")
    policy = sim.pop("autoscaling_policy")
    assert policy["policy_function"] == "serve_app.autoscaling:AppPolicy"
    assert isinstance(AppPolicy(**policy["policy_kwargs"]), AppPolicy)
    assert "autoscaling_policy" not in default
    assert sim == default
    assert sim["args"]["dispatch"]["max_batch_size"] == 1
    classifier = next(d for d in sim["deployments"] if d["name"] == "Classifier")
    assert (classifier["autoscaling_config"]["target_ongoing_requests"]
            == classifier["user_config"]["max_batch_size"])


def test_demo_policy_kwargs_build_the_policy():
    policy = _app("autoscale-demo.yaml")["autoscaling_policy"]
    assert isinstance(AppPolicy(**policy["policy_kwargs"]), AppPolicy)


# ---- several models (serve_app/topology.py) ----

def test_each_model_scales_on_its_own_load_and_preprocessors_follow_their_classifiers():
    """Lite2 is loaded (24 images in flight + 16 queued for it), Lite0 idle. A Preprocessor
    shared by both models and one feeding Lite2 alone follow what they feed."""
    busy = {**reported(latency_s=1.0), autoscaling.IMAGES_IN_FLIGHT: {"r0": 24.0}}
    idle = {**reported(latency_s=1.0), autoscaling.IMAGES_IN_FLIGHT: {"r0": 0.0}}
    lite0, lite2 = "Classifier_efficientnet_lite0", "Classifier_efficientnet_lite2"
    contexts = {
        DeploymentID(lite0, APP): context(lite0, total=0, current=1, metrics=idle),
        DeploymentID(lite2, APP): context(lite2, total=3, current=1, metrics=busy,
                                          max_replicas=8),
        DeploymentID("Preprocessor_efficientnet_lite2", APP): context(
            "Preprocessor_efficientnet_lite2", total=0, current=1, max_replicas=8),
        DeploymentID("Preprocessor_efficientnet_lite0", APP): context(
            "Preprocessor_efficientnet_lite0", total=0, current=1, max_replicas=8,
            metrics={f"feeds/{lite0}": {"p0": 1.0}, f"feeds/{lite2}": {"p0": 1.0}}),
        DeploymentID("Ingress", APP): context(
            "Ingress", total=8, current=1, target_ongoing_requests=32,
            metrics={autoscaling.images_queued_key(lite2): {"i0": 16.0},
                     autoscaling.images_queued_key(lite0): {"i0": 0.0},
                     autoscaling.IMAGES_QUEUED: {"i0": 16.0}}),
    }
    decisions, _ = AppPolicy(preprocessors_per_classifier=0.5)(contexts)
    by_name = {d.name: n for d, n in decisions.items()}
    assert by_name[lite2] == 5  # (24 + 16) / 8
    assert by_name[lite0] == 1
    assert by_name["Preprocessor_efficientnet_lite2"] == 3  # by name: ceil(0.5 * 5)
    assert by_name["Preprocessor_efficientnet_lite0"] == 3  # reported: ceil(0.5 * (1 + 5))
