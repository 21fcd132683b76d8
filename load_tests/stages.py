"""Where a request's time goes, from serve_app's own metrics in a real Prometheus.

    python -m load_tests.stages --config configs/local.yaml --clients 1,16 --duration 30 \
        --out results/stages.json

Serves the config (``log_requests`` on), scrapes it with Prometheus, drives each client level
(closed loop, loopback, bounded), then asks Prometheus for p50/p95 of every stage over that
level and prints a table; finally it takes the slowest request of the last level from the
ingress's log lines and follows its id through the preprocessor and the classifier's batch
(the worked example in docs/observability.md). Writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from load_tests import prometheus
from load_tests.client import run_load
from load_tests.photos import photos_jpeg
from serve_app.launch import ServeProcess

# (label, histogram, extra selector)
STAGES = (
    ("end to end (ingress)", "serve_app_request_duration_ms", 'route="/v1/classify",code="200"'),
    ("ingress queue (per image)", "serve_app_dispatch_wait_ms", ""),
    ("preprocess + classify calls (per group)", "serve_app_group_duration_ms", ""),
    ("decode + crop (per image)", "serve_app_preprocess_ms", 'outcome="ok"'),
    ("batch queue (per image)", "serve_app_batch_wait_ms", ""),
    ("forward pass (per batch)", "serve_app_forward_ms", ""),
)
APP = 'application="serve_app"'
EXPORT_LAG_S = 18  # Ray's exporter reports every few seconds; Prometheus scrapes every 1 s
GAP_S = 4  # idle between levels, so a level's window holds none of the last one's requests
INGRESS_LINE = re.compile(r"request_id=(\S+) POST /v1/classify -> (\d+) in ([\d.]+) ms")


def quantile(prom: prometheus.Prometheus, q: float, metric: str, selector: str,
             window_s: int) -> float | None:
    sel = ",".join(s for s in (APP, selector) if s)
    return prom.value(f"histogram_quantile({q}, sum by (le) "
                      f"(increase(ray_{metric}_bucket{{{sel}}}[{window_s}s])))")


def mean_sizes(prom: prometheus.Prometheus, window_s: int) -> dict[str, float | None]:
    def ratio(num: str, den: str) -> float | None:
        return prom.value(f"sum(increase({num}{{{APP}}}[{window_s}s])) / "
                          f"sum(increase({den}{{{APP}}}[{window_s}s]))")
    return {"group": ratio("ray_serve_app_grouped_images_total", "ray_serve_app_group_size_count"),
            "batch": ratio("ray_serve_app_batched_images_total", "ray_serve_app_batch_size_count")}


def replicas(prom: prometheus.Prometheus, window_s: int) -> dict[str, float]:
    """The most healthy replicas each deployment had during the window."""
    result = prom.query(f"max_over_time((sum by (deployment) (ray_serve_deployment_replica_healthy"
                        f"{{{APP}}}))[{window_s}s:1s])")
    return {r["metric"].get("deployment", "?"): float(r["value"][1]) for r in result}


def logs(svc: ServeProcess, deployment: str) -> list[str]:
    return [line for path in sorted((svc.ray_dir / "session_latest" / "logs" / "serve").glob(
        f"replica_serve_app_{deployment}_*.log")) for line in path.read_text().splitlines()]


def follow_slowest(svc: ServeProcess, since: float) -> dict:
    """The slowest 200 of the ingress log lines written after ``since`` (epoch), and every
    line that names its request id."""
    slowest = None
    for line in logs(svc, "Ingress"):
        match = INGRESS_LINE.search(line)
        stamp = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
        if not match or not stamp or match.group(2) != "200":
            continue
        at = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000
        if at >= since and (slowest is None or float(match.group(3)) > slowest[1]):
            slowest = (match.group(1), float(match.group(3)))
    if slowest is None:
        return {}
    rid = slowest[0]
    trail = {dep: [line.split(" -- ", 1)[-1] for line in logs(svc, dep) if rid in line]
             for dep in ("Ingress", "Preprocessor", "Classifier")}
    return {"request_id": rid, "ms": slowest[1], "lines": trail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if prometheus.binary() is None:
        parser.error("no prometheus binary: apt-get install prometheus (or SERVE_APP_PROMETHEUS)")
    bodies = [body for _, body in photos_jpeg()]

    def edit(config: dict) -> None:
        config["applications"][0].setdefault("args", {})["log_requests"] = True

    result = {"config": args.config, "duration_s": args.duration, "levels": []}
    with ServeProcess(args.config, edit=edit) as svc, \
            prometheus.Prometheus([svc.metrics_url.split("//")[1].split("/")[0]]) as prom:
        window = int(args.duration) + EXPORT_LAG_S + 2  # the level, its warm-up and the lag
        for clients in [int(c) for c in args.clients.split(",")]:
            started = time.time()
            load = run_load(svc.url + "/v1/classify", bodies, clients, args.duration,
                            warmup_s=2.0, max_requests=20_000).summary()
            time.sleep(EXPORT_LAG_S)
            level = {"clients": clients, "client_side": load, "stages": {},
                     "mean_size": mean_sizes(prom, window), "replicas": replicas(prom, window)}
            for label, metric, selector in STAGES:
                level["stages"][label] = {
                    f"p{int(q * 100)}_ms": quantile(prom, q, metric, selector, window)
                    for q in (0.5, 0.95)}
            level["slowest"] = follow_slowest(svc, started)
            result["levels"].append(level)
            time.sleep(GAP_S)

    print(f"{'stage':42} " + " ".join(f"{'c=' + str(lv['clients']) + ' p50':>12} "
                                        f"{'p95':>8}" for lv in result["levels"]))
    for label, _, _ in STAGES:
        cells = []
        for lv in result["levels"]:
            st = lv["stages"][label]
            cells.append(" ".join(f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"
                                  for v, w in ((st["p50_ms"], 12), (st["p95_ms"], 8))))
        print(f"{label:42} " + " ".join(cells))
    for lv in result["levels"]:
        c, sizes = lv["client_side"], lv["mean_size"]
        print(f"c={lv['clients']}: client p50 {c['p50_ms']} ms, p95 {c['p95_ms']} ms, "
              f"{c['rps']} req/s, {c['errors']} errors; mean group {sizes['group'] or 0:.2f}, "
              f"mean batch {sizes['batch'] or 0:.2f}; most replicas "
              + ", ".join(f"{d} {n:g}" for d, n in sorted(lv["replicas"].items())))
    slow = result["levels"][-1]["slowest"]
    if slow:
        print(f"\nslowest request of the last level: {slow['request_id']} ({slow['ms']} ms)")
        for dep, lines in slow["lines"].items():
            for line in lines:
                print(f"  {dep:12} {line}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
