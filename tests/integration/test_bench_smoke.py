"""The benchmark end to end for a few seconds: complete JSON, zero errors, nothing left running.

No speed is asserted: this 2-core machine is shared, so numbers belong in RESULTS.md.
"""

import json
import subprocess
import sys

import pytest

from load_tests import bench
from tests.conftest import CONFIGS, ROOT, processes_with

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _serve_processes() -> set[int]:
    return processes_with("naive_server", "--stats-driver")


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    before = _serve_processes()
    cmd = [sys.executable, "-m", "load_tests.bench", "--config", str(CONFIGS / "local.yaml"),
           "--model", "resnet18", "--duration", "3", "--warmup", "1", "--concurrency", "1,4",
           "--batch-sizes", "1,4", "--raw-seconds", "0.5", "--naive", "--json", str(out),
           "--set", "Classifier.autoscaling_config=null", "--set", "Classifier.num_replicas=1",
           "--set", "args.model.compile=false"]  # eager: a compile is not what is smoked
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads(out.read_text())
    assert bench.missing_keys(result) == []
    assert result["model"] == "resnet18"
    assert [r["concurrency"] for r in result["served"]] == [1, 4]
    assert [r["concurrency"] for r in result["naive"]] == [1, 4]
    for row in result["served"] + result["naive"]:
        assert row["errors"] == 0, row
        assert row["requests"] > 0 and row["rps"] > 0
    for row in result["served"]:
        assert row["mean_batch"] >= 1
        assert set(bench.GROUPS) <= set(row["cpu_ms_per_request"])
        assert row["cpu_ms_per_request"]["classifier"] > 0
    assert set(bench.GROUPS) <= set(result["cpu_ms_per_request"])
    assert result["raw"]["best_batch_size"] in (1, 4)
    assert "served" in proc.stdout and "naive" in proc.stdout  # the table was printed
    assert _serve_processes() <= before  # the naive server and the stats driver are gone
