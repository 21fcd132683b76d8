"""Where a lone request's time goes: each hop of the served path, timed on its own.

    python -m load_tests.hops --config configs/local.yaml --json /tmp/hops.json

The benchmark (``load_tests/bench.py``) says how long a request takes at 1 client; this says
why. One client, one request at a time with a pause between (as a lone user sends them),
against a service with one replica per deployment:

* over HTTP: ``GET /healthz`` (HAProxy and the ingress, no call onwards) and a whole
  ``POST /v1/classify``;
* through Serve handles, from a Ray driver attached to the cluster (as the ingress calls them):
  an empty classifier call, the preprocessor on bytes that fail to decode (the hop carrying
  a crop-sized payload, no work), the preprocessor on one photo, the classifier on ready
  crops, and both chained as the ingress chains them;
* in this process, with the replicas' thread count: decode + preprocess, and the forward pass
  with top-k, for the config's model (compiled when the config says so).

Prints a table of p50/p90 and the share of a whole request that is neither decoding nor the
model; writes the same as JSON. Loopback only; the service is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from load_tests.client import percentile

APP_NAME = "serve_app"
# One replica each, fixed: no scaling event inside the measurement.
SINGLE_REPLICAS = [f"{d}.{k}" for d in ("Ingress", "Preprocessor", "Classifier")
                   for k in ("autoscaling_config=null", "num_replicas=1")]
CROP_BYTES = 3 * 224 * 224  # what one uint8 crop weighs on the wire


def time_calls(call: Callable[[], object], n: int, pause_s: float, warmup: int = 3) -> dict:
    """p50 and p90 in ms of ``n`` sequential calls, ``pause_s`` apart, after ``warmup``."""
    for _ in range(warmup):
        call()
    took = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        took.append(time.perf_counter() - start)
        time.sleep(pause_s)
    took.sort()
    return {"p50_ms": round(percentile(took, 50) * 1000, 2),
            "p90_ms": round(percentile(took, 90) * 1000, 2), "n": n}


def _driver(address: str, n: int, pause_s: float) -> None:
    """Child process: the handle hops, as the ingress makes them. Prints one JSON line."""
    import ray
    from ray import serve

    from load_tests.photos import photos_jpeg

    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR,
             configure_logging=False)
    pre = serve.get_deployment_handle("Preprocessor", app_name=APP_NAME)
    clf = serve.get_deployment_handle("Classifier", app_name=APP_NAME)
    photo = photos_jpeg()[0][1]
    crops = pre.remote([photo]).result()
    if crops.errors[0] is not None:
        raise RuntimeError(f"the preprocessor refused the photo: {crops.errors[0]}")
    undecodable = b"\0" * CROP_BYTES
    out = {
        "handle_empty_call": time_calls(lambda: clf.ready.remote().result(), n, pause_s),
        "handle_crop_sized_payload": time_calls(
            lambda: pre.remote([undecodable]).result(), n, pause_s),
        "handle_preprocessor": time_calls(lambda: pre.remote([photo]).result(), n, pause_s),
        "handle_classifier": time_calls(
            lambda: clf.classify.remote(crops, [5]).result(), n, pause_s),
        "handle_chained": time_calls(
            lambda: clf.classify.remote(pre.remote([photo]), [5]).result(), n, pause_s),
    }
    print(json.dumps(out), flush=True)


def measure_in_process(model_cfg: dict, threads: int, n: int, pause_s: float) -> dict:
    """Decode + preprocess, and forward + top-k, as a replica runs them (``threads``)."""
    import torch

    from load_tests.photos import photos_jpeg
    from serve_app import imaging
    from serve_app.classifier import Predictor
    from serve_app.config import ModelConfig

    torch.set_num_threads(threads)
    predictor = Predictor(ModelConfig.model_validate(model_cfg), build=True)
    predictor.warm_up(predictor.sizes_to_warm(1))
    info, photo = predictor.info, photos_jpeg()[0][1]
    crops = imaging.preprocess_many([photo], info.transform, 40_000_000)
    pixels = torch.from_numpy(crops.pixels.copy())
    return {
        "decode_preprocess": time_calls(
            lambda: imaging.preprocess_many([photo], info.transform, 40_000_000), n, pause_s),
        "forward_top_k": time_calls(
            lambda: imaging.top_k(predictor.predict(pixels)[0], 5, info.categories), n, pause_s),
    }


def breakdown(result: dict) -> dict:
    """What a whole request spends outside decoding and the model (p50s), in ms and share."""
    whole = result["http_classify"]["p50_ms"]
    work = result["decode_preprocess"]["p50_ms"] + result["forward_top_k"]["p50_ms"]
    return {"whole_ms": whole, "decode_and_model_ms": round(work, 2),
            "outside_ms": round(whole - work, 2), "outside_share": round(1 - work / whole, 3)}


ROWS = [
    ("http_healthz", "HTTP: HAProxy + ingress, no call onwards"),
    ("http_classify", "HTTP: a whole POST /v1/classify"),
    ("handle_empty_call", "handle: an empty classifier call"),
    ("handle_crop_sized_payload", f"handle: preprocessor, {CROP_BYTES} undecodable bytes"),
    ("handle_preprocessor", "handle: preprocessor, one photo"),
    ("handle_classifier", "handle: classifier, one crop"),
    ("handle_chained", "handle: preprocessor -> classifier, as the ingress chains them"),
    ("decode_preprocess", "in process: decode + resize + crop"),
    ("forward_top_k", "in process: forward + softmax + top-k"),
]


def format_table(result: dict) -> str:
    lines = [f"model {result['model']} (compile={result['compile']}), 1 client, "
             f"{result['threads']} torch thread(s) per replica",
             f"{'stage':<66}{'p50 ms':>9}{'p90 ms':>9}", "-" * 84]
    for key, label in ROWS:
        lines.append(f"{label:<66}{result[key]['p50_ms']:>9.2f}{result[key]['p90_ms']:>9.2f}")
    b = result["breakdown"]
    lines.append(f"outside decode and model: {b['outside_ms']} of {b['whole_ms']} ms "
                 f"({b['outside_share']:.0%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="config override, as load_tests.bench takes it")
    parser.add_argument("--requests", type=int, default=60, help="timed calls per stage")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between calls")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        _driver(args.driver, args.requests, args.pause)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import httpx

    from load_tests.bench import cluster_address, edit_config, model_config_of
    from load_tests.photos import photos_jpeg
    from serve_app.configfile import deployment_options
    from serve_app.launch import ServeProcess
    from serve_app.runtime import cpu_threads

    overrides = SINGLE_REPLICAS + args.set
    model_cfg = model_config_of(argparse.Namespace(config=args.config, model=None, set=overrides))
    photo = photos_jpeg()[0][1]
    with ServeProcess(args.config, edit=edit_config(None, overrides)) as svc:
        app = svc.config["applications"][0]
        cpus = (deployment_options(app, "Classifier").get("ray_actor_options") or {}).get(
            "num_cpus", 1.0)
        result = {"model": model_cfg["name"], "compile": model_cfg["compile"],
                  "threads": cpu_threads({"CPU": cpus}), "config": args.config,
                  "overrides": overrides}
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            def classify():
                response = client.post("/v1/classify", content=photo,
                                       headers={"content-type": "image/jpeg"})
                response.raise_for_status()
            result["http_healthz"] = time_calls(
                lambda: client.get("/healthz").raise_for_status(), args.requests, args.pause)
            result["http_classify"] = time_calls(classify, args.requests, args.pause)
        found = cluster_address(svc.proc.pid)
        if found is None:
            raise RuntimeError("could not find the Ray cluster that serve run started")
        address, auth = found
        proc = subprocess.run(
            [sys.executable, "-m", "load_tests.hops", "--driver", address,
             "--requests", str(args.requests), "--pause", str(args.pause)],
            env={**os.environ, **auth}, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"the handle driver failed: {proc.stderr[-2000:]}")
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    # After the service is gone, so the in-process runs do not share the cores with it.
    result.update(measure_in_process(model_cfg, result["threads"], args.requests, args.pause))
    result["breakdown"] = breakdown(result)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
