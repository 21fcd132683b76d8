"""A service's start and a service killed outright, on one cluster of their own.

/readyz says 503 while the classifier loads and warms up, 200 once it can serve; then that
service is killed outright and leaves no HAProxy behind that the next start trips over.

Ray's HAProxy is a child of the HAProxyManager actor's worker, which kills it as it exits; one
that dies without that step (killed alone, or while a reload spawns a new HAProxy as the
cluster goes down) leaves it orphaned on the port. This test makes that happen for certain:
the manager's worker is frozen, the runner's whole process group is SIGKILLed (as ``make run``
dying would be), then the worker is killed. The next start on the same port must stop the
stale HAProxy (serve_app/stale_haproxy.py) and serve.
"""

import os
import signal
import time

import httpx
import pytest

from serve_app import stale_haproxy
from serve_app.launch import ServeProcess, http_get
from tests.conftest import CONFIGS

pytestmark = [pytest.mark.integration]


def _tiny(config: dict) -> None:
    app = config["applications"][0]
    app["args"]["model"] = {"name": "resnet18", "weights": None, "compile": False}
    app.pop("autoscaling_policy", None)
    for entry in app["deployments"]:
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = 1


def _haproxy_on(port: int) -> stale_haproxy.Proc:
    """The serve_app HAProxy listening on ``port`` (a few tries: a reload may be handing the
    socket over)."""
    for _ in range(20):
        pids = stale_haproxy.listeners({port}, stale_haproxy._pids()).get(port, set())
        procs = stale_haproxy._read_procs()
        found = [procs[p] for p in pids if p in procs and stale_haproxy.is_serve_app_haproxy(
            procs[p].cmdline, stale_haproxy.haproxy_dir())]
        if len(found) == 1:
            return found[0]
        time.sleep(0.25)
    raise AssertionError(f"not one serve_app HAProxy listens on {port}: {pids}")


def _session(sid: int) -> set[int]:
    """Live processes of session ``sid`` (the first service's runner and what it started)."""
    found = set()
    for pid in stale_haproxy._pids():
        try:
            if os.getsid(pid) == sid and stale_haproxy.alive(pid):
                found.add(pid)
        except OSError:
            pass
    return found


def _kill(pid, cmdline=None) -> None:
    if pid is None or not stale_haproxy.alive(pid):
        return
    if cmdline is not None and not stale_haproxy._still_same(pid, cmdline):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _slow_to_warm(config: dict) -> None:
    # resnet18 (random weights) with 100 warm-up passes at batch sizes 1 and 8 takes ~17 s on
    # one thread here (150: ~25 s): long enough to see the ingress up and the classifier not
    # yet ready, also with HAProxy, which routes to the ingress a few seconds after it is up.
    _tiny(config)
    args = config["applications"][0]["args"]
    args["warmup_iterations"] = 100
    args["readiness_timeout_s"] = 0.5


@pytest.fixture(scope="module")
def first():
    """A service started until its ingress answers (/healthz), its classifier still warming."""
    svc = ServeProcess(CONFIGS / "local.yaml", edit=_slow_to_warm, ready_path="/healthz")
    try:
        svc.start()
        yield svc
    finally:
        svc.close()


def test_readyz_is_503_until_the_classifier_is_warm(first):
    with httpx.Client(base_url=first.url, timeout=30) as client:
        answer = client.get("/readyz")
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "not_ready"
        assert client.get("/healthz").status_code == 200  # alive, just not ready
        deadline = time.monotonic() + 180
        while answer.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
            answer = client.get("/readyz")
            assert answer.status_code in (200, 503), answer.text
        assert answer.status_code == 200 and answer.json()["status"] == "ready"


def test_a_stale_haproxy_on_the_port_is_stopped_by_the_next_start(first):
    second = None
    haproxy = manager = manager_cmd = None
    try:
        port = first.port
        manager = _haproxy_on(port).ppid  # the HAProxyManager's worker, across reloads
        manager_cmd = stale_haproxy._read_procs()[manager].cmdline
        assert manager_cmd[0].startswith("ray::HAProxyManager"), manager_cmd

        os.kill(manager, signal.SIGSTOP)  # it cannot kill its HAProxy on the way out
        os.killpg(first.proc.pid, signal.SIGKILL)  # make run's process group, killed outright
        first.proc.wait(timeout=10)
        os.kill(manager, signal.SIGKILL)
        haproxy = _haproxy_on(port)  # the one serving when the cluster died (a reload may
        assert haproxy.ppid != manager  # have replaced the one seen at readiness): orphaned
        # The rest of the cluster (replicas, which the stale HAProxy could still reach) exits
        # on its own within seconds of its raylet; the HAProxy alone stays.
        deadline = time.monotonic() + 30
        while (left := _session(first.proc.pid) - {haproxy.pid}) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # one that lingers (twice in a full run: a worker of the dead
            _kill(pid)  # cluster after 30 s) is not what is under test: the HAProxy is
        assert stale_haproxy.alive(haproxy.pid) and _haproxy_on(port).pid == haproxy.pid
        first.stop()  # only its log and replica-port block: its processes are gone

        second = ServeProcess(CONFIGS / "local.yaml", port=port, edit=_tiny, ready_path="/healthz")
        second.start(attempts=1)
        assert second.port == port
        assert http_get(second.url + "/healthz")[0] == 200
        assert not stale_haproxy.alive(haproxy.pid), "the stale HAProxy still runs"
        assert f"stopped a stale HAProxy (PID {haproxy.pid})" in second.log_path.read_text()
        assert _haproxy_on(port).ppid != manager
    finally:
        _kill(manager, manager_cmd)
        if haproxy is not None:
            _kill(haproxy.pid, haproxy.cmdline)
        if second is not None:
            second.close()
