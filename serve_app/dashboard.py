"""The Grafana dashboard, as data: rows of panels, each a question and its PromQL.

    python -m serve_app dashboard           # writes monitoring/grafana/serve_app.json
    python -m serve_app dashboard --check   # fails if the file is stale (a unit test runs it)

tests/integration/test_monitoring.py runs every panel's expressions against a real Prometheus
scraping a real service after traffic: a panel that would show nothing fails the test.
Expressions use Grafana's ``$__rate_interval``; the test substitutes a fixed window.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_PATH = ROOT / "monitoring" / "grafana" / "serve_app.json"
RATE = "$__rate_interval"
CLASSIFY = 'route=~"/v1/classify.*"'


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[tuple[str, str], ...]  # (legend, PromQL)
    unit: str = "short"
    #: Only on nodes with GPUs: Ray exports no GPU series on a CPU-only node.
    gpu_only: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    question: str  # what the row answers (the README and docs/observability.md quote it)
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _quantiles(metric: str, by: str = "", selector: str = "") -> tuple[tuple[str, str], ...]:
    group = f"le{', ' + by if by else ''}"
    legend_by = f" {{{{{by}}}}}" if by else ""
    return tuple(
        (f"p{int(q * 100)}{legend_by}",
         f"histogram_quantile({q}, sum by ({group}) "
         f"(rate(ray_{metric}_bucket{{{selector}}}[{RATE}])))")
        for q in (0.5, 0.95, 0.99))


def _p95(metric: str, legend: str) -> tuple[str, str]:
    return (legend, f"histogram_quantile(0.95, sum by (le) (rate(ray_{metric}_bucket[{RATE}])))")


def _ratio(numerator: str, denominator: str, by: str = "") -> str:
    """rate / rate of two exact series (Ray's histogram ``_sum`` is approximate)."""
    group = f" by ({by})" if by else ""
    return (f"sum{group} (rate({numerator}[{RATE}])) / "
            f"sum{group} (rate({denominator}[{RATE}]))")


ROWS: tuple[Row, ...] = (
    Row("Traffic", "How much is coming in, and how much of it fails?", (
        Panel("Requests per second by route", "Answered HTTP requests (all status codes).",
              (("{{route}}", f"sum by (route) (rate(ray_serve_app_requests_total[{RATE}]))"),),
              "reqps"),
        Panel("Images per second", "Images received by the classify routes.",
              (("images", f"sum (rate(ray_serve_app_images_received_total[{RATE}]))"),
               ("bytes/1000", f"sum (rate(ray_serve_app_bytes_received_total[{RATE}])) / 1000")),
              "short"),
        Panel("Responses by status code", "Every answer, by HTTP status.",
              (("{{code}}", f"sum by (code) (rate(ray_serve_app_requests_total[{RATE}]))"),),
              "reqps"),
        Panel("Errors by code", "serve_app's error codes: client errors (invalid_image, "
              "payload_too_large, ...) and overload/timeouts (overloaded, timeout).",
              (("{{error}}",
                f"sum by (error) (rate(ray_serve_app_rejected_requests_total[{RATE}]))"),),
              "reqps"),
    )),
    Row("Latency", "How long do requests take, and which stage is it?", (
        Panel("End-to-end latency (classify routes)", "In the ingress, arrival to response.",
              _quantiles("serve_app_request_duration_ms", selector=CLASSIFY), "ms"),
        Panel("Latency p95 by stage", "Where a request's time goes: waiting for a call slot "
              "in the ingress, the group's downstream calls, decoding one image, waiting in "
              "the classifier's batch queue, one forward pass.",
              (_p95("serve_app_dispatch_wait_ms", "ingress queue"),
               _p95("serve_app_group_duration_ms", "preprocess + classify call"),
               _p95("serve_app_preprocess_ms", "preprocess (per image)"),
               _p95("serve_app_batch_wait_ms", "batch queue"),
               _p95("serve_app_forward_ms", "forward pass (per batch)")), "ms"),
        Panel("Forward pass by model", "One batch through the network.",
              _quantiles("serve_app_forward_ms", by="model"), "ms"),
    )),
    Row("Batching", "Are requests being grouped and batched, or running one at a time?", (
        Panel("Mean group and batch size", "Images per ingress->preprocessor->classifier call, "
              "and per forward pass.",
              (("group", _ratio("ray_serve_app_grouped_images_total",
                                "ray_serve_app_group_size_count")),
               ("batch {{model}}", _ratio("ray_serve_app_batched_images_total",
                                          "ray_serve_app_batch_size_count", "model"))), "short"),
        Panel("Queues", "Images waiting in the ingress for a slot and in downstream calls; "
              "requests queued in Ray's routers and running in replicas.",
              (("ingress queue", "sum (ray_serve_app_dispatch_queued)"),
               ("in downstream calls", "sum (ray_serve_app_dispatch_in_flight)"),
               ("running {{deployment}}",
                "sum by (deployment) (ray_serve_replica_processing_queries)")), "short"),
    )),
    Row("Replicas", "How many replicas, what the autoscaler wants, how long they take to start?", (
        Panel("Replicas per deployment", "Healthy replicas and the autoscaler's target.",
              (("healthy {{deployment}}",
                "sum by (deployment) (ray_serve_deployment_replica_healthy)"),
               ("target {{deployment}}",
                "max by (deployment) (ray_serve_autoscaling_target_replicas)")), "short"),
        Panel("Classifier start phases", "Seconds per start phase of the slowest live replica "
              "(load, warm-up, a background compile).",
              (("{{phase}}", "max by (phase) (ray_serve_app_replica_start_seconds)"),), "s"),
        Panel("Classifier replicas starting / compiled", "Replicas loading now; replicas "
              "serving the compiled artifact.",
              (("starting", "sum (ray_serve_app_replicas_starting)"),
               ("compiled", "sum (ray_serve_app_compiled)")), "short"),
    )),
    Row("Resources", "Is the hardware the limit?", (
        Panel("CPU utilisation per node", "Ray's node CPU utilisation (%).",
              (("{{instance}}", "avg by (instance) (ray_node_cpu_utilization)"),), "percent"),
        Panel("Memory used per node", "Ray's node memory in use.",
              (("{{instance}}", "sum by (instance) (ray_node_mem_used)"),), "bytes"),
        Panel("GPU utilisation", "Per GPU, as Ray exports it on GPU nodes.",
              (("{{instance}} GPU {{GpuIndex}}", "ray_node_gpus_utilization"),), "percent",
              gpu_only=True),
    )),
)


def panels() -> list[Panel]:
    return [p for row in ROWS for p in row.panels]


def render() -> dict:
    """The Grafana dashboard JSON (schema of Grafana 10/11; a Prometheus datasource input)."""
    out, y, pid = [], 0, 1
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for row in ROWS:
        out.append({"type": "row", "id": pid, "title": f"{row.title}: {row.question}",
                    "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": []})
        pid, y = pid + 1, y + 1
        width = 24 // len(row.panels)
        for i, panel in enumerate(row.panels):
            out.append({
                "type": "timeseries", "id": pid, "title": panel.title,
                "description": panel.description, "datasource": datasource,
                "gridPos": {"h": 8, "w": width, "x": i * width, "y": y},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                             "datasource": datasource}
                            for j, (legend, expr) in enumerate(panel.targets)],
            })
            pid += 1
        y += 8
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "title": "serve_app", "uid": "serve-app", "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "tags": ["serve_app", "ray-serve"], "timezone": "browser",
        "templating": {"list": []}, "annotations": {"list": []}, "panels": out,
    }


def text() -> str:
    return json.dumps(render(), indent=2) + "\n"


def write(check: bool = False) -> int:
    wanted = text()
    if check:
        current = DASHBOARD_PATH.read_text() if DASHBOARD_PATH.exists() else ""
        if current != wanted:
            print(f"{DASHBOARD_PATH} is stale: run python -m serve_app dashboard",
                  file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_PATH.write_text(wanted)
    print(f"wrote {DASHBOARD_PATH}")
    return 0
