"""``python -m serve_app run CONFIG``: ``serve run`` with Ray's metrics on a fixed port.

``serve run`` starts its local Ray cluster with the metrics exporter on a random port, and
only ``ray start --metrics-export-port`` fixes it, which leaves a cluster to stop by hand. So
this starts the private cluster itself (``ray.init`` takes the port) and then runs Serve's own
``serve run`` command in the same process, which uses the cluster it finds: same output, same
SIGTERM / Ctrl-C behaviour, and ``http://127.0.0.1:METRICS_PORT/metrics`` for Prometheus
(monitoring/prometheus.yml, docs/observability.md).

With ``RAY_ADDRESS`` naming a running cluster there is nothing to start: the cluster's own
metrics port applies, and this is plain ``serve run``.

In HAProxy mode the cluster it starts runs HAProxy through serve_app's wrapper, so HAProxy's
own 502/503/504 reach clients as JSON with their status, not Ray's plain 500
(serve_app/haproxy_errors.py), a request a dying ingress dropped is sent again
(serve_app/haproxy_replay.py), and past capacity HAProxy refuses what the ingress would
(serve_app/haproxy_shedding.py).

Before it starts its own cluster it stops an orphaned HAProxy of an earlier run that still
holds the HTTP port or HAProxy's ports (a run killed outright), and refuses to start, naming
the port and the PID, when anything else holds them (serve_app/stale_haproxy.py). With
SERVE_APP_FAST_STOP=1 in HAProxy mode it stops its cluster itself on Ctrl-C and SIGTERM:
HAProxy drains the requests in flight, then Ray stops (serve_app/stopping.py; opt-in until
its stop times are measured: ``serve run``'s own Ctrl-C took 34 s idle).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

#: The documented port of ``make run``'s metrics endpoint (Ray's docs use it for the same).
METRICS_PORT = 8080


def starts_own_cluster(address: str | None) -> bool:
    return address in (None, "", "local")


def configure_haproxy(env, config: dict | None = None) -> None:
    """In HAProxy mode: HAProxy through serve_app's wrapper (JSON error pages), its replay of
    requests a dying ingress dropped, and the edge shedding of ``config``'s serve_app
    applications, each unless the caller chose otherwise (the cluster's processes inherit
    ``env``)."""
    from serve_app import haproxy_errors, haproxy_replay, haproxy_shedding
    from serve_app.config import ConfigError

    if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return
    if not env.get(haproxy_errors.BINARY_ENV):
        directory = Path(tempfile.gettempdir()) / "serve_app_haproxy"
        env[haproxy_errors.BINARY_ENV] = str(haproxy_errors.install(directory))
    for name, value in haproxy_replay.REPLAY_ENV.items():
        env.setdefault(name, value)
    from serve_app.launch import RAY_CLUSTER_ENV  # the ingress drain, as tests and k8s/ run
    for name, value in RAY_CLUSTER_ENV.items():
        env.setdefault(name, value)
    if config is not None and haproxy_shedding.LIMITS_ENV not in env:
        try:
            env[haproxy_shedding.LIMITS_ENV] = json.dumps(haproxy_shedding.limits(config))
        except ConfigError as exc:  # serve run reports it; nothing to shed for
            print(f"serve_app: no edge shedding: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app run", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT,
                        help=f"Ray's Prometheus endpoint on this node (default {METRICS_PORT})")
    parser.add_argument("--ray-temp-dir", default=None,
                        help="Ray's temp dir (sessions and logs; default /tmp/ray)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the cluster (default: the machine's cores); more "
                             "lets several small applications share one test cluster")
    args = parser.parse_args(argv)

    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.scripts import cli

    address = os.environ.get("RAY_ADDRESS")
    if starts_own_cluster(address):
        from serve_app import configfile, stale_haproxy

        config = configfile.load(args.config)
        configure_haproxy(os.environ, config)
        try:  # a stale HAProxy of an earlier run still on our ports (serve_app/stale_haproxy.py)
            stale_haproxy.clear_ports(stale_haproxy.service_ports(config, os.environ))
        except stale_haproxy.PortTaken as exc:
            print(exc, file=sys.stderr, flush=True)
            return 1
        kwargs = {"_temp_dir": args.ray_temp_dir} if args.ray_temp_dir else {}
        if args.num_cpus is not None:
            kwargs["num_cpus"] = args.num_cpus
        fast_stop = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" \
            and os.environ.get("SERVE_APP_FAST_STOP") == "1"  # opt-in until measured
        if fast_stop:  # Ctrl-C reaches the whole foreground group: Ray's own processes
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherit "ignore", the runner stops them
        ray.init(address="local", namespace=SERVE_NAMESPACE,
                 _metrics_export_port=args.metrics_port, **kwargs)
        if fast_stop:  # drain at the edge, then stop Ray (serve_app/stopping.py)
            from serve_app.stopping import Stopper

            Stopper(stale_haproxy.http_port(config)).install()
        print(f"serve_app: Ray metrics at http://127.0.0.1:{args.metrics_port}/metrics",
              flush=True)
    else:
        print(f"serve_app: attaching to {address}; its metrics port applies", file=sys.stderr)
    cli.main(["run", args.config], prog_name="serve")  # exits the process when done
    return 0
