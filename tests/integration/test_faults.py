"""Faults under load on configs/local.yaml as shipped (HAProxy in front, one replica of each
deployment): SIGKILL of the classifier, the preprocessor and the ingress replica while 8
clients run, and a classifier whose model wedges (its process alive). Every request gets an
answer: a 200, or a JSON 5xx telling the client to retry (never a hang, a reset or Ray's plain
500), and the service comes back by itself. Figures: docs/reliability.md.
"""

import json
import os
import signal
import time

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

    load.run(seconds, kill)
    report = {"killed": f"{deployment}/{victim}", **summary(load.answers, fault["at"])}
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
    """Known gap, measured: most requests in flight on the killed ingress lose their
    connection (HAProxy closes it with no answer) rather than get HAProxy's JSON 502; nothing
    was answered, so a client may resend. Bounded here by the clients' connections; open."""
    report, answers = _kill_under_load(faulty, "Ingress")
    dropped = [a for a in answers if a.status == 0]
    assert all(a.code in ("RemoteProtocolError", "ReadError") for a in dropped), report
    assert len(dropped) <= 2 * CLIENTS, report
    answered = [a for a in answers if a.status != 0]
    _assert_answered_and_recovered(report, answered, {502, 503})
    assert "500" not in report["statuses"], report
    # The kill was felt: HAProxy's own 502 (in JSON, checked above) or a dropped connection.
    assert report["statuses"].get("502", 0) + len(dropped) > 0, report


def test_a_wedged_classifier_is_found_by_its_health_check_and_replaced(faulty):
    """No traffic: only a health check that runs the model can tell this replica is stuck."""
    url = f"{faulty.url}/v1/classify"
    body = photos_jpeg()[0][1]
    victim = _pid_of(faulty, "Classifier")
    faulty.wedge_file.write_text(f"{victim}\n")
    wedged_at = time.monotonic()
    replaced_s = serving_s = None
    try:
        while time.monotonic() - wedged_at < 120:
            pids = [p for p, d in replica_pids(faulty.proc.pid, "serve_app").items()
                    if d == "Classifier"]
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
