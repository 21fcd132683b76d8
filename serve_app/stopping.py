"""Stopping the runner's own cluster in HAProxy mode: drain at the edge, then stop at once.

``serve run`` answers Ctrl-C with ``serve.shutdown()``, whose first step kills the proxies, and
in HAProxy mode that is HAProxy, with SIGKILL (ray/serve/_private/haproxy.py: HAProxyApi.stop):
a request in flight is cut there. It then waits for the replicas' graceful stop, where an
ingress replica behind HAProxy stays reachable for
``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` (30 s) so that load balancers can deregister
it, though no HAProxy is left to reach it: an idle ``make run`` took 34 s to stop. SIGTERM
skipped Serve altogether (Ray's driver exits and tears the cluster down: 6 s, and requests in
flight are cut as well).

So the runner (serve_app/runner.py) stops its own cluster itself, on SIGINT and SIGTERM alike:

1. HAProxy soft-stops (SIGUSR1 to each HAProxy of the cluster: it closes its listeners, so
   new connections are refused, and exits once the requests it holds are answered). Every
   HTTP request enters through HAProxy, so when the last HAProxy has exited nothing is in
   flight anywhere in the service. The wait ends as soon as that is so (an idle service: at
   once) and at the latest after ``drain_timeout_s``.
2. Ray is shut down (``ray.shutdown()``), with nothing left to drain.

A second Ctrl-C during step 1 skips the rest of the drain.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, Optional, TextIO

from serve_app import stale_haproxy

#: Opt-in for now (SERVE_APP_FAST_STOP=1, serve_app/runner.py): its stop times are not measured yet.
#: The longest an edge drain waits for requests in flight (Serve's default
#: graceful_shutdown_timeout_s is 20 s; serve_app's ingress admits requests that may wait
#: up to ~max_queued / throughput before their answer, docs/reliability.md).
DRAIN_TIMEOUT_S = 30.0


def cluster_haproxies(http_port: int, procs: Optional[dict] = None,
                      held: Optional[dict] = None, config_dir: Optional[str] = None) -> list[int]:
    """PIDs of the HAProxy processes of the cluster serving ``http_port``: the one listening
    there and every other HAProxy child of the same HAProxyManager worker (older ones still
    answering requests after a reload)."""
    config_dir = config_dir or stale_haproxy.haproxy_dir()
    if procs is None:
        held = stale_haproxy.listeners({http_port}, stale_haproxy._pids())
        procs = stale_haproxy._read_procs()
    managers = set()
    for pid in (held or {}).get(http_port, ()):
        proc = procs.get(pid)
        if proc is not None and stale_haproxy.is_serve_app_haproxy(proc.cmdline, config_dir) \
                and not stale_haproxy.is_orphaned(proc, procs):
            managers.add(proc.ppid)
    return sorted(p.pid for p in procs.values() if p.ppid in managers
                  and stale_haproxy.is_serve_app_haproxy(p.cmdline, config_dir))


def drain_edge(http_port: int, timeout_s: float = DRAIN_TIMEOUT_S,
               interrupted: Callable[[], bool] = lambda: False,
               out: TextIO = sys.stderr) -> float:
    """Soft-stop the cluster's HAProxy processes and wait until they have exited (nothing in
    flight), ``timeout_s`` at most or until ``interrupted()``. Returns the seconds waited."""
    start = time.monotonic()
    pids = cluster_haproxies(http_port)
    if not pids:
        return 0.0
    print(f"serve_app: draining: HAProxy (PID {', '.join(map(str, pids))}) refuses new "
          f"connections and finishes the requests in flight (at most {timeout_s:.0f} s)",
          file=out, flush=True)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR1)  # HAProxy's soft stop
        except ProcessLookupError:
            pass
    while any(stale_haproxy.alive(pid) for pid in pids):
        if time.monotonic() - start > timeout_s or interrupted():
            left = [pid for pid in pids if stale_haproxy.alive(pid)]
            print(f"serve_app: stopping with requests still in flight (HAProxy {left})",
                  file=out, flush=True)
            break
        time.sleep(0.05)
    return time.monotonic() - start


class Stopper:
    """SIGINT and SIGTERM handler of the runner: :func:`drain_edge`, ``ray.shutdown()``, exit.
    Installed after ``ray.init`` (it replaces Ray's SIGTERM handler, which only exits)."""

    def __init__(self, http_port: int, timeout_s: float = DRAIN_TIMEOUT_S,
                 out: TextIO = sys.stderr):
        self.http_port, self.timeout_s, self.out = http_port, timeout_s, out
        self.signals = 0

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame) -> None:
        self.signals += 1
        if self.signals > 1:  # a second Ctrl-C: the drain loop sees it and gives up
            return
        name = signal.Signals(signum).name
        print(f"serve_app: {name}: stopping", file=self.out, flush=True)
        t0 = time.monotonic()
        drain_edge(self.http_port, self.timeout_s, lambda: self.signals > 1, self.out)
        t1 = time.monotonic()
        import ray

        ray.shutdown()
        print(f"serve_app: stopped (drain {t1 - t0:.1f} s, Ray {time.monotonic() - t1:.1f} s)",
              file=self.out, flush=True)
        sys.exit(0 if signum == signal.SIGINT else 128 + signum)
