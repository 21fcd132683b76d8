"""What serve_app's metrics cost per request: each recorder call timed in a Ray worker.

    python -m load_tests.metric_cost [--calls 20000] [--out results/metric_cost.json]

Runs one Ray task (a real worker, so the calls go through Ray's recorder and exporter as in
a replica) that times every recording call serve_app makes on the hot path, then sums them the
way one request of one image uses them at each stage. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _time(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6  # µs per call


def measure(calls: int) -> dict:
    from serve_app import metrics

    ingress, pre, clf = (metrics.IngressMetrics(), metrics.PreprocessorMetrics(),
                         metrics.ClassifierMetrics("m"))
    us = {
        "ingress.request": _time(lambda: ingress.request("/v1/classify", 200, 41.0), calls),
        "ingress.received": _time(lambda: ingress.received("/v1/classify", 1, 150_000), calls),
        "ingress.group(1 image)": _time(lambda: ingress.group(1, [0.2]), calls),
        "ingress.group_done": _time(lambda: ingress.group_done(30.0), calls),
        "preprocessor.image": _time(lambda: pre.image(0.005, None), calls),
        "classifier.batch(8 images)": _time(lambda: clf.batch(8, 0.03, [0.001] * 8), calls),
    }
    per_request = {  # one single-image request, one group of 1; a batch of 8 shared by 8
        "ingress": us["ingress.request"] + us["ingress.received"] + us["ingress.group(1 image)"]
        + us["ingress.group_done"],
        "preprocessor": us["preprocessor.image"],
        "classifier": us["classifier.batch(8 images)"] / 8,
    }
    return {"us_per_call": us, "us_per_request": per_request,
            "us_per_request_total": sum(per_request.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        result = ray.get(ray.remote(measure).remote(args.calls))
    finally:
        ray.shutdown()
    for name, value in result["us_per_call"].items():
        print(f"{name:32} {value:8.1f} µs")
    for name, value in result["us_per_request"].items():
        print(f"per request in the {name:13} {value:8.1f} µs")
    print(f"per request, all stages          {result['us_per_request_total']:8.1f} µs")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
