"""Past capacity, configs/local.yaml as shipped answers fast: 200 or a JSON 503 with
Retry-After in milliseconds, never a 500, a reset or a timeout; the served requests' wait stays
bounded by the queues; memory stays flat; a normal request succeeds soon after the load ends.

The load is open-loop (requests arrive at 3x the rate the service served just before, whatever
the answers), so shedding does not lower the offered load as it would in a closed loop.
Figures: docs/reliability.md.
"""

import json
import multiprocessing
import queue
import statistics
import threading
import time
from typing import Callable

import httpx
import pytest

from load_tests.client import run_load, run_open_loop
from load_tests.photos import photos_jpeg
from load_tests import replica_starts
from load_tests.processes import cpu_seconds, memory_mib, replica_pids
from load_tests.refusal_probe import probe_a_503
from load_tests.sampling import ServeStatusClient, dashboard_url_from_log
from serve_app import configfile
from serve_app.compiling import compile_config
from serve_app.launch import ServeProcess
from tests.conftest import CONFIGS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERLOAD_S = 40.0


@pytest.fixture(scope="module")
def shipped():
    # Measured compiled, as the config asks: build its artifact first (a no-op once built). On
    # a fresh machine the replica would otherwise serve eager while the build takes the CPU
    # (a CI run measured "capacity" at half the served rate and refusals delayed to 2 s).
    assert compile_config(configfile.load(CONFIGS / "local.yaml"), "configs/local.yaml") == 0
    with ServeProcess(CONFIGS / "local.yaml", start_timeout_s=400) as svc:
        svc.status = ServeStatusClient(dashboard_url_from_log(svc.log_path.read_text()),
                                       "serve_app")
        yield svc


def _scaled_out(svc, deployment: str, load: Callable[[], object],
                limit_s: float = 90.0) -> dict:
    """Run ``load`` (a few seconds of traffic) again until every replica of ``deployment`` the
    config allows is running; how long that took (None: not within ``limit_s``).

    Capacity is measured on the classifiers the overload runs on: the policy's rate floor adds
    the second under 32 clients some seconds in, and a capacity measured before it made "3x"
    an overload of 1.5x that never filled the queues (a CI run: no 503 at all).
    """
    cfg = configfile.load(CONFIGS / "local.yaml")["applications"][0]
    most = configfile.deployment_options(cfg, deployment)["autoscaling_config"]["max_replicas"]
    started = time.monotonic()
    while True:
        counts = svc.status.replicas().get(deployment)
        if counts and counts.running >= most and not counts.starting:
            return {"running": counts.running, "after_s": round(time.monotonic() - started, 1)}
        if time.monotonic() - started > limit_s:
            return {"running": counts and counts.running, "after_s": None}
        load()


def _scaling(log_text: str, origin: float, until: float) -> dict[str, dict[str, list[float]]]:
    """Ray's scaling decisions per deployment between ``origin`` and ``until`` (epoch), in
    seconds from ``origin``, read from the Serve log afterwards: nothing sampled during the
    load, whose clock times the refusals."""
    out = {}
    for deployment in ("Ingress", "Preprocessor", "Classifier"):
        parsed = replica_starts.parse(log_text.splitlines(), deployment)
        out[deployment] = {key: [round(t - origin, 1) for t in parsed[key] if origin <= t <= until]
                           for key in ("added", "removed")}
    return out


def _normal_latency_ms(url: str, body: bytes, n: int = 10) -> float:
    with httpx.Client(timeout=30) as c:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            assert c.post(url, content=body, headers={"Content-Type": "image/jpeg"}).status_code == 200
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def test_three_times_capacity_sheds_fast_and_recovers(shipped):
    url = f"{shipped.url}/v1/classify"
    bodies = [jpeg for _, jpeg in photos_jpeg()]
    run_load(url, bodies, 4, 5.0, warmup_s=0.0, max_requests=200)  # every batch path warm
    normal_ms = _normal_latency_ms(url, bodies[0])
    classifiers = _scaled_out(shipped, "Classifier",
                              lambda: run_load(url, bodies, 32, 5.0, warmup_s=0.0))
    assert classifiers["after_s"] is not None, classifiers
    capacity = run_load(url, bodies, 32, 10.0, warmup_s=3.0).summary()
    assert capacity["errors"] == 0, capacity
    rate = 3 * capacity["rps"]
    pids = replica_pids(shipped.proc.pid, "serve_app")
    rss_before = memory_mib(pids)

    spawn = multiprocessing.get_context("spawn")
    results, stop, ready = spawn.Queue(), spawn.Event(), spawn.Event()
    prober = spawn.Process(target=probe_a_503, args=(url, bodies[0], results, stop, ready),
                           daemon=True)
    prober.start()
    assert ready.wait(60), "the 503 prober did not start"  # its imports before the overload
    # RSS every 5 s of the overload; halfway the queues are full and every allocation pattern
    # has run, so from there it must stay flat.
    rss_samples: list[dict[int, float]] = []
    sampling_ended = threading.Event()

    def sample_rss():
        while not sampling_ended.wait(5):
            rss_samples.append(memory_mib(pids))

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    overload_started, cpu_before = time.time(), cpu_seconds(pids)
    load = run_open_loop(url, bodies, rate, OVERLOAD_S, max_connections=1024, timeout_s=60)
    overload_ended, cpu_after = time.time(), cpu_seconds(pids)
    sampling_ended.set()
    sampler.join()
    rss_mid = rss_samples[len(rss_samples) // 2 - 1] if rss_samples else {}
    stop.set()
    try:
        probe = results.get(timeout=60)
    except queue.Empty:
        probe = {"error": "the prober process sent nothing", "exitcode": prober.exitcode}
    prober.join(timeout=30)
    if prober.is_alive():
        prober.kill()
    ended = time.monotonic()

    # Within 10 s of the end, a request succeeds at about normal latency.
    recovered_s = first_ms = None
    with httpx.Client(timeout=30) as c:
        while time.monotonic() - ended < 10:
            started = time.perf_counter()
            r = c.post(url, content=bodies[0], headers={"Content-Type": "image/jpeg"})
            if r.status_code == 200:
                first_ms = (time.perf_counter() - started) * 1000
                recovered_s = time.monotonic() - ended
                break
            time.sleep(0.2)
    after_ms = _normal_latency_ms(url, bodies[0], n=5)
    rss_after = memory_mib(pids)

    cfg = configfile.load(CONFIGS / "local.yaml")["applications"][0]
    dispatch = cfg["args"]["dispatch"]
    options = configfile.deployment_options(cfg, "Ingress")
    ingress = options["autoscaling_config"]
    # What the service lets in before it sheds: per ingress replica, the images queued for a
    # call slot plus the calls in flight, and the requests Ray's proxy holds for a busy
    # ingress (its max_queued_requests; past it Ray's own 503); a served request waits for
    # those ahead of it. (At a true 3x a CI run filled Ray's queue too: 161 of its plain 503s,
    # and a 200 p99 of 9.1 s over a bound of 7.8 s that left it out.)
    admitted = ingress["max_replicas"] * (dispatch["max_queued"] + dispatch["max_in_flight"]
                                          * dispatch["max_batch_size"]) \
        + max(0, options.get("max_queued_requests", 0))
    served_rate = load.count(200) / OVERLOAD_S
    wait_bound_ms = 1000 * (1.5 * admitted / max(served_rate, 1e-9) + 1.0)
    report = {"capacity_rps": capacity["rps"], "classifiers": classifiers,
              "offered_rps": round(rate, 1),
              **load.summary(), "p95_503_by_5s": load.by_window(503),
              # CPU-s per s of each replica that ran throughout (the Ingress scales on its own)
              "cpu_per_s": {f"{pids[p]}/{p}": round((cpu_after[p] - cpu_before[p])
                                                    / (overload_ended - overload_started), 2)
                            for p in cpu_before if p in cpu_after},
              "scaling_s": _scaling(shipped.log_path.read_text(), overload_started,
                                    overload_ended),
              "served_rps": round(served_rate, 1),
              "p99_200_bound_ms": round(wait_bound_ms), "admitted": admitted,
              "normal_ms": round(normal_ms, 1), "recovered_after_s": recovered_s,
              "first_after_ms": first_ms and round(first_ms, 1), "normal_after_ms": round(after_ms, 1),
              "rss_mib": {f"{pids[p]}/{p}": [rss_before.get(p), rss_mid.get(p), rss_after.get(p)]
                          for p in pids},
              "rss_by_5s": {f"{pids[p]}/{p}": [sample.get(p) for sample in rss_samples]
                            for p in pids},
              "probe": probe,
              # refused by HAProxy itself, before the ingress (serve_app/haproxy_shedding.py)
              "shed_at_edge": load.error_codes.get("503 overloaded (HAProxy)", 0),
              # a busy model must not pass for a missing one (serve_app/availability.py)
              "model_went_down": shipped.serve_log_count("No replica of")}
    print("overload:", json.dumps(report))

    assert set(load.latencies_by_status) <= {200, 503}, report
    assert load.transport_errors == 0 and load.dropped == 0, (report, load.first_error)
    assert load.count(503) > 0 and load.count(200) > 0, report
    # Refused at once, not after a wait in a queue: most in milliseconds, and even the slow
    # tail sooner than the served requests' median. (The 50 ms p95 target is a measurement,
    # not a timed test: docs/reliability.md. At a true 3x, both classifiers counted in the
    # capacity, four runs here gave 503 p50 6-11 ms but p95 0.24-2.0 s: on 2 cores the HTTP
    # path itself saturates at ~120 req/s, and refusals wait for the CPU in bursts.)
    assert load.percentile_ms(503, 50) < 100, report
    assert load.percentile_ms(503, 95) < load.percentile_ms(200, 50), report
    assert load.percentile_ms(200, 99) < wait_bound_ms, report
    assert report["shed_at_edge"] > 0, report  # HAProxy (make run's proxy) refused some
    assert probe.get("retry_after") == "1", report
    assert probe["content_type"] == "application/json", report
    assert probe["body"]["error"]["code"] == "overloaded", report
    assert report["model_went_down"] == 0, report
    assert recovered_s is not None and recovered_s < 10, report
    assert after_ms < max(3 * normal_ms, normal_ms + 300), report
    # Flat over the overload's second half: no replica keeps growing while it sheds. (From the
    # load before to halfway the classifier grew ~12% once: more crops wait in @serve.batch
    # when every queue is full.)
    for pid, mid in rss_mid.items():
        if pid in rss_after:
            assert rss_after[pid] <= 1.1 * mid, (pids[pid], rss_before.get(pid), mid,
                                                 rss_after[pid])
