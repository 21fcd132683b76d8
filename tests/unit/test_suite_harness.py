"""The suite's own guard rails, run as a user's pytest would run them: a service a test left
running fails the run (tests/conftest.py), and a hang fails its test, not the CI's budget."""

import os
import subprocess
import sys

import psutil

from tests.conftest import ROOT, RUN_ENV

LEAKY = """
import subprocess, sys, time

def test_starts_a_server(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "haproxy"])
    (tmp_path.parent.parent / "pid").write_text(str(proc.pid))
    if {stop}:
        proc.terminate()
        proc.wait()
"""


def _pytest(tmp_path, source: str, *args: str) -> subprocess.CompletedProcess:
    test = tmp_path / "test_inner.py"
    test.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != RUN_ENV}  # a run of its own
    env["SERVE_APP_LEAK_GRACE_S"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "t"),
         *args, str(test)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_service_left_running_fails_the_run_and_is_killed(tmp_path):
    run = _pytest(tmp_path, LEAKY.format(stop=False))
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 passed" in run.stdout and "leftover processes" in run.stdout, run.stdout[-2000:]
    pid = int((tmp_path / "pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_service_stopped_by_its_test_passes(tmp_path):
    run = _pytest(tmp_path, LEAKY.format(stop=True))
    assert run.returncode == 0 and "leftover" not in run.stdout, run.stdout[-2000:]


def test_a_hang_fails_its_test_with_its_stack(tmp_path):
    run = _pytest(tmp_path, "import time\n\ndef test_hangs():\n    time.sleep(60)\n",
                  "--timeout", "2")
    assert run.returncode == 1, run.stdout[-2000:]
    assert "Timeout" in run.stdout and "time.sleep(60)" in run.stdout, run.stdout[-2000:]
