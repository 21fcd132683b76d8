"""What every test shares: photos, paths, and the run's own process accounting.

Every process the suite starts inherits ``SERVE_APP_TEST_RUN=<this run's id>`` (set when pytest
starts), so at the end of the run the ones still alive are found precisely, whoever their
parent was: a Ray cluster, HAProxy, Prometheus or a server a test started and did not stop
fails the run, named, and is killed so that it cannot take the next run's ports.
"""

import io
import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

RUN_ENV = "SERVE_APP_TEST_RUN"
#: What a service process's command line holds: Ray's processes and workers, HAProxy,
#: Prometheus, uvicorn and serve_app's own servers and drivers. (Not pytest's helpers: a
#: multiprocessing or compile worker lives as long as the pytest process, and dies with it.)
SERVICE_MARKS = ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private", "haproxy",
                 "prometheus", "uvicorn", "serve_app run", "serve_app.runner", "naive_server",
                 "load_tests.", "--stats-driver")


def pytest_configure(config):
    os.environ.setdefault(RUN_ENV, uuid.uuid4().hex)


def started_by_this_run() -> dict[int, str]:
    """Service processes (:data:`SERVICE_MARKS`) alive now that this run started, by PID."""
    mark = f"{RUN_ENV}={os.environ[RUN_ENV]}".encode()
    found = {}
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
        except (OSError, psutil.Error):
            continue
        if any(m in cmdline for m in SERVICE_MARKS):
            found[proc.pid] = cmdline[:160]
    return found


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a service it started outlived it (after a grace of a few seconds for
    processes that are already stopping), and kill what is left. (Under pytest-xdist only the
    controller checks, once every worker has finished.)"""
    if hasattr(session.config, "workerinput"):
        return
    deadline = time.monotonic() + float(os.environ.get("SERVE_APP_LEAK_GRACE_S", "20"))
    while (left := started_by_this_run()) and time.monotonic() < deadline:
        time.sleep(1)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"  {pid}: {cmd}" for pid, cmd in sorted(left.items())]
    message = "processes this run started are still alive (killed now):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.write_sep("=", "leftover processes", red=True)
        reporter.write_line(message)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def processes_with(*needles: str) -> set[int]:
    """PIDs of the processes whose command line contains one of ``needles``; compared before
    and after a tool runs, to show it stopped everything it started."""
    found = set()
    for proc in psutil.process_iter():
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(needle in cmdline for needle in needles):
            found.add(proc.pid)
    return found


def encode(array, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}), **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict:
    """Real photos from pip packages, as arrays: a cat and a cup of espresso."""
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee()}
