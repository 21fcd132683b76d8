"""Several models in one application, as configs/multi-model.yaml ships them: what each
model gives alone and beside the other, what each replica holds in memory, and what a model
that is not loaded yet would cost to bring in (the price Ray's model multiplexing pays on a
cache miss, which one deployment per model never pays).

    python -m load_tests.multi_model [--config configs/multi-model.yaml] [--duration 15]
        [--out results/multi_model.json]

Closed loops on 127.0.0.1, bounded in time and requests; run it alone (2 cores).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Optional

from load_tests.client import LoadResult, run_load
from load_tests.photos import photos_jpeg
from load_tests.processes import memory_mib, replica_pids
from serve_app import configfile, topology
from serve_app.launch import ServeProcess

def replica_memory(root_pid: int, app: str) -> dict[str, list[float]]:
    """{deployment: [private MiB (USS) of each replica]} for the cluster under ``root_pid``:
    what one more replica costs; RSS would count torch's shared libraries in every one."""
    pids = replica_pids(root_pid, app)
    out: dict[str, list[float]] = {}
    for pid, mib in memory_mib(pids, private=True).items():
        out.setdefault(pids[pid], []).append(mib)
    return out


def load_cost_s(model: dict) -> float:
    """Seconds to build one model's eager network with its weights and run one batch: what a
    replica pays to bring in a model it does not hold."""
    import torch

    from serve_app.config import ModelConfig
    from serve_app.models import build_model, describe

    cfg = ModelConfig.model_validate({**model, "compile": False})
    torch.set_num_threads(1)
    started = time.perf_counter()
    network = build_model(cfg)
    size = describe(cfg).transform.crop_size
    with torch.inference_mode():
        network(torch.zeros(1, 3, size, size))
    return round(time.perf_counter() - started, 2)


def summary(result: LoadResult) -> dict:
    out = result.summary()
    return {k: out[k] for k in ("concurrency", "rps", "p50_ms", "p95_ms", "errors", "requests")}


def run(args: argparse.Namespace) -> dict:
    config = configfile.load(args.config)
    app = config["applications"][0]
    (_, settings, _), = configfile.check(config, str(args.config))
    names = [m.id for m in settings.served]
    bodies = [jpeg for _, jpeg in photos_jpeg()]
    rows: list[dict] = []
    with ServeProcess(args.config, start_timeout_s=600) as svc:
        svc.wait_ready(timeout_s=600)
        base = f"{svc.url}{app.get('route_prefix', '/').rstrip('/')}"

        def url(name: str) -> str:
            return f"{base}/v1/models/{name}/classify"

        for name in names:  # warm every batch size path once before measuring
            run_load(url(name), bodies, 4, 3.0, warmup_s=0.0, max_requests=200)
        memory_idle = replica_memory(svc.proc.pid, app["name"])
        for name in names:
            for clients in args.concurrency:
                r = run_load(url(name), bodies, clients, args.duration, warmup_s=2.0,
                             max_requests=5000)
                rows.append({"scenario": f"{name} alone", "model": name, **summary(r)})
        results: dict[str, LoadResult] = {}
        clients = max(args.concurrency)
        threads = [threading.Thread(target=lambda n=name: results.__setitem__(
            n, run_load(url(n), bodies, clients, args.duration, warmup_s=2.0,
                        max_requests=5000))) for name in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in names:
            rows.append({"scenario": "both at once", "model": name, **summary(results[name])})
        memory_loaded = replica_memory(svc.proc.pid, app["name"])
    return {"config": str(args.config), "models": names,
            "deployments": topology.deployment_names(topology.plan(settings)),
            "duration_s": args.duration, "rows": rows,
            "replica_uss_mib": {"idle": memory_idle, "after_load": memory_loaded},
            "load_cost_s": {m.id: load_cost_s(m.model_dump(exclude={"served_name"}))
                            for m in settings.served}}


def format_table(result: dict) -> str:
    lines = [f"{'scenario':<26} {'model':<20} {'clients':>7} {'req/s':>7} {'p50 ms':>8} "
             f"{'p95 ms':>8} {'errors':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['scenario']:<26} {r['model']:<20} {r['concurrency']:>7} "
                     f"{r['rps']:>7.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['errors']:>6}")
    lines.append("")
    lines.append(f"{'deployment':<34} {'private MiB idle':>16} {'after load':>11}")
    memory = result["replica_uss_mib"]
    for dep in result["deployments"]:
        idle = "+".join(f"{v:.0f}" for v in memory["idle"].get(dep, []))
        loaded = "+".join(f"{v:.0f}" for v in memory["after_load"].get(dep, []))
        lines.append(f"{dep:<34} {idle:>16} {loaded:>11}")
    lines.append("")
    for name, seconds in result["load_cost_s"].items():
        lines.append(f"bring in {name} (eager build + weights + 1 batch, 1 thread): {seconds} s")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/multi-model.yaml"))
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
