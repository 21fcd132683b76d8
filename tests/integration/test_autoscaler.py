"""Serve asks for classifier replicas, and the Ray autoscaler adds a GPU-typed node for them.

The node types are k8s/rayservice.yaml's, through the translation the KubeRay autoscaler
itself runs (tests/integration/autoscaler_cluster.py), scaled down to this machine: a head
that takes no replicas and starts alone, "cpu" and "gpu" workers added and removed by the real
Ray autoscaler (v2, fake multi-node provider), each labelled as its KubeRay group is. The
application is configs/gpu.yaml's, with a small random-weights model, one Ingress and one
Preprocessor, and a Classifier that autoscales from 1 to 2 replicas of one logical GPU each,
so its second replica needs a second GPU node. Ray's Python proxy on the head (HAProxy would
need its own ports per node, which nodes started by the autoscaler cannot be given here).
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from serve_app import placement
from serve_app.launch import free_port, http_get, prepare_config
from tests.conftest import CONFIGS, encode
from tests.integration.autoscaler_cluster import FakeProviderCluster, fake_node_types
from load_tests.closed_loop import Load, summary
from load_tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POOL = placement.POOL_LABEL
IDLE_TIMEOUT_S = 8  # k8s/ has 300 s; short here so the removal is seen in seconds
CLIENTS = 6
_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _config(port: int) -> dict:
    def edit(config: dict) -> None:
        app = config["applications"][0]
        app["args"]["model"] = {"name": "mobilenet_v2", "weights": None}
        app["args"]["log_requests"] = True  # the new replica's first batch, from its log
        app.pop("autoscaling_policy", None)  # Ray's default policy: the subject is the nodes
        for entry in app["deployments"]:
            if entry["name"] != "Classifier":
                entry.pop("autoscaling_config", None)
                entry["num_replicas"] = 1
                continue
            entry["ray_actor_options"]["num_gpus"] = 1  # one replica per GPU node
            entry["autoscaling_config"] = {
                "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                "upscale_delay_s": 3, "downscale_delay_s": 5, "metrics_interval_s": 1,
                "look_back_period_s": 3}
    return prepare_config(CONFIGS / "gpu.yaml", port, edit)


def _classifiers(serve) -> tuple[int, list[dict]]:
    """The Classifier's target replica count and its RUNNING replicas."""
    apps = serve.context._get_global_client().get_serve_details().get("applications", {})
    d = ((apps.get("serve_app") or {}).get("deployments") or {}).get("Classifier") or {}
    running = [r for r in d.get("replicas", []) if r.get("state") == "RUNNING"]
    return d.get("target_num_replicas", 0), running


def _gpu_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def _exactly(n: int, get):
    """For wait_for: ``get()``'s value once it holds ``n`` items."""
    def check():
        value = get()
        return value if len(value) == n else None
    return check


def _first_batch_at(session_dir: str, replica_id: str) -> float | None:
    """Wall-clock time of a replica's first logged batch (its log file names its id)."""
    logs = Path(session_dir, "logs", "serve")
    for path in logs.glob(f"replica_serve_app_Classifier_{replica_id}*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "request_ids=" in line and "batch of" in line:
                found = _LOG_TIME.search(line)
                if found:
                    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def test_serve_demand_adds_a_gpu_node_that_serves_and_is_removed_when_idle(photos):
    import ray
    from ray import serve
    from ray.serve._private import api as serve_private_api
    from ray.serve.schema import ServeDeploySchema

    node_types = fake_node_types(worker_cpus={"cpu": 2, "gpu": 1}, min_workers=0, max_workers=2)
    assert node_types["gpu"]["resources"]["GPU"] == 1 and node_types["gpu"]["labels"] == {
        POOL: "gpu"}, node_types["gpu"]  # as k8s/rayservice.yaml's gpu group says
    port = free_port()
    config = _config(port)
    url = f"http://127.0.0.1:{port}"
    with FakeProviderCluster(node_types, idle_timeout_minutes=IDLE_TIMEOUT_S / 60) as cluster:
        ray.init(address=cluster.gcs_address, namespace="serve", logging_level="WARNING",
                 log_to_driver=False)
        try:
            assert [n["Labels"].get(POOL) for n in ray.nodes() if n["Alive"]] == ["head"]
            began = time.monotonic()
            client = serve_private_api.serve_start(http_options=config["http_options"],
                                                   proxy_location="HeadOnly")
            client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
            wait_for(lambda: _classifiers(serve)[1] and http_get(f"{url}/readyz")[0] == 200, 300,
                     "the application serving")
            first_up_s = time.monotonic() - began
            (first_gpu,) = _gpu_nodes(ray)

            load = Load(f"{url}/v1/classify", [encode(photos["chelsea"])], CLIENTS)
            t: dict = {}

            def scale_up():
                t["load"], t_wall = time.monotonic(), time.time()
                wait_for(lambda: _classifiers(serve)[0] == 2, 120, "Serve asking for 2 classifiers")
                t["decision"] = time.monotonic()
                gpus = wait_for(_exactly(2, lambda: _gpu_nodes(ray)), 180, "a second GPU node")
                t["node_up"] = time.monotonic()
                t["new_labels"] = next(n["Labels"] for n in gpus
                                       if n["NodeID"] != first_gpu["NodeID"])
                running = wait_for(_exactly(2, lambda: _classifiers(serve)[1]), 180,
                                   "the second classifier RUNNING")
                t["running"] = time.monotonic()
                (new,) = [r for r in running if r["node_id"] != first_gpu["NodeID"]]
                t["new"] = new
                served_at = wait_for(
                    lambda: _first_batch_at(cluster.session_dir, new["replica_id"]), 60,
                    "the new replica's first batch")
                t["serving"] = t["load"] + (served_at - t_wall)
                time.sleep(2)

            load.run(0, during=scale_up)
            report = summary(load.answers, t["load"])
            stopped = time.monotonic()
            wait_for(lambda: len(_classifiers(serve)[1]) == 1, 120, "Serve back to 1 classifier")
            t["replica_removed"] = time.monotonic()
            wait_for(lambda: len(_gpu_nodes(ray)) == 1, 180, "the idle GPU node removed")
            t["node_removed"] = time.monotonic()
            after = httpx.post(f"{url}/v1/classify", content=encode(photos["chelsea"]),
                               headers={"Content-Type": "image/jpeg"}, timeout=60)
            new_node_pool = t["new_labels"].get(POOL)

            delays = {
                "first_start_s": round(first_up_s, 1),
                "serve_decision_after_load_s": round(t["decision"] - t["load"], 1),
                "gpu_node_up_after_decision_s": round(t["node_up"] - t["decision"], 1),
                "replica_running_after_node_s": round(t["running"] - t["node_up"], 1),
                "first_batch_after_decision_s": round(t["serving"] - t["decision"], 1),
                "replica_removed_after_load_s": round(t["replica_removed"] - stopped, 1),
                "node_removed_after_replica_s": round(t["node_removed"] - t["replica_removed"], 1),
            }
            report.update(delays=delays, idle_timeout_s=IDLE_TIMEOUT_S, clients=CLIENTS,
                          new_replica_pool=new_node_pool)
            print("autoscaler:", json.dumps(report))
            out = os.environ.get("SERVE_APP_RESULTS_DIR")
            if out:
                with open(os.path.join(out, "autoscaler_gpu_node.json"), "w") as f:
                    json.dump(report, f, indent=2)
            assert report["statuses"] == {"200": len(load.answers)}, report
            assert new_node_pool == "gpu", t["new_labels"]
            assert after.status_code == 200 and after.json()["predictions"], after.text[:200]
            assert delays["node_removed_after_replica_s"] >= IDLE_TIMEOUT_S - 1, delays
        finally:
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - the cluster may be half down already
                pass
            ray.shutdown()
    assert cluster.leftovers == [], cluster.leftovers
