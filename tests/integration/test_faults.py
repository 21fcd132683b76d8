"""Faults under load on configs/local.yaml as shipped (HAProxy in front, one replica of each
deployment): SIGKILL of the classifier, the preprocessor and the ingress replica while 8
clients run, and a classifier whose model wedges (its process alive). Every request gets an
answer: a 200, or a JSON 5xx telling the client to retry (never a hang, a reset or Ray's plain
500), and the service comes back by itself. Figures: docs/reliability.md.
"""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from load_tests.photos import photos_jpeg
from load_tests.processes import replica_pids
from serve_app import configfile
from serve_app.compiling import compile_config
from serve_app.fault_injection import WEDGE_ENV
from serve_app.launch import ServeProcess
from tests.conftest import CONFIGS
from tests.integration.closed_loop import CLIENT_TIMEOUT_S, Load, summary
from tests.integration.haproxy_stats import backend_counters
from tests.integration.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """The shipped service, its replicas able to be wedged on purpose (a file naming PIDs)."""
    wedge = tmp_path_factory.mktemp("faults") / "wedge"
    assert compile_config(configfile.load(CONFIGS / "local.yaml"), "configs/local.yaml") == 0
    with ServeProcess(CONFIGS / "local.yaml", start_timeout_s=400,
                      env={WEDGE_ENV: str(wedge)}) as svc:
        svc.wedge_file = wedge
        yield svc


def _classifier_pids(svc) -> list[int]:
    return [p for p, d in replica_pids(svc.proc.pid, "serve_app").items() if d == "Classifier"]


def _pid_of(svc, deployment: str) -> int:
    pids = [p for p, d in replica_pids(svc.proc.pid, "serve_app").items() if d == deployment]
    assert len(pids) == 1, (deployment, pids)
    return pids[0]


def _kill_under_load(svc, deployment: str, seconds: float = 45.0) -> tuple[dict, list]:
    url = f"{svc.url}/v1/classify"
    load = Load(url, [jpeg for _, jpeg in photos_jpeg()], CLIENTS)
    victim = _pid_of(svc, deployment)
    fault: dict = {}

    def kill():
        time.sleep(5)
        fault["at"] = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        if deployment == "Ingress":
            time.sleep(0.3)  # HAProxy retries at once; its counters reset when Ray reloads it
            fault["haproxy"] = backend_counters(svc)

    load.run(seconds, kill)
    report = {"killed": f"{deployment}/{victim}", **summary(load.answers, fault["at"]),
              **({"haproxy": fault["haproxy"]} if "haproxy" in fault else {})}
    print(f"fault {deployment}:", json.dumps(report))
    return report, load.answers


def _assert_answered_and_recovered(report: dict, answers: list, allowed: set) -> None:
    assert {a.status for a in answers} <= {200} | allowed, report
    assert all(a.json_body for a in answers if a.status != 200), report  # never Ray's plain 500
    assert all(a.retry_after == "1" for a in answers if a.status in (502, 503)), report
    assert report["in_flight_answered_within_s"] < 5, report  # an answer, not a hang
    assert report["max_ms"] < CLIENT_TIMEOUT_S * 1000, report
    assert report["healthy_after_s"] is not None, report  # back to serving by itself
    assert report["healthy_after_s"] < 35, report


def test_a_killed_classifier_fails_its_requests_fast_and_is_replaced(faulty):
    report, answers = _kill_under_load(faulty, "Classifier")
    _assert_answered_and_recovered(report, answers, {503})
    assert report["statuses"].get("503", 0) > 0, report  # it was noticed, and said so
    assert set(report["codes"]) <= {"replica_lost", "not_ready", "overloaded"}, report


def test_a_killed_preprocessor_fails_its_requests_fast_and_is_replaced(faulty):
    report, answers = _kill_under_load(faulty, "Preprocessor")
    _assert_answered_and_recovered(report, answers, {503})
    assert set(report["codes"]) <= {"replica_lost", "not_ready", "overloaded"}, report


def test_a_killed_ingress_through_haproxy_is_json_never_a_plain_500(faulty):
    """HAProxy replays a request whose ingress closed without answering (serve_app's
    ``retry-on empty-response`` with whole requests buffered, serve_app/haproxy_replay.py).
    What it cannot replay (a request the ingress had not read) gets its JSON 502 on a fresh
    server connection, and on a reused one is closed with no answer, by HAProxy's design (the
    client may resend it: nothing was answered; serve_app.client does, next test). Without the
    replay all CLIENTS requests in flight were lost that way."""
    report, answers = _kill_under_load(faulty, "Ingress")
    dropped = [a for a in answers if a.status == 0]
    assert all(a.code in ("RemoteProtocolError", "ReadError") for a in dropped), report
    answered = [a for a in answers if a.status != 0]
    _assert_answered_and_recovered(report, answered, {502, 503})
    assert "500" not in report["statuses"], report
    assert report["haproxy"].get("retries", 0) > 0, report  # the kill was met by a replay
    lost = len(dropped) + report["statuses"].get("502", 0)
    # Three runs here lost 1, 0 and 0 of the CLIENTS in flight; before the replay, all of them.
    assert lost <= CLIENTS // 2, report


class _CountingTransport(httpx.BaseTransport):
    """httpx's transport, counting the attempts that reach the network."""

    def __init__(self):
        self.inner, self.sent = httpx.HTTPTransport(), 0

    def handle_request(self, request):
        self.sent += 1
        return self.inner.handle_request(request)

    def close(self):
        self.inner.close()


def test_a_killed_ingress_costs_serve_apps_client_nothing(faulty):
    """HAProxy closes a keep-alive request whose server died before answering, and which it
    could not replay, without a response, on purpose (RFC 9112 9.3.1: the client may send it
    again; its source says "the client is required to retry"): the raw clients' drop above.
    serve_app.client resends on exactly that, honours the 502/503's Retry-After, and every one
    of its requests is served."""
    from serve_app.client import Client, RetryPolicy

    url, bodies = faulty.url, [jpeg for _, jpeg in photos_jpeg()]
    victim = _pid_of(faulty, "Ingress")
    policy = RetryPolicy(max_attempts=40, max_elapsed_s=CLIENT_TIMEOUT_S)
    stop, outcomes, transports = threading.Event(), [], []

    def client(i: int) -> None:
        transport = _CountingTransport()
        transports.append(transport)
        with Client(url, retries=policy, transport=transport) as c:
            n = i
            while not stop.is_set():
                try:
                    c.classify(bodies[n % len(bodies)])
                    outcomes.append("served")
                except Exception as exc:  # what a user of the client would see
                    outcomes.append(f"{type(exc).__name__}: {exc}"[:200])
                n += 1

    with ThreadPoolExecutor(CLIENTS) as pool:
        for i in range(CLIENTS):
            pool.submit(client, i)
        time.sleep(5)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.3)
        replays = backend_counters(faulty)
        time.sleep(40)
        stop.set()
    report = {"killed": f"Ingress/{victim}", "requests": len(outcomes),
              "served": outcomes.count("served"),
              "attempts": sum(t.sent for t in transports),
              "failed": sorted(set(o for o in outcomes if o != "served")),
              "seconds_after_kill": round(time.monotonic() - killed_at, 1), "haproxy": replays}
    report["resent"] = report["attempts"] - report["requests"]
    print("fault Ingress, serve_app.client:", json.dumps(report))
    assert report["failed"] == [] and report["served"] > 0, report
    # The kill was felt, and absorbed: resent by the client or replayed by HAProxy.
    assert report["resent"] + replays.get("retries", 0) > 0, report


def test_a_wedged_classifier_is_found_by_its_health_check_and_replaced(faulty):
    """No traffic: only a health check that runs the model can tell this replica is stuck."""
    url = f"{faulty.url}/v1/classify"
    body = photos_jpeg()[0][1]
    # The load of the tests before may have scaled the Classifier to 2 (the policy's rate
    # floor at 8 clients); with no traffic it goes back to 1 after downscale_delay_s, and a
    # replica that goes then must not pass for a replaced one.
    wait_for(lambda: len(_classifier_pids(faulty)) == 1, 120, "one Classifier replica")
    victim = _pid_of(faulty, "Classifier")
    faulty.wedge_file.write_text(f"{victim}\n")
    wedged_at = time.monotonic()
    replaced_s = serving_s = None
    try:
        while time.monotonic() - wedged_at < 120:
            pids = _classifier_pids(faulty)
            if replaced_s is None and pids and victim not in pids:
                replaced_s = time.monotonic() - wedged_at
            if replaced_s is not None:
                r = httpx.post(url, content=body, headers={"Content-Type": "image/jpeg"},
                               timeout=CLIENT_TIMEOUT_S)
                if r.status_code == 200:
                    serving_s = time.monotonic() - wedged_at
                    break
            time.sleep(0.5)
    finally:
        faulty.wedge_file.unlink(missing_ok=True)
    report = {"wedged": f"Classifier/{victim}", "replaced_after_s": replaced_s and round(replaced_s, 1),
              "serving_after_s": serving_s and round(serving_s, 1)}
    print("fault wedge:", json.dumps(report))
    # health_check_period_s 5 + the forward's 5 s timeout, then Ray stops it and starts another
    assert replaced_s is not None and serving_s is not None, (report, faulty.log_tail())
    assert serving_s < 90, report
