"""serve_app.metrics, the ASGI request metrics and the dashboard, without Ray running."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from serve_app import dashboard, imaging, metrics, request_metrics
from serve_app.errors import InvalidImage

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_the_catalogue_is_unique_valid_and_bounded():
    names = [m.name for m in metrics.METRICS]
    assert len(names) == len(set(names))
    for m in metrics.METRICS:
        assert NAME.match(m.name) and m.name.startswith("serve_app_"), m.name
        assert m.kind in ("counter", "gauge", "histogram") and m.description
        assert (m.boundaries is not None) == (m.kind == "histogram"), m.name
        # Bounded labels only: never a request id, a filename or a raw path.
        assert set(m.tags) <= {"route", "code", "error", "model", "phase", "outcome"}, m.name
        assert m.role in ("Ingress", "Preprocessor", "Classifier")


def test_latency_buckets_resolve_gpu_and_cpu_times():
    b = metrics.LATENCY_MS
    assert list(b) == sorted(b)
    assert sum(x < 10 for x in b) >= 5  # sub-ms to 10 ms: a GPU forward pass
    assert sum(10 <= x <= 5000 for x in b) >= 8  # tens to thousands of ms: CPU, queues


def test_series_names_as_prometheus_stores_them():
    assert metrics.metric("serve_app_requests").series == "ray_serve_app_requests_total"
    assert metrics.metric("serve_app_forward_ms").series == "ray_serve_app_forward_ms"


class FakeRecorder:
    def __init__(self):
        self.requests, self.rejected_codes = [], []

    def request(self, route, code, duration_ms):
        self.requests.append((route, code))

    def rejected(self, route, error):
        self.rejected_codes.append((route, error))


@pytest.fixture
def recorder():
    fake = FakeRecorder()
    request_metrics.configure(fake, log_requests=True)
    yield fake
    request_metrics.configure(None, log_requests=False)


def probe_app() -> FastAPI:
    """An app with the ingress's error handlers and middleware (its routers need a Gateway:
    tests/unit/test_api.py), and routes that fail each way."""
    from ray.serve.exceptions import BackPressureError

    from serve_app.api.common import install_error_handlers
    from serve_app.errors import InvalidImage

    probe = FastAPI()
    install_error_handlers(probe)
    probe.add_middleware(request_metrics.RequestMetrics)

    @probe.post("/v1/classify")
    async def classify(top_k: int = Query(5, le=20)):
        raise InvalidImage("not an image")

    @probe.get("/raise/{kind}")
    async def boom(kind: str):
        raise {"busy": BackPressureError(num_queued_requests=1, max_queued_requests=1),
               "slow": TimeoutError(), "bug": RuntimeError("bug")}[kind]

    return probe


def test_requests_are_counted_by_route_template_and_status(recorder):
    with TestClient(probe_app(), raise_server_exceptions=False) as client:
        assert client.post("/v1/classify").status_code == 400
        assert client.get("/no/such/path/123").status_code == 404
        assert client.post("/v1/classify?top_k=99").status_code == 422
    assert recorder.requests == [("/v1/classify", 400), ("unmatched", 404), ("/v1/classify", 422)]
    assert recorder.rejected_codes == [("/v1/classify", "invalid_image"),
                                       ("unmatched", "not_found"),
                                       ("/v1/classify", "invalid_parameter")]


def test_overload_and_timeouts_are_seen_as_503_and_504(recorder):
    """Handled inside the app by class, so the middleware sees the status the client gets."""
    with TestClient(probe_app(), raise_server_exceptions=False) as client:
        answers = [client.get(f"/raise/{k}") for k in ("busy", "slow", "bug")]
    assert [r.status_code for r in answers] == [503, 504, 500]
    assert [r.json()["error"]["code"] for r in answers] == ["overloaded", "timeout",
                                                            "internal_error"]
    assert recorder.requests == [("/raise/{kind}", 503), ("/raise/{kind}", 504),
                                 ("/raise/{kind}", 500)]
    assert [code for _, code in recorder.rejected_codes] == ["overloaded", "timeout",
                                                             "internal_error"]


def test_a_cancelled_request_is_499_not_500(recorder):
    async def app(scope, receive, send):
        raise asyncio.CancelledError

    middleware = request_metrics.RequestMetrics(app)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(middleware({"type": "http", "method": "GET", "headers": []}, None, None))
    assert recorder.requests == [("unmatched", 499)]


def test_preprocess_many_times_every_image():
    spec = imaging.TransformSpec(resize_size=8, crop_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    from tests.conftest import encode
    import numpy as np

    heard = []
    crops = imaging.preprocess_many([encode(np.zeros((16, 16, 3), np.uint8)), b"junk"], spec,
                                    10_000, lambda s, e: heard.append((s, e)))
    assert len(heard) == 2 and heard[0][1] is None and isinstance(heard[1][1], InvalidImage)
    assert all(0 <= s < 5 for s, _ in heard) and crops.pixels.shape[0] == 1


def test_dashboard_panels_query_known_series():
    known = {m.series for m in metrics.METRICS} | {
        m.series + suffix for m in metrics.METRICS if m.kind == "histogram"
        for suffix in ("_bucket", "_sum", "_count")}
    for panel in dashboard.panels():
        assert panel.targets and panel.description
        for _, expr in panel.targets:
            for series in re.findall(r"\bray_serve_app_[a-z_]+", expr):
                assert series in known, (panel.title, series)


def test_dashboard_json_is_grafana_shaped_and_up_to_date():
    data = json.loads(dashboard.text())
    panels = [p for p in data["panels"] if p["type"] == "timeseries"]
    assert len(panels) == len(dashboard.panels())
    assert len({p["id"] for p in data["panels"]}) == len(data["panels"])
    assert all(t["expr"] and t["refId"] for p in panels for t in p["targets"])
    assert dashboard.write(check=True) == 0, "run python -m serve_app dashboard"


def test_every_metric_is_documented():
    docs = (dashboard.ROOT / "docs" / "observability.md").read_text()
    missing = [m.series for m in metrics.METRICS if f"`{m.series}`" not in docs]
    assert not missing, f"docs/observability.md does not describe {missing}"


def test_gauges_are_set_again_until_they_change(monkeypatch):
    """Ray's exporter drops a gauge not set within two export intervals: a start time set
    once must keep being set."""
    import time as _time

    monkeypatch.setattr(metrics, "GAUGE_REFRESH_S", 0.05)
    recorder = metrics.ClassifierMetrics("m")
    calls = []
    gauge = recorder["serve_app_compiled"]
    monkeypatch.setattr(gauge, "set", lambda value, tags=None: calls.append(value))
    recorder.compiled(False)
    _time.sleep(0.3)
    recorder.compiled(True)
    _time.sleep(0.3)
    assert calls[0] == 0 and calls.count(0) >= 3 and calls[-1] == 1 and calls.count(1) >= 3


def test_the_ingress_request_line_is_what_load_tests_stages_parses(recorder, caplog):
    from load_tests.stages import INGRESS_LINE

    app = FastAPI()
    app.add_middleware(request_metrics.RequestMetrics)

    @app.post("/v1/classify")
    async def classify():
        return {"ok": True}

    with caplog.at_level("INFO", logger="ray.serve"), TestClient(app) as client:
        client.post("/v1/classify", headers={"x-request-id": "req-7"})
    lines = [r.getMessage() for r in caplog.records if "request_id=" in r.getMessage()]
    match = INGRESS_LINE.search(lines[-1])
    assert match and match.group(1) == "req-7" and match.group(2) == "200"
    record = [r for r in caplog.records if "request_id=" in r.getMessage()][-1]
    assert record.request_ids == ["req-7"] and record.serve_app_stage == "ingress"


def test_a_watched_gauge_is_read_off_the_request_path(monkeypatch):
    """The ingress queue gauges are functions read every GAUGE_REFRESH_S, so they follow the
    queue down to 0 after traffic without a call on each request."""
    import time as _time

    monkeypatch.setattr(metrics, "GAUGE_REFRESH_S", 0.05)
    recorder = metrics.IngressMetrics()
    seen = {"serve_app_dispatch_queued": [], "serve_app_dispatch_in_flight": []}
    for name, values in seen.items():
        monkeypatch.setattr(recorder[name], "set", lambda v, tags=None, out=values: out.append(v))
    queue = [3]
    recorder.watch_queue(lambda: queue[0], lambda: 2 * queue[0])
    _time.sleep(0.2)
    queue[0] = 0
    _time.sleep(0.2)
    queued, in_flight = seen["serve_app_dispatch_queued"], seen["serve_app_dispatch_in_flight"]
    assert queued[0] == 3 and queued[-1] == 0 and len(queued) >= 4
    assert in_flight[0] == 6 and in_flight[-1] == 0
