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
from dataclasses import dataclass, field

import httpx
import pytest

from load_tests.photos import photos_jpeg
from load_tests.processes import replica_pids
from serve_app import configfile
from serve_app.compiling import compile_config
from serve_app.fault_injection import WEDGE_ENV
from serve_app.launch import ServeProcess
from tests.conftest import CONFIGS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8
CLIENT_TIMEOUT_S = 30.0  # a hang shows as a transport error at 30 s


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """The shipped service, its replicas able to be wedged on purpose (a file naming PIDs)."""
    wedge = tmp_path_factory.mktemp("faults") / "wedge"
    assert compile_config(configfile.load(CONFIGS / "local.yaml"), "configs/local.yaml") == 0
    with ServeProcess(CONFIGS / "local.yaml", start_timeout_s=400,
                      env={WEDGE_ENV: str(wedge)}) as svc:
        svc.wedge_file = wedge
        yield svc


@dataclass
class Answer:
    started: float
    ended: float
    status: int  # 0: no HTTP answer (reset, timeout)
    code: str = ""
    retry_after: str | None = None
    json_body: bool = True

    @property
    def ms(self) -> float:
        return (self.ended - self.started) * 1000


@dataclass
class Load:
    """CLIENTS closed-loop clients until stopped; every answer kept with its times."""

    url: str
    bodies: list
    answers: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
            n = i
            while not self.stop.is_set():
                body = self.bodies[n % len(self.bodies)]
                n += 1
                started = time.monotonic()
                try:
                    r = c.post(self.url, content=body, headers={"Content-Type": "image/jpeg"})
                except httpx.HTTPError as exc:
                    self.answers.append(Answer(started, time.monotonic(), 0,
                                               code=type(exc).__name__))
                    continue
                answer = Answer(started, time.monotonic(), r.status_code,
                                retry_after=r.headers.get("retry-after"))
                if r.status_code != 200:
                    try:
                        answer.code = r.json()["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        answer.json_body = False
                        answer.code = r.text[:80]
                    time.sleep(0.05)  # a client that got a refusal does not spin on it
                self.answers.append(answer)

    def run(self, seconds: float, during=None) -> list:
        with ThreadPoolExecutor(CLIENTS) as pool:
            for i in range(CLIENTS):
                pool.submit(self._client, i)
            began = time.monotonic()
            result = during() if during else None
            time.sleep(max(0.0, seconds - (time.monotonic() - began)))
            self.stop.set()
        return result


def _pid_of(svc, deployment: str) -> int:
    pids = [p for p, d in replica_pids(svc.proc.pid, "serve_app").items() if d == deployment]
    assert len(pids) == 1, (deployment, pids)
    return pids[0]


def _summary(answers: list, fault_at: float) -> dict:
    after = [a for a in answers if a.ended >= fault_at]
    by_status: dict = {}
    for a in answers:
        by_status.setdefault(a.status, []).append(a)
    failed = [a for a in after if a.status != 200]
    in_flight = [a for a in failed if a.started < fault_at]
    served_after = [a for a in after if a.status == 200 and a.started > fault_at]
    last_failure = max((a.ended for a in failed), default=fault_at)
    back = [a for a in served_after if a.started >= last_failure]
    return {
        "sent": len(answers), "served": len(by_status.get(200, [])),
        "statuses": {str(s): len(v) for s, v in sorted(by_status.items())},
        "codes": sorted({a.code for a in failed if a.status}),
        "dropped": sorted({a.code for a in failed if not a.status}),
        "in_flight_failed": len(in_flight),
        "in_flight_answered_within_s": round(max((a.ended - fault_at for a in in_flight),
                                                 default=0.0), 2),
        "refusal_p95_ms": round(sorted(a.ms for a in failed)[int(0.95 * (len(failed) - 1))], 1)
        if failed else None,
        "first_200_after_s": round(min((a.ended for a in served_after), default=fault_at)
                                   - fault_at, 2) if served_after else None,
        "healthy_after_s": round(back[0].ended - fault_at, 2) if back else None,
        "max_ms": round(max(a.ms for a in answers), 1),
    }


def _kill_under_load(svc, deployment: str, seconds: float = 45.0) -> tuple[dict, list]:
    url = f"{svc.url}/v1/classify"
    load = Load(url, [jpeg for _, jpeg in photos_jpeg()])
    victim = _pid_of(svc, deployment)
    fault: dict = {}

    def kill():
        time.sleep(5)
        fault["at"] = time.monotonic()
        os.kill(victim, signal.SIGKILL)

    load.run(seconds, kill)
    report = {"killed": f"{deployment}/{victim}", **_summary(load.answers, fault["at"])}
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
