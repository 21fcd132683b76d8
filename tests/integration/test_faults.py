"""Faults under load on the shared service's ``configs/local.yaml`` application (HAProxy in
front): SIGKILL of the classifier, the preprocessor and the ingress replica while 8 clients
run, and classifiers whose model wedges (their processes alive). Asserted: the outcomes
docs/reliability.md documents, on any machine: every request gets an answer, a 200 or a JSON
5xx telling the client to retry (never a 500, a hang or an undocumented reset), the replica is
replaced and the clients are served again. The scenarios are load_tests/reliability.py's; its
command measures them at length (recovery times: ``python -m load_tests.reliability``).

These break the shared service on purpose, so they run after every test that only uses it
(tests/integration/conftest.py orders them), and each waits for the service to be whole again.
"""

import json

import pytest

from load_tests import reliability
from load_tests.closed_loop import CLIENT_TIMEOUT_S

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 8


def _assert_answered(report: dict, answers: list, allowed: set) -> None:
    assert answers and {a.status for a in answers} <= {200} | allowed, report
    assert all(a.json_body for a in answers if a.status != 200), report  # never Ray's plain 500
    assert all(a.retry_after == "1" for a in answers if a.status in (502, 503)), report
    assert report["max_ms"] < CLIENT_TIMEOUT_S * 1000, report  # an answer, not a hang
    assert report["healthy_after_s"] is not None and report["replaced_by"], report


def test_a_killed_classifier_fails_its_requests_fast_and_is_replaced(service):
    report, answers = reliability.kill_under_load(service, "Classifier", clients=CLIENTS)
    print("fault Classifier:", json.dumps(report))
    _assert_answered(report, answers, {503})
    assert set(report["codes"]) <= {"replica_lost", "not_ready", "overloaded"}, report


def test_a_killed_preprocessor_fails_its_requests_fast_and_is_replaced(service):
    report, answers = reliability.kill_under_load(service, "Preprocessor", clients=CLIENTS)
    print("fault Preprocessor:", json.dumps(report))
    _assert_answered(report, answers, {503})
    assert set(report["codes"]) <= {"replica_lost", "not_ready", "overloaded"}, report


def test_a_killed_ingress_through_haproxy_is_json_never_a_plain_500(service):
    """HAProxy replays a request whose ingress closed without answering (serve_app's
    ``retry-on empty-response`` with whole requests buffered, serve_app/haproxy_replay.py).
    What it cannot replay (a request the ingress had not read) gets its JSON 502 on a fresh
    server connection, and on a reused one is closed with no answer, by HAProxy's design (the
    client may resend it: nothing was answered; serve_app.client does, next test). Without the
    replay all CLIENTS requests in flight were lost that way."""
    report, answers = reliability.kill_under_load(service, "Ingress", clients=CLIENTS)
    print("fault Ingress:", json.dumps(report))
    dropped = [a for a in answers if a.status == 0]
    assert all(a.code in ("RemoteProtocolError", "ReadError") for a in dropped), report
    _assert_answered(report, [a for a in answers if a.status != 0], {502, 503})
    # Runs here lost 0-1 of the CLIENTS in flight; before the replay, every one of them.
    assert len(dropped) + report["statuses"].get("502", 0) <= CLIENTS // 2, report


def test_a_killed_ingress_costs_serve_apps_client_nothing(service):
    """HAProxy closes a keep-alive request whose server died before answering, and which it
    could not replay, without a response, on purpose (RFC 9112 9.3.1: the client may send it
    again): the raw clients' drop above. serve_app.client resends on exactly that, honours the
    502/503's Retry-After, and every one of its requests is served."""
    report = reliability.kill_ingress_under_client(service, clients=CLIENTS)
    print("fault Ingress, serve_app.client:", json.dumps(report))
    assert report["failed"] == [] and report["served"] > 0, report


def test_wedged_classifiers_are_found_by_their_health_check_and_replaced(service):
    """No traffic: only a health check that runs the model can tell a replica is stuck."""
    report = reliability.wedge(service, service.wedge_file)
    print("fault wedge:", json.dumps(report))
    assert report["serving_after_s"] is not None, report
