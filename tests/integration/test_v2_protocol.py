"""The Open Inference Protocol (KServe V2 / Triton HTTP), spoken by clients nobody here wrote:
``tritonclient[http]`` from PyPI and a raw HTTP call following the KServe spec's JSON example.
Each answer is checked against /v1/classify on the same photo, through the same graph."""

import base64

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serve_app import imaging, models
from serve_app.config import ModelConfig
from tests.conftest import encode

pytestmark = pytest.mark.integration

MODEL = "efficientnet_lite0"
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def triton_client(service):
    client = triton.InferenceServerClient(url=service.url.removeprefix("http://"),
                                          network_timeout=60.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def jpegs(photos) -> list[bytes]:
    return [encode(photos["chelsea"]), encode(photos["coffee"])]


@pytest.fixture(scope="module")
def v1_answers(service, jpegs) -> list[list[dict]]:
    """/v1/classify's top-5 for each photo: what every V2 answer must agree with."""
    with httpx.Client(base_url=service.url, timeout=60) as c:
        return [c.post("/v1/classify", content=j, headers={"Content-Type": "image/jpeg"},
                       params={"top_k": 5}).json()["predictions"] for j in jpegs]


def _agree(scores, labels, class_ids, v1_rows):
    """V2 rows equal /v1's top-k: same labels and ids, scores within float noise (the two
    requests may meet different batch sizes)."""
    for row, expected in enumerate(v1_rows):
        k = len(scores[row])
        assert [lab.decode() if isinstance(lab, bytes) else lab for lab in labels[row]] == \
            [p["label"] for p in expected[:k]]
        assert list(class_ids[row]) == [p["class_id"] for p in expected[:k]]
        np.testing.assert_allclose(scores[row], [p["score"] for p in expected[:k]], atol=1e-4)


def test_server_and_model_metadata(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert triton_client.is_model_ready(MODEL, model_version="1")
    assert not triton_client.is_model_ready("no_such_model")
    server = triton_client.get_server_metadata()
    assert server["name"] == "serve_app" and "binary_tensor_data" in server["extensions"]
    meta = triton_client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"images": "BYTES",
                                                                   "pixels": "UINT8"}
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "scores": "FP32", "labels": "BYTES", "class_ids": "INT64"}
    with pytest.raises(InferenceServerException, match="no version '7'"):
        triton_client.get_model_metadata(MODEL, model_version="7")


def test_binary_bytes_in_binary_out_matches_v1(triton_client, jpegs, v1_answers):
    """What tritonclient sends by default: binary BYTES elements, binary outputs."""
    images = triton.InferInput("images", [2], "BYTES")
    images.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
    result = triton_client.infer(MODEL, [images], parameters={"top_k": 5})
    scores, labels = result.as_numpy("scores"), result.as_numpy("labels")
    assert scores.shape == (2, 5) and scores.dtype == np.float32
    assert labels[0][0].decode() in CAT_CLASSES and labels[1][0].decode() == "espresso"
    _agree(scores, labels, result.as_numpy("class_ids"), v1_answers)
    assert result.get_response()["model_name"] == MODEL


def test_json_in_json_out_matches_v1(triton_client, jpegs, v1_answers):
    """JSON all the way: images as base64 strings, outputs asked for as JSON data."""
    images = triton.InferInput("images", [2, 1], "BYTES")
    images.set_data_from_numpy(np.array([[base64.b64encode(j)] for j in jpegs], dtype=np.object_),
                               binary_data=False)
    outputs = [triton.InferRequestedOutput(name, binary_data=False)
               for name in ("scores", "labels", "class_ids")]
    result = triton_client.infer(MODEL, [images], outputs=outputs, parameters={"top_k": 3})
    response = result.get_response()
    assert all("data" in o for o in response["outputs"])  # no binary part came back
    _agree(result.as_numpy("scores"), result.as_numpy("labels"), result.as_numpy("class_ids"),
           v1_answers)


def test_classification_extension(triton_client, jpegs, v1_answers):
    images = triton.InferInput("images", [2], "BYTES")
    images.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
    result = triton_client.infer(MODEL, [images], outputs=[
        triton.InferRequestedOutput("scores", class_count=3)])
    rows = result.as_numpy("scores")
    assert rows.shape == (2, 3)
    for row, expected in zip(rows, v1_answers):
        parsed = [entry.decode().split(":", 2) for entry in row]
        assert [(int(i), label) for _, i, label in parsed] == [
            (p["class_id"], p["label"]) for p in expected[:3]]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed],
                                   [p["score"] for p in expected[:3]], atol=1e-4)


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_preprocessed_pixels_skip_the_preprocessor(triton_client, jpegs, v1_answers, datatype):
    """Crops made here the way the preprocessor makes them give /v1's answer."""
    spec = models.describe(ModelConfig()).transform
    crops = np.stack([imaging.preprocess(j, spec, 10**8).numpy() for j in jpegs])
    if datatype == "FP32":
        crops = crops.astype(np.float32) / 255
    pixels = triton.InferInput("pixels", list(crops.shape), datatype)
    pixels.set_data_from_numpy(crops)
    result = triton_client.infer(MODEL, [pixels], parameters={"top_k": 5})
    _agree(result.as_numpy("scores"), result.as_numpy("labels"), result.as_numpy("class_ids"),
           v1_answers)


def test_raw_json_request_as_in_the_kserve_spec(client, jpegs, v1_answers):
    """The spec's JSON example, with one image: no client library at all."""
    request = {"id": "42", "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(jpegs[1]).decode()]}],
               "outputs": [{"name": "labels"}, {"name": "scores"}]}
    response = client.post(f"/v2/models/{MODEL}/versions/1/infer", json=request)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == "1" and body["id"] == "42"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert list(outputs) == ["labels", "scores"]
    assert outputs["labels"]["shape"] == [1, 5] and outputs["labels"]["datatype"] == "BYTES"
    assert outputs["labels"]["data"] == [p["label"] for p in v1_answers[1]]


@pytest.mark.parametrize("request_body,status,fragment", [
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400,
     "must be BYTES"),
    ({"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                  "data": [0] * 3072}]}, 400, "[N, 3, 224, 224]"),
    ({"inputs": [{"name": "tensor", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, 400,
     "unknown input 'tensor'"),
    ({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                  "data": ["aGVsbG8="]}]}, 400, "says 2 images, the data holds 1"),
    ({"inputs": []}, 400, "exactly one input"),
])
def test_bad_tensors_get_v2_errors(client, request_body, status, fragment):
    response = client.post(f"/v2/models/{MODEL}/infer", json=request_body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and fragment in response.json()["error"]


def test_a_bad_row_fails_the_request_naming_it(client, jpegs):
    request = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                           "data": [base64.b64encode(jpegs[0]).decode(),
                                    base64.b64encode(b"not an image at all").decode()]}]}
    response = client.post(f"/v2/models/{MODEL}/infer", json=request)
    assert response.status_code == 400 and response.json()["error"].startswith("row 1: ")


def test_unknown_model_version_and_size_errors(client):
    missing = client.post("/v2/models/resnet9000/infer", json={"inputs": []})
    assert missing.status_code == 404 and MODEL in missing.json()["error"]
    version = client.get(f"/v2/models/{MODEL}/versions/2")
    assert version.status_code == 404 and "no version '2'" in version.json()["error"]
    big = client.post(f"/v2/models/{MODEL}/infer", content=b"{" + b" " * (11 << 20) + b"}",
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "limit" in big.json()["error"]
    garbage = client.post(f"/v2/models/{MODEL}/infer", content=b"\x00\x01",
                          headers={"Inference-Header-Content-Length": "2"})
    assert garbage.status_code == 400 and "not valid JSON" in garbage.json()["error"]
