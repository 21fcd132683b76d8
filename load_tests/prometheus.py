"""A real Prometheus server on a free loopback port (the monitoring tests, load_tests.stages).

The binary is ``$SERVE_APP_PROMETHEUS``, else ``prometheus`` on PATH (Debian's package:
``apt-get install prometheus``; .ci/run installs it when it can). Stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import yaml

from serve_app.launch import free_port, http_get


def binary() -> Optional[str]:
    return os.environ.get("SERVE_APP_PROMETHEUS") or shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


class Prometheus:
    def __init__(self, targets: list[str], scrape_interval_s: float = 1.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="serve_app_prom_")
        self.config = {"global": {"scrape_interval": f"{scrape_interval_s:g}s"},
                       "scrape_configs": [{"job_name": "ray",
                                           "static_configs": [{"targets": targets}]}]}
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Prometheus":
        path = Path(self._dir.name) / "prometheus.yml"
        path.write_text(yaml.safe_dump(self.config))
        self._log = open(Path(self._dir.name) / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary(), f"--config.file={path}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={self._dir.name}/data"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while http_get(self.url + "/-/ready")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.__exit__()
                raise RuntimeError("prometheus did not start:\n" + log)
            time.sleep(0.3)
        return self

    def log_tail(self) -> str:
        return (Path(self._dir.name) / "prometheus.log").read_text(errors="replace")[-3000:]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> Optional[float]:
        """The single value of a scalar-like expression, None when it has no data."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def __exit__(self, *exc) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._log.close()
        self._dir.cleanup()
