"""serve_app's own metrics, one set per role, exported through ``ray.serve.metrics``.

Ray adds the ``application``, ``deployment`` and ``replica`` tags and exports them on each
node's metrics port with a ``ray_`` prefix (``serve_app_requests_total`` is scraped as
``ray_serve_app_requests_total``; docs/observability.md). Labels are bounded: route templates,
status and error codes, model names; never a request id or a filename.

:data:`METRICS` is the catalogue (name, kind, unit, tags, meaning): the docs and the
dashboard's tests read it, so a metric cannot be added without saying what it means.

Ray 2.60 exports a histogram's ``_sum`` from its bucket counts at each bucket's midpoint (its
OpenTelemetry recorder), so sums and means from ``_sum`` are approximate; counts and buckets
are exact. Whatever a mean is taken of is therefore counted exactly too (images per group and
per batch), and start times are gauges.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

#: Milliseconds, for every latency histogram: a GPU forward pass (sub-ms to tens of ms) and a
#: CPU one or a queued request (tens to thousands of ms) both land in well-resolved buckets.
LATENCY_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
              30000, 60000)
#: Images per call or per batch: powers of two up to the largest batch a config allows.
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

PREFIX = "ray_"  # what Ray's exporter puts in front of every application metric
#: Ray's exporter drops a gauge value that was not set again within two export intervals, so
#: a value set once (a start time, "compiled") is set again this often, and a watched one
#: (a queue length) is read this often.
GAUGE_REFRESH_S = 2.0


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter | histogram | gauge
    role: str  # the deployment that records it
    tags: tuple[str, ...]
    description: str
    boundaries: Optional[tuple[float, ...]] = None

    @property
    def series(self) -> str:
        """The name Prometheus stores (counters get ``_total`` from Ray's exporter)."""
        suffix = "_total" if self.kind == "counter" and not self.name.endswith("_total") else ""
        return PREFIX + self.name + suffix


METRICS: tuple[Metric, ...] = (
    # ---- ingress: the HTTP surface and the grouping queue (serve_app/batching.py)
    Metric("serve_app_requests", "counter", "Ingress", ("route", "code"),
           "HTTP requests answered, by route template and status code."),
    Metric("serve_app_request_duration_ms", "histogram", "Ingress", ("route", "code"),
           "End-to-end time in the ingress, from the request's arrival to its response.",
           LATENCY_MS),
    Metric("serve_app_images_received", "counter", "Ingress", ("route",),
           "Images received (a batch request counts each file)."),
    Metric("serve_app_bytes_received", "counter", "Ingress", ("route",),
           "Request body bytes read by the classify routes."),
    Metric("serve_app_rejected_requests", "counter", "Ingress", ("route", "error"),
           "Requests answered with an error, by serve_app's error code (invalid_image, "
           "payload_too_large, overloaded, timeout, ...)."),
    Metric("serve_app_dispatch_wait_ms", "histogram", "Ingress", (),
           "Time an image waited in the ingress for a free call slot (the grouping queue).",
           LATENCY_MS),
    Metric("serve_app_group_size", "histogram", "Ingress", (),
           "Images per downstream call (one preprocessor and one classifier call per group).",
           SIZES),
    Metric("serve_app_grouped_images", "counter", "Ingress", (),
           "Images sent downstream in groups (exact; with the group_size count, the mean)."),
    Metric("serve_app_group_duration_ms", "histogram", "Ingress", (),
           "Time of one group's preprocessor + classifier calls, as the ingress sees them.",
           LATENCY_MS),
    Metric("serve_app_dispatch_queued", "gauge", "Ingress", (),
           "Images waiting in the grouping queue now."),
    Metric("serve_app_dispatch_in_flight", "gauge", "Ingress", (),
           "Images in downstream calls that have not returned yet."),
    # ---- preprocessor
    Metric("serve_app_preprocess_ms", "histogram", "Preprocessor", ("outcome",),
           "Decode + resize + crop of one image (outcome ok or error).", LATENCY_MS),
    # ---- classifier
    Metric("serve_app_batch_wait_ms", "histogram", "Classifier", ("model",),
           "Time an image waited in @serve.batch before its forward pass began.", LATENCY_MS),
    Metric("serve_app_forward_ms", "histogram", "Classifier", ("model",),
           "One forward pass (normalize, network, softmax) for a whole batch.", LATENCY_MS),
    Metric("serve_app_batch_size", "histogram", "Classifier", ("model",),
           "Images per forward pass.", SIZES),
    Metric("serve_app_batched_images", "counter", "Classifier", ("model",),
           "Images through forward passes (exact; with the batch_size count, the mean)."),
    Metric("serve_app_replica_start_seconds", "gauge", "Classifier", ("model", "phase"),
           "This classifier replica's start, by phase: load (weights or compiled artifact), "
           "warmup, compile (a background artifact build, from start to swap-in)."),
    Metric("serve_app_replicas_starting", "gauge", "Classifier", ("model",),
           "1 while this classifier replica loads and warms up, 0 once it serves."),
    Metric("serve_app_compiled", "gauge", "Classifier", ("model",),
           "1 when this replica runs the compiled artifact, 0 while it runs eager."),
)

_BY_NAME = {m.name: m for m in METRICS}


def route_label(scope: dict) -> str:
    """The matched route's template (``/v1/classify``), never the raw path: unmatched paths
    (scanners, typos) share one label so the series stay bounded."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class _Recorder:
    """The metric objects of one role, made in the replica that records them. Gauges are set
    through :meth:`set_gauge`, which keeps them exported until they change; given a function,
    it reads the value every GAUGE_REFRESH_S, off the request path."""

    role = ""

    def __init__(self, default_tags: Optional[dict[str, str]] = None):
        self._gauges: dict[tuple[str, tuple], Union[float, Callable[[], float]]] = {}
        self._gauge_lock = threading.Lock()
        self._refresher: Optional[threading.Thread] = None
        from ray.serve import metrics as serve_metrics

        kinds = {"counter": serve_metrics.Counter, "gauge": serve_metrics.Gauge,
                 "histogram": serve_metrics.Histogram}
        self._metrics = {}
        for m in METRICS:
            if m.role != self.role:
                continue
            kwargs = {"boundaries": list(m.boundaries)} if m.boundaries else {}
            metric = kinds[m.kind](m.name, description=m.description, tag_keys=m.tags, **kwargs)
            defaults = {k: v for k, v in (default_tags or {}).items() if k in m.tags}
            if defaults:
                metric.set_default_tags(defaults)
            self._metrics[m.name] = metric

    def __getitem__(self, name: str):
        return self._metrics[name]

    def set_gauge(self, name: str, value: Union[float, Callable[[], float]],
                  tags: Optional[dict[str, str]] = None) -> None:
        key = (name, tuple(sorted((tags or {}).items())))
        with self._gauge_lock:
            self._gauges[key] = value
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                                   name="serve_app-gauges")
                self._refresher.start()
        self._export(key, value)

    def _export(self, key: tuple[str, tuple], value) -> None:
        name, tags = key
        self[name].set(value() if callable(value) else value, tags=dict(tags) or None)

    def _refresh(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._gauge_lock:
                gauges = list(self._gauges.items())
            for key, value in gauges:
                self._export(key, value)


class IngressMetrics(_Recorder):
    role = "Ingress"

    def request(self, route: str, code: int, duration_ms: float) -> None:
        tags = {"route": route, "code": str(code)}
        self["serve_app_requests"].inc(tags=tags)
        self["serve_app_request_duration_ms"].observe(duration_ms, tags=tags)

    def received(self, route: str, images: int, nbytes: int) -> None:
        # Ray's counters refuse an increment of 0 (an empty body is a valid request here).
        if images > 0:
            self["serve_app_images_received"].inc(images, tags={"route": route})
        if nbytes > 0:
            self["serve_app_bytes_received"].inc(nbytes, tags={"route": route})

    def rejected(self, route: str, error: str) -> None:
        self["serve_app_rejected_requests"].inc(tags={"route": route, "error": error})

    def group(self, size: int, waits_ms: list[float]) -> None:
        self["serve_app_group_size"].observe(size)
        self["serve_app_grouped_images"].inc(size)
        wait = self["serve_app_dispatch_wait_ms"]
        for ms in waits_ms:
            wait.observe(ms)

    def group_done(self, duration_ms: float) -> None:
        self["serve_app_group_duration_ms"].observe(duration_ms)

    def watch_queue(self, queued: Callable[[], int], in_flight: Callable[[], int]) -> None:
        """The grouping queue's lengths, read every GAUGE_REFRESH_S (not on each request)."""
        self.set_gauge("serve_app_dispatch_queued", queued)
        self.set_gauge("serve_app_dispatch_in_flight", in_flight)


class PreprocessorMetrics(_Recorder):
    role = "Preprocessor"

    def image(self, duration_s: float, error: Optional[Exception]) -> None:
        self["serve_app_preprocess_ms"].observe(
            duration_s * 1000, tags={"outcome": "ok" if error is None else "error"})


class ClassifierMetrics(_Recorder):
    role = "Classifier"

    def __init__(self, model: str):
        super().__init__({"model": model})

    def batch(self, size: int, forward_s: float, waits_s: list[float]) -> None:
        self["serve_app_batch_size"].observe(size)
        self["serve_app_batched_images"].inc(size)
        self["serve_app_forward_ms"].observe(forward_s * 1000)
        wait = self["serve_app_batch_wait_ms"]
        for s in waits_s:
            wait.observe(s * 1000)

    def start_phase(self, phase: str, seconds: float) -> None:
        self.set_gauge("serve_app_replica_start_seconds", seconds, {"phase": phase})

    def starting(self, starting: bool) -> None:
        self.set_gauge("serve_app_replicas_starting", 1 if starting else 0)

    def compiled(self, compiled: bool) -> None:
        self.set_gauge("serve_app_compiled", 1 if compiled else 0)


def metric(name: str) -> Metric:
    return _BY_NAME[name]
