"""Reliability scenarios on a running service, and the command that measures them.

Each scenario breaks or changes a live service under load and returns what the clients saw:
a replica SIGKILLed (Classifier, Preprocessor, Ingress; the Ingress also under
serve_app.client), a wedged model, requests arriving at 3x capacity, and redeploys (a changed
``user_config``, a changed model and back, a classifier removed). The tests
(tests/integration/test_faults.py, test_overload.py, test_redeploy.py) run them for seconds on
the shared test service and assert only the outcomes docs/reliability.md documents; this
command runs them at length on ``configs/local.yaml`` as shipped and prints the figures
(recovery times, refusal latencies, switch times, memory) as a table and JSON:

    python -m load_tests.reliability --scenario kill-classifier --json out.json
    python -m load_tests.reliability --scenario all

Loopback only, bounded in time; the cluster it starts is stopped even when a scenario fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import httpx
import yaml

from load_tests import replica_starts
from load_tests.client import run_load, run_open_loop
from load_tests.closed_loop import CLIENT_TIMEOUT_S, Load, summary
from load_tests.haproxy_stats import backend_counters
from load_tests.photos import photos_jpeg
from load_tests.polling import wait_for
from load_tests.processes import cpu_seconds, memory_mib, replica_pids
from load_tests.sampling import ServeStatusClient, dashboard_url_from_log, parse_applications
from serve_app import configfile

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "configs" / "local.yaml"
APP = "serve_app"
#: The model a redeploy switches to and back from (eager: the switch is under test, not a build).
OTHER_MODEL = {"name": "efficientnet_lite2", "weights": "DEFAULT", "compile": False}


@dataclass
class Lengths:
    """How long each scenario loads the service: seconds for a test, the documented figures'
    lengths for the command."""

    before_s: float = 2.0  # load before the fault or change
    after_s: float = 2.0  # load once recovered or settled
    at_least_s: float = 0.0  # load in all, however soon it recovered
    overload_s: float = 8.0
    recover_within_s: float = 120.0  # a bound against a hang, not a figure
    #: Clients during a redeploy: a few keep requests in flight through every step of a
    #: rollout; 16 (the figures') saturate 2 cores and slow the rollout itself 2-3x.
    redeploy_clients: int = 4


TEST = Lengths()
MEASURE = Lengths(before_s=5.0, after_s=10.0, at_least_s=45.0, overload_s=40.0,
                  redeploy_clients=16)


def bodies() -> list[bytes]:
    return [jpeg for _, jpeg in photos_jpeg()]


def application(config: dict, app: str = APP) -> dict:
    """The entry of ``config``'s applications named ``app``."""
    return next(a for a in config["applications"] if a["name"] == app)


def app_config(svc, app: str = APP) -> dict:
    return application(svc.config, app)


def app_url(svc, app: str = APP) -> str:
    """``svc``'s address of ``app`` (its route prefix, no trailing slash)."""
    return f"{svc.url}{app_config(svc, app)['route_prefix'].rstrip('/')}"


def pids_of(svc, deployment: str, app: str = APP) -> set[int]:
    return {p for p, d in replica_pids(svc.proc.pid, app).items() if d == deployment}


def _serving_again(answers: list, since: float, clients: int) -> bool:
    """The last ``clients`` answers were all served, and sent after ``since``."""
    last = answers[-clients:]
    return len(last) == clients and all(a.status == 200 and a.started > since for a in last)


# ---- replicas killed under load ----

def kill_under_load(svc, deployment: str, lengths: Lengths = TEST, clients: int = 8,
                    app: str = APP) -> tuple[dict, list]:
    """SIGKILL ``deployment``'s replica ``lengths.before_s`` into a closed-loop load of
    ``clients``; the load goes on until a replacement runs and the clients are served again
    (then ``after_s`` more). The report and every answer."""
    url = f"{app_url(svc, app)}/v1/classify"
    load = Load(url, bodies(), clients)
    victims = pids_of(svc, deployment, app)
    victim = min(victims)
    fault: dict = {}

    def kill():
        time.sleep(lengths.before_s)
        fault["at"] = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        if deployment == "Ingress":
            time.sleep(0.3)  # HAProxy retries at once; its counters reset when Ray reloads it
            fault["haproxy"] = backend_counters(svc, app)
        fault["replaced"] = wait_for(lambda: pids_of(svc, deployment, app) - victims,
                                  lengths.recover_within_s, f"a new {deployment} replica")
        wait_for(lambda: _serving_again(load.answers, fault["at"], clients),
              lengths.recover_within_s, "the clients served again")
        time.sleep(lengths.after_s)

    load.run(lengths.at_least_s, kill)
    report = {"killed": f"{deployment}/{victim}", "replaced_by": sorted(fault["replaced"]),
              **summary(load.answers, fault["at"]),
              **({"haproxy": fault["haproxy"]} if "haproxy" in fault else {})}
    return report, load.answers


class _CountingTransport(httpx.BaseTransport):
    """httpx's transport, counting the attempts that reach the network."""

    def __init__(self):
        self.inner, self.sent = httpx.HTTPTransport(), 0

    def handle_request(self, request):
        self.sent += 1
        return self.inner.handle_request(request)

    def close(self):
        self.inner.close()


def kill_ingress_under_client(svc, lengths: Lengths = TEST, clients: int = 8,
                              app: str = APP) -> dict:
    """The Ingress SIGKILLed while ``clients`` threads of serve_app.client classify: what a
    user of the client sees (every outcome), and how many attempts it resent."""
    from serve_app.client import Client, RetryPolicy

    url = app_url(svc, app)
    payloads = bodies()
    victims = pids_of(svc, "Ingress", app)
    victim = min(victims)
    policy = RetryPolicy(max_attempts=40, max_elapsed_s=CLIENT_TIMEOUT_S)
    stop, outcomes, transports = threading.Event(), [], []

    def client(i: int) -> None:
        transport = _CountingTransport()
        transports.append(transport)
        with Client(url, retries=policy, transport=transport) as c:
            n = i
            while not stop.is_set():
                try:
                    c.classify(payloads[n % len(payloads)])
                    outcomes.append((time.monotonic(), "served"))
                except Exception as exc:  # what a user of the client would see
                    outcomes.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:200]))
                n += 1

    with ThreadPoolExecutor(clients) as pool:
        began = time.monotonic()
        try:
            for i in range(clients):
                pool.submit(client, i)
            time.sleep(lengths.before_s)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            time.sleep(0.3)
            replays = backend_counters(svc, app)
            wait_for(lambda: pids_of(svc, "Ingress", app) - victims, lengths.recover_within_s,
                  "a new Ingress replica")
            wait_for(lambda: sum(t > killed_at and o == "served" for t, o in outcomes[-clients:])
                  == clients, lengths.recover_within_s, "the clients served again")
            time.sleep(max(lengths.after_s, lengths.at_least_s - (time.monotonic() - began)))
        finally:
            stop.set()
    done = [o for _, o in outcomes]
    report = {"killed": f"Ingress/{victim}", "requests": len(done),
              "served": done.count("served"), "attempts": sum(t.sent for t in transports),
              "failed": sorted(set(o for o in done if o != "served")),
              "seconds_after_kill": round(time.monotonic() - killed_at, 1), "haproxy": replays}
    report["resent"] = report["attempts"] - report["requests"]
    return report


def wedge(svc, wedge_file: Path, lengths: Lengths = TEST, app: str = APP) -> dict:
    """Every Classifier replica's forward pass made to hang (its process alive), no traffic:
    only the health check, which runs the model, can tell. Seconds until each was replaced and
    a request served."""
    url = f"{app_url(svc, app)}/v1/classify"
    body = bodies()[0]
    victims = pids_of(svc, "Classifier", app)
    wedge_file.write_text("".join(f"{p}\n" for p in victims))
    wedged_at = time.monotonic()
    replaced_s = serving_s = None
    try:
        wait_for(lambda: pids_of(svc, "Classifier", app) - victims
              and not pids_of(svc, "Classifier", app) & victims,
              lengths.recover_within_s, "the wedged classifiers replaced")
        replaced_s = time.monotonic() - wedged_at

        def served() -> bool:
            r = httpx.post(url, content=body, headers={"Content-Type": "image/jpeg"},
                           timeout=CLIENT_TIMEOUT_S)
            return r.status_code == 200
        wait_for(served, lengths.recover_within_s, "a request served after the wedge")
        serving_s = time.monotonic() - wedged_at
    finally:
        wedge_file.unlink(missing_ok=True)
    return {"wedged": sorted(victims), "replaced_after_s": round(replaced_s, 1),
            "serving_after_s": round(serving_s, 1)}


# ---- 3x capacity ----

def admitted(app: dict) -> int:
    """Requests the service lets in before it sheds: per ingress replica, the images queued for
    a call slot plus the calls in flight, and the requests Ray's proxy holds for a busy ingress
    (``max_queued_requests``; past it Ray's own 503)."""
    dispatch = app["args"]["dispatch"]
    options = configfile.deployment_options(app, "Ingress")
    most = (options.get("autoscaling_config") or {}).get("max_replicas") \
        or options.get("num_replicas", 1)
    return most * (dispatch["max_queued"] + dispatch["max_in_flight"] * dispatch["max_batch_size"]) \
        + max(0, options.get("max_queued_requests", 0))


def _normal_ms(url: str, body: bytes, n: int) -> float:
    times = []
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
        for _ in range(n):
            started = time.perf_counter()
            r = c.post(url, content=body, headers={"Content-Type": "image/jpeg"})
            if r.status_code == 200:
                times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times) if times else float("nan")


def overload(svc, lengths: Lengths = TEST, factor: float = 3.0, app: str = APP) -> tuple[dict, object]:
    """Requests arriving open-loop at ``factor`` x the rate 16 clients were served at, plus
    enough to fill every queue twice over whatever the machine's speed (so it sheds on any
    machine), for ``lengths.overload_s``; replica memory every 5 s; the first request served
    after. The report and the open-loop result (every refusal's key, with one of each looked
    at whole: ``examples``)."""
    cfg = app_config(svc, app)
    url = f"{app_url(svc, app)}/v1/classify"
    payloads = bodies()
    run_load(url, payloads, 4, 2.0, warmup_s=0.0, max_requests=100)  # every batch path warm
    normal_ms = _normal_ms(url, payloads[0], 5)
    capacity = run_load(url, payloads, 16, lengths.overload_s / 2, warmup_s=1.0).summary()
    bound = admitted(cfg)
    rate = factor * capacity["rps"] + 2 * bound / lengths.overload_s
    pids = replica_pids(svc.proc.pid, app)
    rss_before = memory_mib(pids)
    down_before = svc.serve_log_count("No replica of")  # earlier faults' (a shared cluster)

    rss_samples: list[dict[int, float]] = []
    sampling_ended = threading.Event()

    def sample_rss():
        while not sampling_ended.wait(5):
            rss_samples.append(memory_mib(pids))

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    started, cpu_before = time.time(), cpu_seconds(pids)
    try:
        load = run_open_loop(url, payloads, rate, lengths.overload_s, max_connections=4096,
                             timeout_s=float(cfg["args"].get("request_timeout_s", 60)) + 5)
    finally:
        ended, cpu_after = time.time(), cpu_seconds(pids)
        sampling_ended.set()
        sampler.join()
    load_ended = time.monotonic()

    def first_served() -> Optional[float]:
        t = time.perf_counter()
        r = httpx.post(url, content=payloads[0], headers={"Content-Type": "image/jpeg"},
                       timeout=CLIENT_TIMEOUT_S)
        return (time.perf_counter() - t) * 1000 if r.status_code == 200 else None
    first_ms = wait_for(first_served, lengths.recover_within_s, "a request served after the load")
    recovered_s = time.monotonic() - load_ended
    rss_mid = rss_samples[len(rss_samples) // 2 - 1] if rss_samples else {}
    rss_after = memory_mib(pids)
    served_rate = load.count(200) / lengths.overload_s
    report = {
        "capacity_rps": capacity["rps"], "offered_rps": round(rate, 1), "admitted": bound,
        **load.summary(), "p95_503_by_5s": load.by_window(503), "served_rps": round(served_rate, 1),
        "p99_200_bound_ms": round(1000 * (1.5 * bound / max(served_rate, 1e-9) + 1.0)),
        "cpu_per_s": {f"{pids[p]}/{p}": round((cpu_after[p] - cpu_before[p]) / (ended - started), 2)
                      for p in cpu_before if p in cpu_after},
        "scaling_s": _scaling(svc.log_path.read_text(errors="replace"), started, ended),
        "normal_ms": round(normal_ms, 1), "recovered_after_s": round(recovered_s, 2),
        "first_after_ms": round(first_ms, 1),
        "normal_after_ms": round(_normal_ms(url, payloads[0], 5), 1),
        "rss_mib": {f"{pids[p]}/{p}": [rss_before.get(p), rss_mid.get(p), rss_after.get(p)]
                    for p in pids},
        # refused by HAProxy itself, before the ingress (serve_app/haproxy_shedding.py)
        "shed_at_edge": load.error_codes.get("503 overloaded (HAProxy)", 0),
        # a busy model must not pass for a missing one (serve_app/availability.py)
        "model_went_down": svc.serve_log_count("No replica of") - down_before,
    }
    return report, load


def _scaling(log_text: str, origin: float, until: float) -> dict[str, dict[str, list[float]]]:
    """Ray's scaling decisions per deployment between ``origin`` and ``until`` (epoch), in
    seconds from ``origin``, read from the Serve log afterwards."""
    out = {}
    for deployment in ("Ingress", "Preprocessor", "Classifier"):
        parsed = replica_starts.parse(log_text.splitlines(), deployment)
        out[deployment] = {key: [round(t - origin, 1) for t in parsed[key] if origin <= t <= until]
                           for key in ("added", "removed")}
    return out


# ---- redeploys ----

def _settled(client: ServeStatusClient, deployed_after: float, app: str) -> bool:
    """The config deployed after ``deployed_after`` is running: the application RUNNING, every
    deployment at its target with no replica starting or stopping."""
    state = client.application()
    if state.get("status") != "RUNNING" or state.get("last_deployed_time_s", 0) <= deployed_after:
        return False
    replicas = parse_applications({"applications": {app: state}}, app)
    return bool(replicas) and all(r.running == r.target and not r.starting and not r.stopping
                                  for r in replicas.values())


def deploy(svc, config: dict, lengths: Lengths = TEST, app: str = APP) -> float:
    """``serve deploy`` of ``config`` to ``svc``'s cluster; seconds until ``app`` settled."""
    dashboard = dashboard_url_from_log(svc.log_path.read_text())
    client = ServeStatusClient(dashboard, app)
    path = svc.config_path.with_name(f"deploy-{time.monotonic_ns()}.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    serve = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    started, before = time.monotonic(), client.application().get("last_deployed_time_s", 0)
    done = subprocess.run(serve + ["deploy", str(path), "--address", dashboard],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})  # send ~/.ray/auth_token
    if done.returncode != 0:
        raise RuntimeError(done.stdout + done.stderr)
    svc.deployed = config
    wait_for(lambda: _settled(client, before, app), lengths.recover_within_s * 2,
             f"{app} settled after the deploy", interval_s=0.5)
    return time.monotonic() - started


def deployed(svc) -> dict:
    """What ``svc`` runs now: its start config until a :func:`deploy` changed it."""
    return copy.deepcopy(getattr(svc, "deployed", svc.config))


def deployment_entry(config: dict, name: str, app: str = APP) -> dict:
    return configfile.deployment_options(application(config, app), name)


def under_load(svc, change: Callable[[], float], lengths: Lengths = TEST,
               app: str = APP) -> tuple[dict, list, float]:
    """``change()`` (a deploy, returning its settle time) ``before_s`` into a load of
    ``lengths.redeploy_clients``, which goes on ``after_s`` past the settled service. Report,
    answers, when the change began."""
    url = f"{app_url(svc, app)}/v1/classify"
    load = Load(url, bodies(), lengths.redeploy_clients)
    at: dict = {}

    def during():
        time.sleep(lengths.before_s)
        at["t"] = time.monotonic()
        at["settled_s"] = change()
        time.sleep(lengths.after_s)

    load.run(lengths.at_least_s, during)
    report = {**summary(load.answers, at["t"]), "settled_after_s": round(at["settled_s"], 1)}
    return report, load.answers, at["t"]


def redeploy_user_config(svc, lengths: Lengths = TEST, app: str = APP) -> tuple[dict, list]:
    """The Classifier's ``max_batch_size`` halved through ``user_config`` under load: its
    replicas are reconfigured, not restarted (``kept_replicas``)."""
    config = deployed(svc)
    user_config = deployment_entry(config, "Classifier", app)["user_config"]
    user_config["max_batch_size"] = max(1, user_config.get("max_batch_size", 8) // 2)
    before = pids_of(svc, "Classifier", app)
    report, answers, _ = under_load(svc, lambda: deploy(svc, config, lengths, app), lengths,
                                    app=app)
    report["kept_replicas"] = before <= pids_of(svc, "Classifier", app)
    return report, answers


def redeploy_model(svc, model: dict, lengths: Lengths = TEST, app: str = APP) -> tuple[dict, list]:
    """``args.model`` changed under load (every deployment restarts: replacements start before
    the old replicas stop, ``max_surge_percent``). ``after_settled`` lists the models that
    answered once the rollout settled."""
    config = deployed(svc)
    application(config, app)["args"]["model"] = model
    report, answers, at = under_load(svc, lambda: deploy(svc, config, lengths, app), lengths,
                                     app=app)
    new = model["name"]
    models = [a.model for a in answers]
    settled_at = at + report["settled_after_s"]
    switched = [a.ended for a in answers if a.model == new]
    old = [a.ended for a in answers if a.model and a.model != new]
    report.update(model=new, answers_by_model={m: models.count(m) for m in sorted(set(models))},
                  first_new_model_after_s=round(min(switched) - at, 1) if switched else None,
                  last_old_model_after_s=round(max(old) - at, 1) if old else None,
                  after_settled=sorted({a.model for a in answers if a.started >= settled_at}),
                  resized_crop_warnings=svc.serve_log_count("Crops of "))
    return report, answers


def scale_down(svc, lengths: Lengths = TEST, app: str = APP) -> tuple[dict, list]:
    """The Classifier held at 2 replicas, then at 1 while clients run: the removed replica
    drains its batches first (Ray issue #43034)."""
    two = deployed(svc)
    deployment_entry(two, "Classifier", app)["autoscaling_config"].update(min_replicas=2,
                                                                          max_replicas=2)
    deploy(svc, two, lengths, app)
    replicas_before = len(pids_of(svc, "Classifier", app))
    one = copy.deepcopy(two)
    deployment_entry(one, "Classifier", app)["autoscaling_config"].update(min_replicas=1,
                                                                          max_replicas=1)
    report, answers, _ = under_load(svc, lambda: deploy(svc, one, lengths, app), lengths, app=app)
    report.update(replicas_before=replicas_before,
                  replicas_after=len(pids_of(svc, "Classifier", app)))
    return report, answers


# ---- the command ----

SCENARIOS = ("kill-classifier", "kill-preprocessor", "kill-ingress", "kill-ingress-client",
             "wedge", "overload", "redeploy-user-config", "redeploy-model", "scale-down")


def run_scenario(name: str, svc, wedge_file: Path, lengths: Lengths) -> dict:
    if name.startswith("kill-ingress-client"):
        return kill_ingress_under_client(svc, lengths)
    if name.startswith("kill-"):
        return kill_under_load(svc, name.split("-", 1)[1].capitalize(), lengths)[0]
    if name == "wedge":
        return wedge(svc, wedge_file, lengths)
    if name == "overload":
        return overload(svc, lengths)[0]
    if name == "redeploy-user-config":
        return redeploy_user_config(svc, lengths)[0]
    if name == "redeploy-model":
        local = configfile.load(LOCAL)["applications"][0]["args"]["model"]
        there = redeploy_model(svc, OTHER_MODEL, lengths)[0]
        back = redeploy_model(svc, local, lengths)[0]
        return {"to": there, "back": back}
    if name == "scale-down":
        return scale_down(svc, lengths)[0]
    raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")


def headline(name: str, report: dict) -> str:
    """One line of the figures docs/reliability.md quotes."""
    if name == "redeploy-model":
        return " | ".join(f"{k}: {headline('redeploy', v)}" for k, v in report.items())
    keys = ("sent", "served", "statuses", "codes", "dropped", "in_flight_answered_within_s",
            "healthy_after_s", "max_ms", "settled_after_s", "first_new_model_after_s",
            "replaced_after_s", "serving_after_s", "requests", "resent", "failed",
            "capacity_rps", "offered_rps", "served_rps", "error_codes", "recovered_after_s",
            "shed_at_edge", "model_went_down", "kept_replicas")
    parts = [f"{k}={json.dumps(report[k])}" for k in keys if k in report]
    for status in ("200", "503"):
        if isinstance(report.get(status), dict):
            parts.append(f"{status} p50/p95/p99 ms=" + "/".join(
                str(report[status][q]) for q in ("p50_ms", "p95_ms", "p99_ms")))
    return " ".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    from serve_app.compiling import compile_config
    from serve_app.fault_injection import WEDGE_ENV
    from serve_app.launch import ServeProcess

    p = argparse.ArgumentParser(prog="python -m load_tests.reliability",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", choices=SCENARIOS + ("all",), required=True,
                   help="repeat for several; 'all' runs every one, on one cluster, in order")
    p.add_argument("--config", default=str(LOCAL))
    p.add_argument("--num-cpus", type=int, default=3,
                   help="logical CPUs of the cluster: 3 leaves room for a redeploy's surge")
    p.add_argument("--short", action="store_true", help="the tests' lengths (seconds)")
    p.add_argument("--json", default=None, help="write every report here")
    args = p.parse_args(argv)
    names = list(SCENARIOS) if "all" in args.scenario else args.scenario
    lengths = TEST if args.short else MEASURE
    config = configfile.load(args.config)
    if compile_config(config, args.config) != 0:  # measured compiled, as the config asks
        raise SystemExit("could not build the compiled model the config asks for")
    results: dict = {"config": args.config, "lengths": lengths.__dict__, "scenarios": {}}
    wedge_file = Path(f"/tmp/serve_app_wedge_{os.getpid()}")
    with ServeProcess(args.config, start_timeout_s=400, num_cpus=args.num_cpus,
                      env={WEDGE_ENV: str(wedge_file)}) as svc:
        for name in names:
            print(f"{name} ...", flush=True)
            try:
                report = run_scenario(name, svc, wedge_file, lengths)
            except Exception as exc:  # noqa: BLE001 - report it, run the next
                report = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            results["scenarios"][name] = report
            print(f"{name}: {headline(name, report) if 'error' not in report else report}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print("\n| scenario | figures |\n| --- | --- |")
    for name, report in results["scenarios"].items():
        print(f"| {name} | {headline(name, report) if 'error' not in report else report['error']} |")
    return 1 if any("error" in r for r in results["scenarios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
