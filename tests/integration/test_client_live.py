"""serve_app.client against the live service: every input kind, batch, a named model, the
async client and the command line. (Retries against a stub server: tests/unit/test_client.py.)"""

import asyncio
import io
import json

import pytest
from PIL import Image

from serve_app.client import AsyncClient, Client, RequestRejected
from serve_app.client.cli import main as cli
from tests.conftest import encode

pytestmark = pytest.mark.integration

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def test_every_input_kind_gets_the_same_answer(service, photos, tmp_path):
    jpeg = encode(photos["coffee"])
    path = tmp_path / "coffee.jpg"
    path.write_bytes(jpeg)
    with Client(service.url, timeout=60) as client:
        assert client.ready()
        by_path = client.classify(path, top_k=3)
        assert by_path.top.label == "espresso" and len(by_path.predictions) == 3
        assert client.classify(str(path)).predictions[0] == by_path.top
        assert client.classify(jpeg).top == by_path.top
        assert client.classify(photos["coffee"]).top.label == "espresso"  # numpy, sent as PNG
        assert client.classify(Image.open(io.BytesIO(jpeg))).top.label == "espresso"
        assert client.classify(jpeg, request_id="client-test-1").request_id == "client-test-1"
        with pytest.raises(RequestRejected) as info:
            client.classify(b"not an image")
        assert info.value.status == 400 and info.value.code == "invalid_image"


def test_batch_and_a_named_model(service, photos):
    cat, coffee = encode(photos["chelsea"]), encode(photos["coffee"])
    with Client(service.url + "/multi", timeout=60) as client:
        batch = client.classify_batch([cat, b"junk", coffee], model="efficientnet_lite2")
        assert batch.model == "efficientnet_lite2"
        assert [item.ok for item in batch.results] == [True, False, True]
        assert batch.results[0].predictions[0].label in CAT_CLASSES
        assert batch.results[1].error.code == "invalid_image"
        assert [m["name"] for m in client.models()] == ["efficientnet_lite0", "efficientnet_lite2"]
        with pytest.raises(RequestRejected) as info:
            client.classify(coffee, model="resnet9000")
        assert info.value.status == 404 and info.value.code == "model_not_found"


def test_async_client(service, photos):
    async def run():
        async with AsyncClient(service.url, timeout=60) as client:
            return await asyncio.gather(*(client.classify(encode(photos[name]))
                                          for name in ("chelsea", "coffee")))

    cat, coffee = asyncio.run(run())
    assert cat.top.label in CAT_CLASSES and coffee.top.label == "espresso"


def test_command_line(service, photos, tmp_path, capsys):
    files = []
    for name in ("chelsea", "coffee"):
        files.append(tmp_path / f"{name}.jpg")
        files[-1].write_bytes(encode(photos[name]))
    assert cli([*map(str, files), "--url", service.url, "--top-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "espresso" in table and "coffee.jpg" in table and "chelsea.jpg" in table
    assert cli([str(files[1]), "--url", service.url, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    assert cli([str(files[1]), str(tmp_path / "junk.jpg"), "--url", service.url]) == 1
