"""configs/gpu.yaml's application on a multi-node Ray cluster, on this one machine.

The cluster is k8s/rayservice.yaml scaled down: a head taking no replicas, one CPU node and
two nodes that declare one GPU each (Ray schedules on logical resources; the classifiers run
on the CPU), every node labelled as its KubeRay group is (``serve-app/pool``). HAProxy on
every node, each on its own ports (``RAY_SERVE_WORKER_PROXY_HTTP_PORT``). Proven here: every
replica lands where its label_selector says, every node's proxy serves, and a GPU node that
dies has its classifiers rescheduled on the other while requests go on; and the survivor's one
GPU then holds four 0.25-GPU classifiers, and a fifth waits for a share (Ray schedules on
logical resources: a node that declares a GPU has one to hand out, CUDA or not).
"""

from __future__ import annotations

import copy
import json
import os
import time

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve._private import api as serve_private_api
from ray.serve.schema import ServeDeploySchema

from serve_app import configfile, placement
from serve_app.launch import (RAY_CLUSTER_ENV, PortBlock, cluster_env, free_ports, http_get,
                              prepare_config)
from tests.conftest import CONFIGS, encode
from load_tests.closed_loop import Load, summary
from load_tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POOL = placement.POOL_LABEL
CLASSIFIERS = 4  # one GPU node's worth at 0.25 GPU each: all fit the survivor after a kill
#: The GCS declares a silent node dead after 3 missed health checks 1 s apart (Ray's default:
#: 5 missed, 3 s apart, after 5 s; about 15-25 s before anything is rescheduled). What is
#: under test is what Serve does once the node is gone, not how long Ray takes to notice.
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def _small(config: dict) -> None:
    """gpu.yaml with a small random-weights model and fixed replicas; placement as written."""
    config["proxy_location"] = "EveryNode"
    app = config["applications"][0]
    app["args"]["model"] = {"name": "mobilenet_v2", "weights": None}
    app.pop("autoscaling_policy", None)
    for entry in app["deployments"]:
        entry.pop("autoscaling_config")
        entry["num_replicas"] = CLASSIFIERS if entry["name"] == "Classifier" else 1


def _details() -> dict:
    return serve.context._get_global_client().get_serve_details()


def _replicas() -> dict[str, list[dict]]:
    app = _details().get("applications", {}).get("serve_app") or {}
    return {name: [r for r in d.get("replicas", []) if r.get("state") == "RUNNING"]
            for name, d in (app.get("deployments") or {}).items()}


@pytest.fixture(scope="module")
def cluster():
    ports = PortBlock()
    head_port, *worker_ports = free_ports(4)
    base = {**RAY_CLUSTER_ENV, **ports.env()}
    nodes: dict[str, tuple] = {}
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, labels={POOL: "head"}, env_vars=cluster_env(dict(base)),
            _system_config=FAST_NODE_DEATH))
        nodes["head"] = (c.head_node, head_port)
        for name, port, kwargs in (("cpu", worker_ports[0], dict(num_cpus=2)),
                                   ("gpu-a", worker_ports[1], dict(num_cpus=4, num_gpus=1)),
                                   ("gpu-b", worker_ports[2], dict(num_cpus=4, num_gpus=1))):
            env = cluster_env({**base, "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(port)},
                              taken=(head_port, *worker_ports))
            node = c.add_node(labels={POOL: name.split("-")[0]}, env_vars=env, **kwargs)
            nodes[name] = (node, port)
        ray.init(address=c.address, namespace="serve")
        config = prepare_config(CONFIGS / "gpu.yaml", head_port, _small)
        client = serve_private_api.serve_start(http_options=config["http_options"],
                                               proxy_location="EveryNode")
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        wait_for(lambda: len(_replicas().get("Classifier", [])) == CLASSIFIERS
              and all(_replicas().get(d) for d in ("Ingress", "Preprocessor")), 300,
              "every replica RUNNING")
        yield c, nodes, config
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - the cluster may be half down already
                pass
            ray.shutdown()
        if c is not None:
            for node in list(c.worker_nodes):  # no grace: nothing runs there any more, and
                c.remove_node(node, allow_graceful=False)  # a graceful stop took ~30 s
            c.shutdown()
        ports.release()


def _labels_by_node() -> dict[str, dict]:
    return {n["NodeID"]: n.get("Labels") or {} for n in ray.nodes() if n["Alive"]}


def _body(photos) -> bytes:
    return encode(photos["chelsea"])


def test_every_replica_runs_where_its_selector_says_and_gpu_shares_pack(cluster):
    _, _, config = cluster
    selectors = {p.deployment: p.selector for p in placement.placements(config)}
    labels = _labels_by_node()
    running = _replicas()
    where = {name: sorted(labels[r["node_id"]][POOL] for r in reps)
             for name, reps in running.items()}
    print("replicas by pool:", where)
    for name, reps in running.items():
        for r in reps:
            assert placement.selector_matches(selectors[name], labels[r["node_id"]]), (name, r)
    assert where["Ingress"] == ["cpu"] and where["Preprocessor"] == ["cpu"]
    assert where["Classifier"] == ["gpu"] * CLASSIFIERS
    per_node: dict[str, int] = {}
    for r in running["Classifier"]:
        per_node[r["node_id"]] = per_node.get(r["node_id"], 0) + 1
    assert max(per_node.values()) <= 4, per_node  # 0.25 GPU each, one GPU per node


def test_every_nodes_proxy_serves(cluster, photos):
    _, nodes, _ = cluster
    body = _body(photos)
    for name, (_, port) in nodes.items():
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 200, 120,
              f"{name}'s proxy ready")
        r = httpx.post(f"{url}/v1/classify", content=body,
                       headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, (name, r.status_code, r.text[:200])
        assert r.json()["predictions"], name


def test_a_dead_gpu_node_moves_its_classifiers_to_the_other_while_requests_go_on(
        cluster, photos):
    c, nodes, _ = cluster
    running = _replicas()["Classifier"]
    victim_name = max(("gpu-a", "gpu-b"), key=lambda n: sum(
        r["node_id"] == nodes[n][0].node_id for r in running))
    survivor = nodes["gpu-b" if victim_name == "gpu-a" else "gpu-a"][0].node_id
    victim = nodes[victim_name][0]
    moved = sum(r["node_id"] == victim.node_id for r in running)
    assert moved, "the victim runs no classifier"
    load = Load(f"http://127.0.0.1:{nodes['head'][1]}/v1/classify", [_body(photos)], clients=4)
    times: dict[str, float] = {}

    def kill_and_wait():
        time.sleep(2)
        times["killed"] = time.monotonic()
        c.remove_node(victim, allow_graceful=False)
        wait_for(lambda: sum(r["node_id"] == survivor for r in _replicas().get("Classifier", []))
              == CLASSIFIERS, 240, "every classifier on the surviving GPU node")
        times["moved"] = time.monotonic()
        time.sleep(2)  # load on the survivor alone

    load.run(0, during=kill_and_wait)
    report = summary(load.answers, times["killed"])
    report.update(classifiers_moved=moved,
                  all_on_survivor_after_s=round(times["moved"] - times["killed"], 1))
    print("gpu node kill:", json.dumps(report))
    out = os.environ.get("SERVE_APP_RESULTS_DIR")
    if out:
        with open(os.path.join(out, "multinode_gpu_node_kill.json"), "w") as f:
            json.dump(report, f, indent=2)
    during = [a for a in load.answers if times["killed"] <= a.started <= times["moved"]]
    if moved < CLASSIFIERS:  # the survivor had classifiers of its own: they served meanwhile
        assert any(a.status == 200 for a in during), "nothing was served during the move"
    assert not report["dropped"], report  # every failure was an HTTP answer, never a hang
    assert all(a.json_body for a in load.answers if a.status != 200), report
    after = [a for a in load.answers if a.started > times["moved"]]
    assert after and all(a.status == 200 for a in after), report


def test_four_quarter_gpu_classifiers_fill_the_survivors_gpu_and_a_fifth_waits(cluster):
    """After the kill above: one GPU node left, four classifiers on it. A fifth, asked for with
    the classifier's ray_actor_options exactly as gpu.yaml writes them, stays STARTING."""
    _, nodes, config = cluster
    classifier = configfile.deployment_options(config["applications"][0], "Classifier")
    assert classifier["ray_actor_options"]["num_gpus"] == 0.25
    assert ray.cluster_resources()["GPU"] == 1 and ray.available_resources().get("GPU", 0) == 0
    five = copy.deepcopy(config)
    configfile.deployment_options(five["applications"][0], "Classifier")["num_replicas"] = \
        CLASSIFIERS + 1
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(five),
                                                   _blocking=False)

    def states() -> dict:
        status = serve.status().applications.get("serve_app")
        replicas = status.deployments["Classifier"].replica_states if status else {}
        return {str(getattr(k, "value", k)): v for k, v in replicas.items()}
    wait_for(lambda: sum(states().values()) == CLASSIFIERS + 1, 60, "a fifth classifier asked for")
    time.sleep(3)  # the fifth has had time to start, if it could
    now = states()
    assert now.get("RUNNING") == CLASSIFIERS and now.get("STARTING") == 1, now
    assert ray.available_resources().get("GPU", 0) == 0
