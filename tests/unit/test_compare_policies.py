"""load_tests.compare_policies: who beats whom on which axis, and a small grid end to end."""

import json

from load_tests import compare_policies
from tests.conftest import CONFIGS


def _cell(p95: float, seconds: float) -> dict:
    return {"p95_hold_ms": p95, "classifier_replica_s": seconds}


def test_beats_needs_no_worse_on_both_and_better_on_one():
    assert compare_policies.beats(_cell(100, 50), _cell(120, 50)) == "both"
    assert compare_policies.beats(_cell(100, 50), _cell(100, 60)) == "both"
    assert compare_policies.beats(_cell(100, 70), _cell(120, 60)) == "p95"
    assert compare_policies.beats(_cell(130, 50), _cell(120, 60)) == "replica-s"
    assert compare_policies.beats(_cell(100, 50), _cell(100, 50)) == "neither"


def test_a_grid_compares_each_ray_target_with_medians(tmp_path):
    out = tmp_path / "grid.json"
    assert compare_policies.main(["--config", str(CONFIGS / "autoscale-sim.yaml"),
                                  "--shapes", "spike", "--seeds", "2", "--duration", "40",
                                  "--peak-users", "24", "--start-s", "5",
                                  "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["shapes"]["spike"]
    assert list(cells) == ["serve_app", "ray@batch=8", "ray@half=4", "ray@double=16"]
    for name, cell in cells.items():
        assert len(cell["runs"]) == 2
        assert min(r["p95_hold_ms"] for r in cell["runs"]) <= cell["p95_hold_ms"] <= max(
            r["p95_hold_ms"] for r in cell["runs"])
        assert name == "serve_app" or cell["serve_app_wins"] in ("both", "p95", "replica-s",
                                                                  "neither")
