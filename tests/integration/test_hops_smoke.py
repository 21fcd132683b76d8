"""load_tests/hops.py end to end for a few calls per stage: every stage timed, the table
printed, nothing left running. No speed is asserted (numbers belong in RESULTS.md)."""

import json
import subprocess
import sys

import pytest

from load_tests import hops
from tests.conftest import CONFIGS, ROOT, processes_with

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_hops_smoke(tmp_path):
    out = tmp_path / "hops.json"
    before = processes_with("load_tests.hops", "serve_app run")
    cmd = [sys.executable, "-m", "load_tests.hops", "--config", str(CONFIGS / "local.yaml"),
           "--set", "args.model.compile=false", "--requests", "5", "--pause", "0",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads(out.read_text())
    assert result["model"] == "efficientnet_lite0" and result["compile"] is False
    for key, _ in hops.ROWS:
        assert result[key]["n"] == 5 and 0 < result[key]["p50_ms"] <= result[key]["p90_ms"], key
    # Stages that contain others take longer than them.
    assert result["http_classify"]["p50_ms"] > result["http_healthz"]["p50_ms"]
    assert result["handle_chained"]["p50_ms"] > result["handle_empty_call"]["p50_ms"]
    assert result["handle_classifier"]["p50_ms"] > result["handle_empty_call"]["p50_ms"]
    assert result["breakdown"]["whole_ms"] == result["http_classify"]["p50_ms"]
    assert "outside decode and model" in proc.stdout
    assert processes_with("load_tests.hops", "serve_app run") <= before  # driver and service gone
