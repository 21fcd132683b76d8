"""Run a load shape against serve_app and record how it scales.

    python -m load_tests.autoscale_experiment --config configs/autoscale-demo.yaml \
        --shape step --duration 180 --out runs/step

Starts the config with ``serve run`` (or attaches to ``--url``), drives the shape with Locust in a
child process, samples replica counts every second from Serve's status API, keeps sampling after
the load until every deployment is back at min_replicas (or ``--settle`` runs out), then writes
``timeline.csv``, ``summary.json`` and ``timeline.png`` to ``--out`` (with the raw inputs:
``requests.csv``, ``replicas.jsonl``, ``serve.log``, ``locust.log``). Loopback only; bounded by
``--duration``, ``--settle`` and Locust's ``--max-requests``; stops everything it started.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

from load_tests import replica_starts, shapes, timeline
from load_tests.client import require_loopback
from load_tests.photos import parse_size
from serve_app.configfile import APP_IMPORT_PATH
from load_tests.sampling import Sampler, ServeStatusClient, dashboard_url_from_log

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MAX_DURATION_S = 1800


def serve_app_entry(config: dict) -> dict:
    for app in config.get("applications") or []:
        if app.get("import_path") == APP_IMPORT_PATH:
            return app
    raise ValueError("the config has no serve_app application")


def policy_name(app: dict) -> str:
    """Which autoscaling policy the config selects, for titles and summaries."""
    policy = app.get("autoscaling_policy") or {}
    if policy.get("policy_function"):
        return f"{policy['policy_function']} (application)"
    for dep in app.get("deployments") or []:
        fn = ((dep.get("autoscaling_config") or {}).get("policy") or {}).get("policy_function")
        if fn:
            return f"{fn} ({dep.get('name')})"
    return "Ray default (replica_queue_length)"


def min_replicas(app: dict) -> dict[str, int]:
    return {dep["name"]: int(dep["autoscaling_config"].get("min_replicas", 1))
            for dep in app.get("deployments") or [] if dep.get("autoscaling_config")}


def at_min(counts: dict, mins: dict[str, int]) -> bool:
    return bool(counts) and all(name in counts and counts[name].target <= low
                                and counts[name].running <= low and counts[name].stopping == 0
                                for name, low in mins.items())


def run_locust(url: str, profile: shapes.Profile, log_path: Path, wait_s: float,
               max_requests: int, out: Path, photo_size: str = "640x480") -> int:
    """Locust headless in a child process; returns its exit code (1 = some requests failed)."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           *profile.as_args(), "--wait-s", str(wait_s), "--photo-size", photo_size, "--request-log", str(log_path),
           "--max-requests", str(max_requests), "--only-summary", "--loglevel", "WARNING",
           "--stop-timeout", "30"]
    with open(out / "locust.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=profile.duration_s + 90)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def plot(path: Path, rows: list[dict], deployments: list[str], profile: shapes.Profile,
         p95_target_ms: float, title: str) -> None:
    """Replicas (steps), load and p95 latency on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in rows]
    fig, (ax_rep, ax_load, ax_lat) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True,
                                                  gridspec_kw={"height_ratios": [1.3, 1, 1]})
    colors = {"Ingress": "tab:gray", "Preprocessor": "tab:orange", "Classifier": "tab:blue"}
    top = 1
    for name in deployments:
        color = colors.get(name)
        running = [r[f"{name}_running"] if r[f"{name}_running"] != "" else None for r in rows]
        target = [r[f"{name}_target"] if r[f"{name}_target"] != "" else None for r in rows]
        ax_rep.step(t, running, where="post", color=color, lw=2.2, label=f"{name} running")
        ax_rep.step(t, target, where="post", color=color, lw=1.2, ls="--",
                    label=f"{name} target")
        top = max([top] + [v for v in running + target if v is not None])
    ax_rep.set_ylim(0, top + 0.6)
    ax_rep.set_yticks(range(0, int(top) + 1))
    ax_rep.set_ylabel("replicas")
    ax_rep.legend(loc="upper right", ncol=len(deployments), fontsize=8)

    ax_load.step(t, [r["users"] for r in rows], where="post", color="tab:purple", lw=1.5,
                 label="users (Locust)")
    ax_load.plot(t, [r["ongoing"] for r in rows], color="tab:brown", lw=1, alpha=0.8,
                 label="requests in flight")
    ax_load.set_ylabel("users / in flight")
    ax_rps = ax_load.twinx()
    ax_rps.plot(t, [r["rps"] for r in rows], color="tab:green", lw=1.2, label="requests/s")
    ax_rps.set_ylabel("requests/s", color="tab:green")
    lines = ax_load.get_legend_handles_labels()
    more = ax_rps.get_legend_handles_labels()
    ax_load.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)

    p95 = [r["p95_ms"] for r in rows]
    ax_lat.plot(t, p95, color="tab:red", lw=1.5, label="p95 (5 s window)")
    ax_lat.plot(t, [r["p50_ms"] for r in rows], color="tab:red", lw=0.8, alpha=0.45,
                label="p50")
    ax_lat.axhline(p95_target_ms, color="black", ls=":", lw=1,
                   label=f"p95 target {p95_target_ms:g} ms")
    errors = [(r["t_s"], r["errors"]) for r in rows if r["errors"]]
    if errors:
        ax_err = ax_lat.twinx()
        ax_err.bar([e[0] for e in errors], [e[1] for e in errors], color="black", width=0.8,
                   label="failed requests")
        ax_err.set_ylabel("failed/s")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("seconds since the load started")
    ax_lat.legend(loc="upper right", fontsize=8)
    ax_lat.set_ylim(bottom=0)

    for ax in (ax_rep, ax_load, ax_lat):
        if profile.hold:
            ax.axvspan(*profile.hold, color="tab:purple", alpha=0.07, lw=0)
        ax.axvline(profile.load_end_s, color="tab:purple", ls="--", lw=0.8, alpha=0.6)
        ax.grid(alpha=0.25)
    ax_rep.set_title(title, fontsize=11)
    fig.text(0.01, 0.005, "shaded: hold at peak load; dashed line: load ends. Solid steps: "
             "running replicas; dashed steps: the autoscaler's target.", fontsize=8, alpha=0.7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def classifier_start_summary(log: str, origin: float, rows: list[dict],
                             profile: shapes.Profile) -> dict:
    """Each classifier scale-up from decision to first batch, the requests served per 5 s
    window from the window before the first decision to the end of the peak (a start that
    starves the serving replicas shows as a dip), and how long replicas served before a
    scale-down removed one."""
    parsed = replica_starts.parse(log.splitlines())
    started = replica_starts.starts(parsed, origin)
    out: dict = {"classifier_starts": started,
                 "removed_after_serving_s": replica_starts.removals_after_serving(
                     parsed, started, origin)}
    if started and profile.hold:
        windows = replica_starts.served_windows(rows, started[0]["decided_s"], profile.hold[1])
        out["served_per_5s_from_first_decision"] = windows
        out["worst_window_vs_before"] = (round(min(windows[1:]) / windows[0], 2)
                                         if len(windows) > 1 and windows[0] else None)
    return out


def check_loopback(url: str) -> None:
    try:
        require_loopback(url)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def run(args: argparse.Namespace) -> dict:
    from serve_app import configfile
    from serve_app.compiling import compile_config
    from serve_app.launch import ServeProcess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = configfile.load(args.config)
    app = serve_app_entry(config)
    mins = min_replicas(app)
    profile = shapes.build(args.shape, args.duration, args.base_users, args.peak_users)
    request_log = out / "requests.csv"
    request_log.write_text("")
    with ExitStack() as stack:
        if args.url:
            check_loopback(args.url)
            url, dashboard = args.url.rstrip("/"), args.dashboard
        else:
            # Replicas of a compiled config load its artifact: build it first (a no-op once
            # built), or the run would time eager replicas building it in the background.
            if compile_config(config, str(args.config)) != 0:
                raise RuntimeError("could not build the compiled model the config asks for")
            svc = stack.enter_context(ServeProcess(args.config, log_path=out / "serve.log"))
            url = svc.url
            dashboard = dashboard_url_from_log(svc.log_path.read_text()) or args.dashboard
        check_loopback(dashboard)
        sampler = Sampler(ServeStatusClient(dashboard, app.get("name")))
        sampler.start()
        stack.callback(sampler.stop)
        print(f"load: {profile.name} for {profile.duration_s:g}s against {url}", flush=True)
        locust_rc = run_locust(url, profile, request_log, args.wait_s, args.max_requests, out,
                               args.photo_size)
        load_done = time.time()
        deadline = load_done + args.settle
        while time.time() < deadline and not at_min(sampler.latest(), mins):
            time.sleep(1)
        time.sleep(2)  # one more sample at min, so the plot shows the landing
        sampler.stop()
        samples = list(sampler.samples)
    start, requests = timeline.parse_request_log(request_log.read_text().splitlines())
    if start is None:
        raise RuntimeError(f"Locust wrote no requests (exit {locust_rc}); see {out}/locust.log")
    rel_samples = [(ts - start, counts) for ts, counts in samples]
    with open(out / "replicas.jsonl", "w") as f:  # the raw samples, to re-derive anything later
        for ts, counts in rel_samples:
            f.write(json.dumps({"t": round(ts, 3), **{n: c.__dict__ for n, c in counts.items()}})
                    + "\n")
    end_s = max(profile.duration_s, rel_samples[-1][0] if rel_samples else 0.0)
    columns, rows = timeline.build_timeline(requests, rel_samples, profile, end_s)
    deployments = timeline.deployments_of(rel_samples)
    meta = {"config": str(args.config), "shape": profile.name, "policy": policy_name(app),
            "locust_exit_code": locust_rc,
            "command": " ".join(["python", "-m", "load_tests.autoscale_experiment", *args.argv])}
    summary = timeline.summarize(requests, rel_samples, rows, profile, end_s, mins,
                                 args.p95_target_ms, meta)
    if not args.url:  # the Serve log is ours: when each new classifier replica served
        summary.update(classifier_start_summary((out / "serve.log").read_text(errors="replace"),
                                                start, rows, profile))
    write_csv(out / "timeline.csv", columns, rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{Path(args.config).name} | {profile.name} {profile.base_users}->{profile.peak_users} users | {summary['policy']}"
    plot(out / "timeline.png", rows, deployments, profile, args.p95_target_ms, title)
    return summary


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.autoscale_experiment",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="Serve config (configs/*.yaml)")
    p.add_argument("--shape", choices=shapes.SHAPES, default="step")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    p.add_argument("--out", required=True, help="directory for timeline.csv/.png, summary.json")
    p.add_argument("--url", default=None, help="attach to a running service instead (loopback)")
    p.add_argument("--dashboard", default="http://127.0.0.1:8265",
                   help="Ray dashboard, for replica counts when attaching with --url")
    p.add_argument("--base-users", type=int, default=2)
    p.add_argument("--peak-users", type=int, default=32)
    p.add_argument("--wait-s", type=float, default=0.1, help="each user's think time")
    p.add_argument("--photo-size", default="640x480",
                   help="WIDTHxHEIGHT of the photos Locust sends (160x120: cheap decoding, for "
                        "configs/autoscale-sim*.yaml)")
    p.add_argument("--settle", type=float, default=90.0,
                   help="after the load, wait at most this long for min_replicas")
    p.add_argument("--p95-target-ms", type=float, default=2000.0,
                   help="the latency target for 'time to recover p95'")
    p.add_argument("--max-requests", type=int, default=20000, help="Locust stops after this many")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in summary.json
    if not 0 < args.duration <= MAX_DURATION_S:
        p.error(f"--duration must be in (0, {MAX_DURATION_S}]")
    try:
        parse_size(args.photo_size)
    except ValueError as exc:
        p.error(f"--photo-size: {exc}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    summary = run(parse_args(argv))
    keys = ("policy", "scale_up_s", "p95_recover_s", "scale_down_s", "replica_seconds",
            "requests", "failed", "p95_hold_ms", "classifier_starts",
            "served_per_5s_from_first_decision", "worst_window_vs_before",
            "removed_after_serving_s")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
