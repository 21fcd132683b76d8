"""Load profiles, the experiment's timeline/summary arithmetic, and the status parser: no Ray."""

from __future__ import annotations

import pytest

from load_tests import shapes, timeline
from load_tests.sampling import DeploymentReplicas, dashboard_url_from_log, parse_applications


def test_step_goes_up_holds_and_comes_down():
    p = shapes.build("step", 100, base_users=2, peak_users=20)
    assert [p.users_at(t) for t in (0, 14.9, 15, 64.9, 65, 99.9)] == [2, 2, 20, 20, 2, 2]
    assert p.users_at(100) is None and p.users_at(-1) is None
    assert p.rises == (15.0,) and p.hold == (15.0, 65.0) and p.load_end_s == 65.0


def test_spike_is_short():
    p = shapes.build("spike", 100, base_users=1, peak_users=30)
    peak = [t for t in range(100) if p.users_at(t) == 30]
    assert peak[0] == 20 and peak[-1] == 34 and p.users_at(35) == 1


def test_ramp_rises_holds_and_falls():
    p = shapes.build("ramp", 100, base_users=0, peak_users=10)
    assert p.users_at(0) == 0 and p.users_at(17.5) == 5
    assert p.users_at(35) == 10 and p.users_at(64) == 10
    assert p.users_at(99.9) == 0
    values = [p.users_at(t) for t in range(35)]
    assert values == sorted(values)


def test_sine_peaks_in_the_middle():
    p = shapes.build("sine", 120, base_users=2, peak_users=12)
    assert p.users_at(0) == 2 and p.users_at(60) == 12 and p.users_at(119) == 2


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_as_args_round_trip(shape):
    p = shapes.build(shape, 90, 3, 17)
    args = dict(zip(p.as_args()[::2], p.as_args()[1::2]))
    again = shapes.build(args["--shape"], float(args["--shape-duration"]),
                         int(args["--base-users"]), int(args["--peak-users"]))
    assert again == p


def test_bad_parameters():
    with pytest.raises(ValueError):
        shapes.build("square", 10)
    with pytest.raises(ValueError):
        shapes.build("step", 0)
    with pytest.raises(ValueError):
        shapes.build("step", 10, base_users=5, peak_users=2)


# ---- the status API payload ----

def test_parse_applications_counts_states():
    payload = {"applications": {"serve_app": {"deployments": {"Classifier": {
        "target_num_replicas": 3,
        "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"},
                     {"state": "STOPPING"}]}}}, "other": {"deployments": {"X": {
                         "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}}}}}
    assert parse_applications(payload, "serve_app") == {
        "Classifier": DeploymentReplicas(target=3, running=2, starting=1, stopping=1)}
    assert set(parse_applications(payload)) == {"Classifier", "X"}


def test_status_client_reads_one_application_and_sends_the_token(monkeypatch):
    """ServeStatusClient against a stand-in dashboard: the bearer token goes along, one
    application's details come back, and an unreachable dashboard reads as empty."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from load_tests.sampling import APPLICATIONS_PATH, ServeStatusClient

    seen = {}
    payload = {"applications": {"serve_app": {"status": "RUNNING", "last_deployed_time_s": 7.5,
                                              "deployments": {"Ingress": {
                                                  "target_num_replicas": 1,
                                                  "replicas": [{"state": "RUNNING"}]}}},
                                "other": {"status": "DEPLOYING"}}}

    class Dashboard(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["path"], seen["auth"] = self.path, self.headers.get("Authorization")
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    server = HTTPServer(("127.0.0.1", 0), Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        client = ServeStatusClient(url, "serve_app")
        app = client.application()
        assert app["status"] == "RUNNING" and app["last_deployed_time_s"] == 7.5
        assert client.replicas() == {"Ingress": DeploymentReplicas(1, 1, 0, 0)}
        assert seen == {"path": APPLICATIONS_PATH, "auth": "Bearer secret"}
    finally:
        server.shutdown()
        server.server_close()
    assert ServeStatusClient(url, "serve_app", timeout_s=0.5).application() == {}


def test_dashboard_url_from_serve_run_log():
    line = ("INFO worker.py:2029 -- Started a local Ray instance. View the dashboard at "
            "\x1b[1m\x1b[32mhttp://127.0.0.1:8266 \x1b[39m\x1b[22m")
    assert dashboard_url_from_log("noise\n" + line) == "http://127.0.0.1:8266"
    assert dashboard_url_from_log("no dashboard here") is None


# ---- timeline and summary ----

def counts(classifier_running: int, classifier_target: int, stopping: int = 0) -> dict:
    return {"Ingress": DeploymentReplicas(1, 1, 0, 0),
            "Classifier": DeploymentReplicas(classifier_target, classifier_running, 0, stopping)}


def synthetic_run():
    """A 40 s step (up at 6 s, down at 26 s): Classifier 1 -> 2 at 13 s, back to 1 at 35 s."""
    profile = shapes.build("step", 40, base_users=1, peak_users=4)
    samples = []
    for t in range(0, 46):
        if t < 9:
            c = counts(1, 1)
        elif t < 13:
            c = counts(1, 2)
        elif t < 32:
            c = counts(2, 2)
        elif t < 35:
            c = counts(1, 1, stopping=1)
        else:
            c = counts(1, 1)
        samples.append((t + 0.05, c))
    requests = []
    for i in range(400):
        start = i * 0.1 + 0.03  # off the second boundaries
        slow = 6 <= start < 16  # p95 over target until the second replica has served a while
        requests.append(timeline.Request(start, 3.0 if slow else 0.2, 200, "/v1/classify"))
    requests.append(timeline.Request(19.5, 0.01, 503, "/v1/classify"))
    return profile, samples, requests


def test_timeline_columns_and_rows():
    profile, samples, requests = synthetic_run()
    columns, rows = timeline.build_timeline(requests, samples, profile, end_s=45)
    assert columns == ["t_s", "users", "Ingress_target", "Ingress_running", "Classifier_target",
                       "Classifier_running", "rps", "p50_ms", "p95_ms", "p99_ms", "ongoing",
                       "errors", "errors_by_status"]
    assert len(rows) == 46
    assert rows[5]["rps"] == 10 and rows[5]["p95_ms"] == 200.0 and rows[5]["users"] == 1
    assert rows[20]["Classifier_running"] == 2 and rows[20]["users"] == 4
    assert rows[20]["errors"] == 1 and rows[20]["errors_by_status"] == "503:1"
    assert rows[10]["ongoing"] == 30  # 3 s requests, one started every 0.1 s


def test_summary_numbers():
    profile, samples, requests = synthetic_run()
    _, rows = timeline.build_timeline(requests, samples, profile, end_s=45)
    s = timeline.summarize(requests, samples, rows, profile, 45,
                           {"Ingress": 1, "Classifier": 1}, p95_target_ms=1000,
                           meta={"config": "c.yaml", "shape": "step", "policy": "p"})
    assert set(timeline.SUMMARY_KEYS) <= s.keys()
    assert s["scale_up_s"]["Classifier"] == [pytest.approx(7.05, abs=0.06)]  # up at 6, running 2 at 13.05
    assert s["scale_up_s"]["Ingress"] == [None]
    assert s["scale_down_s"] == {"Ingress": pytest.approx(0.05, abs=0.06),
                               "Classifier": pytest.approx(9.05, abs=0.06)}
    # Slow requests started until t=16 finish by t=19; the 5 s window clears at t=24.
    assert s["p95_recover_s"] == [18.0]
    assert s["replica_seconds"]["Classifier"] == pytest.approx(9 * 1 + 4 * 1 + 19 * 2 + 13 * 1,
                                                               abs=0.2)
    assert s["requests"] == 401 and s["failed"] == 1 and s["failed_by_status"] == {"503": 1}
    assert s["p95_hold_ms"] == 3000.0 and s["max_replicas_seen"]["Classifier"] == 2
    # STOPPING seen at 32.05, 33.05, 34.05: requests overlapping 31.05..35.05 (starts 30.93..35.03).
    assert s["requests_while_stopping"] == 42


def test_recovery_when_never_over_or_never_back():
    rows = [{"t_s": t, "p95_ms": 100.0} for t in range(20)]
    assert timeline.p95_recovery(rows, [5.0], 15.0, 500) == [0.0]
    rows = [{"t_s": t, "p95_ms": 900.0 if t >= 5 else 100.0} for t in range(30)]
    assert timeline.p95_recovery(rows, [5.0], 15.0, 500) == [None]


def test_recovery_counts_only_the_last_crossing():
    """A dip under the target that does not last is not a recovery."""
    p95 = {t: 100.0 for t in range(40)}
    p95.update({t: 900.0 for t in (6, 7, 8, 12, 13, 14)})  # over, dip at 9-11, over again
    rows = [{"t_s": t, "p95_ms": v} for t, v in p95.items()]
    assert timeline.p95_recovery(rows, [5.0], 30.0, 500) == [10.0]  # back for good at 15


def test_request_log_is_relative_to_the_shape_start():
    start, reqs = timeline.parse_request_log(
        ["# start 100.0", "101.5,250.0,200,/v1/classify", "", "102.0,3.0,0,/v1/classify/batch"])
    assert start == 100.0
    assert reqs == [timeline.Request(1.5, 0.25, 200, "/v1/classify"),
                    timeline.Request(2.0, 0.003, 0, "/v1/classify/batch")]


def test_percentile_nearest_rank():
    assert timeline.percentile([], 95) is None
    assert timeline.percentile(list(range(1, 101)), 95) == 95
    assert timeline.percentile([5.0], 50) == 5.0
