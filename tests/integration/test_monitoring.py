"""serve_app's metrics in a real Prometheus, every dashboard panel with data, request ids
followed through the log files, and X-Request-ID through Ray's own proxy.

Prometheus scrapes the shared test service's fixed metrics port (serve_app/runner.py); the
binary is Debian's ``prometheus`` package (tests/integration/prometheus.py).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from serve_app import dashboard
from serve_app.launch import ServeProcess
from tests.conftest import CONFIGS, encode
from tests.integration.conftest import METRICS_REPORT_MS
from load_tests import prometheus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

needs_prometheus = pytest.mark.skipif(
    prometheus.binary() is None,
    reason="no prometheus binary: `apt-get install prometheus` (Debian's package; .ci/run "
           "installs it where apt-get works) or set SERVE_APP_PROMETHEUS to one")

APP = 'application="serve_app"'
# Counters and histogram parts whose change over one burst of traffic is known exactly.
SERIES = {
    "ok": f'ray_serve_app_requests_total{{{APP},route="/v1/classify",code="200"}}',
    "bad": f'ray_serve_app_requests_total{{{APP},route="/v1/classify",code="400"}}',
    "durations": f'ray_serve_app_request_duration_ms_count{{{APP},route="/v1/classify"}}',
    "rejected": f'ray_serve_app_rejected_requests_total{{{APP},route="/v1/classify",error="invalid_image"}}',
    "images": f'ray_serve_app_images_received_total{{{APP},route="/v1/classify"}}',
    "bytes": f'ray_serve_app_bytes_received_total{{{APP},route="/v1/classify"}}',
    "dispatch_waits": f"ray_serve_app_dispatch_wait_ms_count{{{APP}}}",
    "groups": f"ray_serve_app_group_size_count{{{APP}}}",
    "group_images": f"ray_serve_app_grouped_images_total{{{APP}}}",
    "decoded": f'ray_serve_app_preprocess_ms_count{{{APP},outcome="ok"}}',
    "undecodable": f'ray_serve_app_preprocess_ms_count{{{APP},outcome="error"}}',
    "batched_images": f"ray_serve_app_batched_images_total{{{APP}}}",
    "batches": f"ray_serve_app_batch_size_count{{{APP}}}",
    "forwards": f"ray_serve_app_forward_ms_count{{{APP}}}",
    "batch_waits": f"ray_serve_app_batch_wait_ms_count{{{APP}}}",
}


#: Two readings this far apart bracket one of Ray's metric reports (the test cluster reports
#: every METRICS_REPORT_MS; Ray's default is 10 s) and one Prometheus scrape (1 s).
SETTLE_S = 1.5 * METRICS_REPORT_MS / 1000 + 1


def serve_logs(svc: ServeProcess, app: str, deployment: str) -> list[Path]:
    return sorted((svc.ray_dir / "session_latest" / "logs" / "serve").glob(
        f"replica_{app}_{deployment}_*.log"))


def log_lines(svc: ServeProcess, app: str, deployment: str) -> list[str]:
    return [line for path in serve_logs(svc, app, deployment)
            for line in path.read_text(errors="replace").splitlines()]


def totals(prom: prometheus.Prometheus) -> dict[str, float]:
    return {key: prom.value(f"sum({expr})") or 0.0 for key, expr in SERIES.items()}


def settled(prom: prometheus.Prometheus, timeout_s: float = 90.0,
            until=lambda values: True) -> dict[str, float]:
    """The totals once ``until`` holds and two readings agree that are further apart than
    Ray's exporter reports (every 2 s in the test cluster, ``METRICS_REPORT_MS``: a reading can
    trail the traffic by one report)."""
    deadline = time.monotonic() + timeout_s
    last = totals(prom)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        now = totals(prom)
        if now == last and until(now):
            return now
        last = now
    return last


@pytest.fixture(scope="module")
def prom(service):
    target = service.metrics_url.split("//", 1)[1].split("/", 1)[0]
    with prometheus.Prometheus([target]) as p:
        deadline = time.monotonic() + 60
        while p.value('sum(up{job="ray"})') != 1.0 or p.value("count(ray_serve_app_requests_total)") is None:
            assert time.monotonic() < deadline, "no serve_app series scraped:\n" + p.log_tail()
            time.sleep(1)
        yield p


@pytest.fixture(scope="module")
def burst(service, prom, photos):
    """24 photos from 8 clients and 2 undecodable bodies, each with a known request id; the
    counter totals before and after."""
    token = uuid.uuid4().hex[:8]
    good = [encode(photos["chelsea" if i % 2 else "coffee"]) for i in range(24)]
    bad = [b"not an image", b"\xff\xd8\xff truncated"]

    def send(i_body):
        i, body = i_body
        with httpx.Client(base_url=service.url, timeout=60) as c:
            return c.post("/v1/classify", content=body, headers={
                "content-type": "image/jpeg", "x-request-id": f"prom-{token}-{i}"}).status_code

    # A series appears at its first export with that traffic already in it, and Prometheus
    # cannot count an increase it never saw: one good and one bad request make every series
    # exist (if no earlier test did) before the baseline is read.
    assert [send(("warm-good", good[0])), send(("warm-bad", bad[0]))] == [200, 400]
    deadline = time.monotonic() + 60
    while any(prom.value(f"count({expr})") is None for expr in SERIES.values()):
        assert time.monotonic() < deadline, "serve_app's series never appeared"
        time.sleep(2)
    before = settled(prom)

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, enumerate(good + bad)))
    assert codes == [200] * len(good) + [400] * len(bad)
    expected = {"ok": len(good), "bad": len(bad), "durations": len(good) + len(bad),
                "rejected": len(bad), "images": len(good) + len(bad),
                "bytes": sum(map(len, good + bad)), "dispatch_waits": len(good) + len(bad),
                "group_images": len(good) + len(bad), "decoded": len(good),
                "undecodable": len(bad), "batched_images": len(good),
                "batch_waits": len(good)}
    after = settled(prom, until=lambda now: all(
        now[k] - before[k] >= v for k, v in expected.items()))
    return {"token": token, "before": before, "after": after, "expected": expected}


@needs_prometheus
def test_prometheus_counts_what_was_sent(service, burst):
    before, after, expected = burst["before"], burst["after"], burst["expected"]
    delta = {k: after[k] - before[k] for k in after}
    assert {k: delta[k] for k in expected} == expected
    # The forward-pass histogram counts the batches the classifier ran: one per batch line
    # its log has for this burst's requests (args.log_requests in the test config).
    batch_lines = [line for line in log_lines(service, "serve_app", "Classifier")
                   if re.search(rf"prom-{burst['token']}-\d", line) and "batch of" in line]
    assert delta["forwards"] == delta["batches"] == len(batch_lines)
    logged_images = sum(int(line.split("batch of ")[1].split()[0]) for line in batch_lines)
    assert logged_images == expected["batched_images"]
    assert 1 <= delta["groups"] <= expected["group_images"]
    assert expected["batched_images"] / 8 <= delta["batches"] <= expected["batched_images"]


@needs_prometheus
def test_every_dashboard_panel_has_data(prom, burst):
    """Each target of each panel of monitoring/grafana/serve_app.json returns a finite value
    right after traffic (GPU panels only where there is a GPU)."""
    empty, checked = [], 0
    for panel in dashboard.panels():
        if panel.gpu_only and not torch.cuda.is_available():
            continue
        for legend, expr in panel.targets:
            result = prom.query(expr.replace(dashboard.RATE, "2m"))
            values = [float(r["value"][1]) for r in result]
            checked += 1
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{panel.title} [{legend}]: {expr} -> {result}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert checked >= 20


def test_dashboard_file_is_generated_from_code():
    assert dashboard.write(check=True) == 0, "run python -m serve_app dashboard"


def _follow(svc: ServeProcess, app: str, rid: str, parse, done=None) -> dict[str, list]:
    """The log records naming ``rid`` in each deployment's log files, once ``done(found)`` (by
    default: one record per deployment). They flush in a moment, and the ingress writes its
    request line after the response, so a record may come after another of the same request."""
    deadline = time.monotonic() + 20
    while True:
        found = {dep: [r for r in map(parse, log_lines(svc, app, dep)) if r and rid in r["ids"]]
                 for dep in ("Ingress", "Preprocessor", "Classifier")}
        if (done or (lambda f: all(f.values())))(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _json_record(line: str):
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ids = set(record.get("request_ids") or []) | {record.get("request_id")}
    return {"ids": ids, **record}


def _text_record(line: str):
    ids = set()
    for part in line.split():
        key, _, value = part.partition("=")
        if key in ("request_id", "request_ids"):
            ids.update(value.split(","))
    return {"ids": ids, "line": line}


def _classify_with_an_id(client: httpx.Client, path: str, photo) -> str:
    """POST a photo with a fresh X-Request-ID; the answer must carry it back."""
    rid = f"follow-{uuid.uuid4().hex}"
    response = client.post(path, content=encode(photo),
                           headers={"content-type": "image/jpeg", "x-request-id": rid})
    assert response.status_code == 200 and response.json()["request_id"] == rid
    return rid


def test_one_request_is_followed_through_the_json_logs(service, client, photos):
    """/exact logs in Ray's JSON encoding: the ingress line carries the request id (Ray's
    context), the preprocessor and the classifier's @serve.batch line carry it in
    ``request_ids`` (serve_app carries them; Ray's context names one request per call)."""
    rid = _classify_with_an_id(client, "/exact/v1/classify", photos["coffee"])
    names = {"Ingress": "ingress", "Preprocessor": "preprocessor", "Classifier": "classifier"}

    def stages(found):  # Ray logs other lines in the context too
        return {dep: [r for r in records if r.get("serve_app_stage") == names[dep]]
                for dep, records in found.items()}

    found = _follow(service, "exact", rid, _json_record, lambda f: all(stages(f).values()))
    stage = stages(found)
    assert all(stage.values()), found
    assert stage["Ingress"][0]["request_id"] == rid and "-> 200" in stage["Ingress"][0]["message"]
    assert rid in stage["Preprocessor"][0]["request_ids"]
    batch = stage["Classifier"][0]
    assert rid in batch["request_ids"] and batch["message"].startswith("request_ids=")
    assert batch["serve_app_stage"] == "classifier" and batch["deployment"] == "exact_Classifier"


def test_one_request_is_followed_through_the_text_logs(service, client, photos):
    rid = _classify_with_an_id(client, "/v1/classify", photos["chelsea"])
    found = _follow(service, "serve_app", rid, _text_record)
    assert all(found.values()), found
    assert "batch of" in found["Classifier"][0]["line"]


def _tiny(config: dict) -> None:
    app = config["applications"][0]
    app["args"]["model"] = {"name": "resnet18", "weights": None, "compile": False}
    app["args"]["log_requests"] = True
    app.pop("autoscaling_policy", None)
    for entry in app["deployments"]:
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = 1


@pytest.fixture(scope="module")
def rays_proxy():
    """A small cluster behind Ray's Python proxy (RAY_SERVE_ENABLE_HA_PROXY=0), what a plain
    ``serve run configs/local.yaml`` gives."""
    with ServeProcess(CONFIGS / "local.yaml", edit=_tiny,
                      env={"RAY_SERVE_ENABLE_HA_PROXY": "0"}) as svc:
        yield svc


def _slow_post(url: str, path: str, size: int, chunked: bool = False) -> tuple[int, bytes]:
    """POST ``size`` bytes in 256 KiB writes 2 ms apart (a client on a real network), then
    read the answer; a reset while sending or reading raises."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    framing = ("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: image/jpeg\r\n"
            f"{framing}\r\nConnection: close\r\n\r\n").encode()
    piece = b"x" * (256 << 10)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(head)
        for _ in range(size // len(piece)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            time.sleep(0.002)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_an_oversized_body_gets_the_json_413_through_rays_proxy(rays_proxy):
    """Answered from Content-Length while the client was still sending, a 20 MB body used to
    get a connection reset through Ray's proxy; the ingress now reads and drops it first."""
    status, body = _slow_post(rays_proxy.url, "/v1/classify", 20 << 20)
    assert status == 413 and b"payload_too_large" in body
    status, body = _slow_post(rays_proxy.url, "/v2/models/resnet18/infer", 12 << 20,
                              chunked=True)
    assert status == 413 and b"limit" in body


def test_request_id_round_trips_through_rays_proxy(rays_proxy, photos):
    """The same X-Request-ID contract with Ray's Python proxy (RAY_SERVE_ENABLE_HA_PROXY=0) as
    with HAProxy (tests/integration/test_service.py): echoed in the header and the body, on
    success and on an error, and in the replicas' log lines."""
    svc = rays_proxy
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        rid = f"rayproxy-{uuid.uuid4().hex}"
        ok = c.post("/v1/classify", content=encode(photos["coffee"]),
                    headers={"content-type": "image/jpeg", "x-request-id": rid})
        assert ok.status_code == 200
        assert ok.headers["x-request-id"] == rid and ok.json()["request_id"] == rid
        bad = c.post("/v1/classify", content=b"x", headers={"content-type": "text/plain",
                                                             "x-request-id": rid + "-e"})
        assert bad.status_code == 415
        assert bad.headers["x-request-id"] == rid + "-e" and bad.json()["request_id"] == rid + "-e"
        made = c.get("/healthz")
        assert len(made.headers["x-request-id"]) >= 16  # one is made when none is sent
    found = _follow(svc, "serve_app", rid, _text_record)
    assert all(found.values()), found
