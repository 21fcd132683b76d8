"""The simulated accelerator behind the real graph ("/sim" on the shared cluster:
configs/autoscale-sim.yaml's application, one replica each): it holds each batch for at least
its profile's service time, answers like a classifier, says it is simulated, and its replica is
a light process without torch. (How closely the live service time follows the profile is a
measurement: the simulator's validation in load_tests/RESULTS.md, not a test's.)"""

import time

import pytest

from load_tests.processes import memory_mib, replica_pids
from serve_app import simulated
from serve_app.config import SimulatedModelConfig
from tests.conftest import encode
from tests.integration.conftest import SIM_PROFILE

pytestmark = pytest.mark.integration

def _infer_pixels(client, app: str, n: int) -> float:
    """Seconds for one V2 infer of ``n`` ready crops: one classifier call, so one batch (the
    images of a /v1 batch request leave the ingress one call each with this config's
    dispatch.max_batch_size 1, and may reach the replica in separate batches)."""
    crop = SIM_PROFILE["crop_size"]
    body = {"inputs": [{"name": "pixels", "shape": [n, 3, crop, crop], "datatype": "UINT8",
                        "data": [7] * (n * 3 * crop * crop)}]}
    started = time.perf_counter()
    response = client.post(f"/{app}/v2/models/simulated/infer", json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return elapsed


def test_models_say_simulated_with_the_profile(client):
    model = client.get("/sim/v1/models").json()["models"][0]
    assert model["weights_source"] == "simulated"
    assert model["simulated"]["base_ms"] == SIM_PROFILE["base_ms"]
    assert model["simulated"]["per_image_ms"] == SIM_PROFILE["per_image_ms"]
    assert model["input_size"] == [3, 64, 64] and model["num_classes"] == 1000


def test_answers_are_well_formed_and_stable_per_image(client, photos):
    cat, coffee = encode(photos["chelsea"]), encode(photos["coffee"])

    def top(body: bytes) -> list[dict]:
        response = client.post("/sim/v1/classify", content=body, params={"top_k": 3},
                               headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        return response.json()["predictions"]

    first = top(cat)
    assert len(first) == 3 and len({p["class_id"] for p in first}) == 3
    assert all(p["label"] == f"simulated_{p['class_id']}" for p in first)
    scores = [p["score"] for p in first]
    assert scores == sorted(scores, reverse=True) and sum(scores) < 1
    assert top(cat) == first  # the same image, the same answer
    assert top(coffee) != first


def test_each_batch_is_held_for_at_least_its_service_time(client):
    """One V2 infer of n crops is one batch: it cannot answer sooner than the profile's
    service time for n (an upper bound would time the machine, not the simulator)."""
    profile = SimulatedModelConfig.model_validate(SIM_PROFILE)
    for n in (1, 4, 8):
        elapsed = _infer_pixels(client, app="sim", n=n)
        assert elapsed >= simulated.service_time_s(profile, n), (n, elapsed)


def test_the_replica_is_light(service):
    """No torch in the simulated classifier's process (its preprocessor decodes for real)."""
    pids = [p for p, d in replica_pids(service.proc.pid, "sim").items() if d == "Classifier"]
    assert len(pids) == 1, replica_pids(service.proc.pid, "sim")
    with open(f"/proc/{pids[0]}/maps") as f:
        maps = f.read()
    assert "libtorch" not in maps
    preprocessors = [p for p, d in replica_pids(service.proc.pid, "sim").items()
                     if d == "Preprocessor"]
    light, heavy = memory_mib(pids)[pids[0]], memory_mib(preprocessors)[preprocessors[0]]
    assert light < heavy, (light, heavy)
