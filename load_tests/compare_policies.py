"""serve_app's policy against Ray's default, in the simulator, on several load shapes and seeds.

    python -m load_tests.compare_policies --config configs/autoscale-sim.yaml \
        --shapes step,spike,ramp --seeds 3 --out runs/compare.json

For each shape: the config's own policy (serve_app's AppPolicy) and Ray's default with
``target_ongoing_requests`` at the Classifier's batch size, at half and at double it (fair to
Ray: what a user of a batched deployment would pick, and either side of it). Each cell is the
median of the seeds' runs of p95 during the hold and Classifier replica-seconds; a policy
"wins" a cell against a rival when it is no worse on both and better on one. Prints a table,
writes every run to ``--out``. No cluster: load_tests/simulate.py, seconds per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

from load_tests.simulate import simulate
from load_tests.simulation.settings import PolicySpec, from_config
from serve_app import configfile, topology


def variants(batch: int) -> dict[str, dict]:
    """Name -> from_config keyword arguments of each policy compared."""
    out: dict[str, dict] = {"serve_app": {}}
    for label, target in (("ray@batch", batch), ("ray@half", max(1, batch // 2)),
                          ("ray@double", 2 * batch)):
        out[f"{label}={target}"] = {"policy": PolicySpec("default"),
                                    "classifier_overrides": {"target_ongoing_requests": target}}
    return out


def cell(runs: list[dict]) -> dict:
    """Medians over seeds, and every run's numbers."""
    p95 = [r["p95_hold_ms"] for r in runs]
    seconds = [r["replica_seconds"][topology.CLASSIFIER] for r in runs]
    return {"p95_hold_ms": statistics.median(p95), "classifier_replica_s": statistics.median(
        seconds), "runs": [{"p95_hold_ms": a, "classifier_replica_s": b, "failed": r["failed"]}
                          for a, b, r in zip(p95, seconds, runs)]}


def beats(a: dict, b: dict) -> str:
    """'both' when ``a`` is no worse on either axis and better on one; else which axis it wins
    ('p95', 'replica-s') or 'neither'."""
    lower_p95 = a["p95_hold_ms"] < b["p95_hold_ms"]
    fewer = a["classifier_replica_s"] < b["classifier_replica_s"]
    if a["p95_hold_ms"] <= b["p95_hold_ms"] and a["classifier_replica_s"] <= b[
            "classifier_replica_s"] and (lower_p95 or fewer):
        return "both"
    return "p95" if lower_p95 else "replica-s" if fewer else "neither"


def compare(config_path: str, shapes: list[str], seeds: int, sim: dict) -> dict:
    config = configfile.load(config_path)
    app = next(a for a in config["applications"]
               if a.get("import_path") == configfile.APP_IMPORT_PATH)
    classifier = next(d for d in app["deployments"] if d["name"] == topology.CLASSIFIER)
    batch = int((classifier.get("user_config") or {}).get("max_batch_size", 8))
    extra = {k: sim[k] for k in ("process_start_s", "startup_concurrency", "start_s",
                                 "preprocess_ms") if sim.get(k) is not None}
    result: dict = {"config": config_path, "simulator": sim, "shapes": {}}
    for shape in shapes:
        cells = {}
        for name, kwargs in variants(batch).items():
            settings = from_config(config, **{**extra, **kwargs})
            runs = [simulate(settings, shape, sim["duration_s"], base=sim["base_users"],
                             peak=sim["peak_users"], wait_s=sim["wait_s"], seed=seed,
                             mode="exact", settle_s=sim["settle_s"]).summary
                    for seed in range(seeds)]
            cells[name] = cell(runs)
        ours = cells["serve_app"]
        for name, other in cells.items():
            if name != "serve_app":
                other["serve_app_wins"] = beats(ours, other)
        result["shapes"][shape] = cells
    return result


def table(result: dict) -> str:
    lines = [f"{'shape':<6} {'policy':<16} {'p95 hold ms':>12} {'classifier replica-s':>21} "
             f"{'serve_app wins':>15}"]
    for shape, cells in result["shapes"].items():
        for name, c in cells.items():
            lines.append(f"{shape:<6} {name:<16} {c['p95_hold_ms']:>12.0f} "
                         f"{c['classifier_replica_s']:>21.0f} "
                         f"{c.get('serve_app_wins', ''):>15}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.compare_policies",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--shapes", default="step,spike,ramp")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--base-users", type=int, default=4)
    p.add_argument("--peak-users", type=int, default=48)
    p.add_argument("--wait-s", type=float, default=0.1)
    p.add_argument("--settle", type=float, default=4.0,
                   help="simulated seconds after the load (the experiment stops ~4 s after)")
    p.add_argument("--start-s", type=float, default=None)
    p.add_argument("--process-start-s", type=float, default=None)
    p.add_argument("--startup-concurrency", type=int, default=None)
    p.add_argument("--preprocess-ms", type=float, default=3.0)
    p.add_argument("--out", default=None, help="write every run here (JSON)")
    args = p.parse_args(argv)
    sim = {"duration_s": args.duration, "base_users": args.base_users,
           "peak_users": args.peak_users, "wait_s": args.wait_s, "settle_s": args.settle,
           "start_s": args.start_s, "process_start_s": args.process_start_s,
           "startup_concurrency": args.startup_concurrency, "preprocess_ms": args.preprocess_ms}
    result = compare(args.config, args.shapes.split(","), args.seeds, sim)
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
