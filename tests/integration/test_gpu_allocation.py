"""configs/gpu.yaml's fractional GPUs, proven without a GPU.

Ray schedules on logical resources: a cluster started with num_gpus=1 has one GPU to hand
out whether or not CUDA is present. With the classifier's ray_actor_options exactly as
gpu.yaml writes them, four replicas fit on that GPU and a fifth stays pending.
"""

import time

import pytest
import ray
from ray import serve
from ray.serve._private import api as serve_private_api
from ray.serve.schema import ServeDeploySchema

from serve_app import configfile
from serve_app.launch import free_port, prepare_config
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration


def _five_classifiers(config: dict) -> None:
    app = config["applications"][0]
    # Weights are not what is tested here (and resnet50's would need a download): resnet18 with
    # random weights loads fast. Resources and batching stay as gpu.yaml has them.
    app["args"]["model"] = {"name": "resnet18", "weights": None}
    app.pop("autoscaling_policy", None)
    for entry in app["deployments"]:
        entry.pop("autoscaling_config")
        entry["num_replicas"] = 5 if entry["name"] == "Classifier" else 1


def _classifier_states() -> dict:
    status = serve.status().applications.get("serve_app")
    if status is None or "Classifier" not in status.deployments:
        return {}
    return {str(k.value if hasattr(k, "value") else k): v
            for k, v in status.deployments["Classifier"].replica_states.items()}


def test_four_quarter_gpu_classifiers_share_one_gpu_and_a_fifth_waits():
    config = prepare_config(CONFIGS / "gpu.yaml", free_port(), _five_classifiers)
    classifier = configfile.deployment_options(config["applications"][0], "Classifier")
    assert classifier["ray_actor_options"]["num_gpus"] == 0.25

    ray.init(num_cpus=16, num_gpus=1, include_dashboard=False, namespace="serve")
    try:
        client = serve_private_api.serve_start(http_options=config["http_options"])
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        deadline = time.monotonic() + 240
        states = {}
        while time.monotonic() < deadline:
            states = _classifier_states()
            if states.get("RUNNING", 0) >= 4:
                break
            time.sleep(1)
        assert states.get("RUNNING") == 4, states
        time.sleep(5)  # the fifth has had time to start, if it could
        states = _classifier_states()
        assert states.get("RUNNING") == 4 and sum(states.values()) == 5, states
        # the fifth waits for a GPU share: it is starting, not running, and no GPU is left
        assert states.get("STARTING") == 1, states
        assert ray.available_resources().get("GPU", 0) == 0
        assert ray.cluster_resources()["GPU"] == 1
    finally:
        serve.shutdown()
        ray.shutdown()
