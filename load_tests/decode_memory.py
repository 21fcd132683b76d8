"""A burst of large images against a live service, and what it does to the preprocessor's
memory: its replicas' peak RSS (the kernel's high-water mark, reset before the burst) over
their idle RSS.

    python -m load_tests.decode_memory --config configs/local.yaml
    python -m load_tests.decode_memory --budgets default,1000000000000 --max-in-flight 2,8

serves the config once per (budget, max_in_flight) pair (``args.max_decoding_pixels``: a
number, or ``default`` for the config's own; ``args.dispatch.max_in_flight``: how many calls
each ingress replica has in flight, so how many reach the preprocessor at once) and prints one
JSON line per run. tests/integration/test_hostile_images.py runs :func:`measure` against the
shared test cluster.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Optional

import httpx

from load_tests.photos import large_jpeg
from load_tests.processes import memory_mib, peak_mib, replica_pids, reset_peak

PREPROCESSOR = "Preprocessor"


@dataclass
class Outcome:
    status: int
    content_type: str
    code: Optional[str]  # the JSON error code, if any
    seconds: float


@dataclass
class BurstReport:
    images: int
    statuses: dict[int, int]
    idle_mib: dict[int, float]  # per preprocessor pid, before the burst
    peak_mib: dict[int, float]  # per preprocessor pid, during it (VmHWM)
    growth_mib: float  # the largest peak over its own idle RSS
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("outcomes")
        return out


def post_all(url: str, bodies: list[bytes], content_type: str = "image/jpeg",
             timeout_s: float = 120.0) -> list[Outcome]:
    """Every body at once, one connection each."""
    def one(body: bytes) -> Outcome:
        started = time.perf_counter()
        with httpx.Client(timeout=timeout_s) as client:
            r = client.post(url, content=body, headers={"Content-Type": content_type})
        code = None
        if r.headers.get("content-type", "").startswith("application/json") and r.status_code >= 400:
            try:
                code = r.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = None
        return Outcome(r.status_code, r.headers.get("content-type", ""), code,
                       time.perf_counter() - started)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def preprocessor_pids(root_pid: int, app: str) -> list[int]:
    return [pid for pid, name in replica_pids(root_pid, app).items()
            if name.startswith(PREPROCESSOR)]


def measure(root_pid: int, app: str, url: str, bodies: list[bytes],
            content_type: str = "image/jpeg") -> BurstReport:
    """Send ``bodies`` at once; the preprocessor replicas' idle and peak RSS around it.

    A replica that starts during the burst (autoscaling) is measured from its start."""
    pids = preprocessor_pids(root_pid, app)
    if not pids:
        raise RuntimeError(f"no {PREPROCESSOR} replica of {app!r} under pid {root_pid}")
    for pid in pids:
        if not reset_peak(pid):
            raise RuntimeError(f"cannot reset the peak RSS of pid {pid} (/proc/{pid}/clear_refs)")
    idle = memory_mib(dict.fromkeys(pids, PREPROCESSOR))
    started = time.perf_counter()
    seen: set[int] = set(pids)
    done = threading.Event()

    def watch() -> None:  # replicas that autoscaling adds during the burst
        while not done.wait(0.5):
            seen.update(preprocessor_pids(root_pid, app))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcomes = post_all(url, bodies, content_type)
    done.set()
    watcher.join()
    peaks = {pid: p for pid in seen if (p := peak_mib(pid)) is not None}
    statuses: dict[int, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    growth = max(peaks[pid] - idle.get(pid, min(idle.values())) for pid in peaks)
    return BurstReport(len(bodies), statuses, idle, peaks, round(growth, 1),
                       round(time.perf_counter() - started, 1), outcomes)


def main(argv: Optional[list[str]] = None) -> None:
    from serve_app.launch import ServeProcess

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--budgets", default="default,1000000000000",
                        help="args.max_decoding_pixels per run: numbers or 'default'")
    parser.add_argument("--max-in-flight", default="default",
                        help="args.dispatch.max_in_flight per run: numbers or 'default'")
    args = parser.parse_args(argv)
    body = large_jpeg()
    print(json.dumps({"image": "6400x6250 JPEG", "bytes": len(body)}), flush=True)
    for budget in args.budgets.split(","):
        for in_flight in args.max_in_flight.split(","):
            def edit(config: dict, budget=budget, in_flight=in_flight) -> None:
                app_args = config["applications"][0]["args"]
                if budget != "default":
                    app_args["max_decoding_pixels"] = int(budget)
                if in_flight != "default":
                    app_args.setdefault("dispatch", {})["max_in_flight"] = int(in_flight)

            with ServeProcess(args.config, edit=edit) as svc:
                app = svc.config["applications"][0]["name"]
                url = f"{svc.url}/v1/classify"
                post_all(url, [body] * 2)  # the large-image path warm once
                time.sleep(2)
                report = measure(svc.proc.pid, app, url, [body] * args.images)
            print(json.dumps({"max_decoding_pixels": budget, "max_in_flight": in_flight,
                              **report.summary()}), flush=True)


if __name__ == "__main__":
    main()
