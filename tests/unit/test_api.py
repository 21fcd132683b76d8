"""The ingress's routers (serve_app/api/) over a real Gateway whose deployment handles are
fakes: routing by model, the two protocols' error shapes, row errors, readiness. No Ray."""

import base64

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from serve_app import api, topology
from serve_app.config import parse_app_config
from serve_app.crops import Crops
from serve_app.errors import InvalidImage
from serve_app.gateway import Gateway, ModelHandles

LITE0, LITE2 = "efficientnet_lite0", "efficientnet_lite2"


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


def _predictions(first: int, k: int) -> list[dict]:
    return [{"label": f"c{(first + j) % 1000}", "class_id": (first + j) % 1000,
             "score": 1 / (j + 2)} for j in range(k)]


class FakeClassifier:
    """Top class = the image's byte length (or pixel sum); b"bad..." fails as a real bad
    image does; ``calls`` records what came in."""

    def __init__(self, ready: bool = True):
        self.calls = []
        self.classify = _Remote(self._classify)
        self.ready = _Remote(self._ready)
        self.is_ready = ready

    def _classify(self, crops, top_ks, request_ids):
        self.calls.append((crops, top_ks, request_ids))
        if isinstance(crops, Crops):
            return [_predictions(int(p.sum()) % 1000, k) for p, k in zip(crops.pixels, top_ks)]
        return [InvalidImage("bad image") if d.startswith(b"bad") else _predictions(len(d), k)
                for d, k in zip(crops, top_ks)]

    def _ready(self):
        if not self.is_ready:
            raise RuntimeError("replica down")
        return True


class Resolving(FakeClassifier):
    """Awaits the preprocessor's response before classifying, as Ray's router resolves a
    DeploymentResponse argument (so a held preprocessor call holds the classifier call)."""

    def __init__(self):
        super().__init__()
        self.classify = self

    def remote(self, crops, top_ks, request_ids):
        async def call():
            return self._classify(await crops, top_ks, request_ids)
        return call()


class FakePreprocessor:
    deployment_name = "Preprocessor"

    def remote(self, images, request_ids):  # hands the bytes on, as the DeploymentResponse would
        if not images:  # the availability probe's empty call, which is awaited
            async def empty():
                return images
            return empty()
        return images


class FakeMetrics:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture
def classifiers():
    return {LITE0: FakeClassifier(), LITE2: FakeClassifier()}


@pytest.fixture
def client(classifiers):
    settings = parse_app_config({"models": [{"name": LITE0}, {"name": LITE2}],
                                 "max_body_bytes": 200_000, "max_batch_files": 3})
    routes = topology.plan(settings)
    gw = Gateway({r.name: ModelHandles(r.info.as_dict(), FakePreprocessor(), classifiers[r.name],
                                       r.classifier) for r in routes}, settings, FakeMetrics())
    with TestClient(api.build_app(gw), raise_server_exceptions=False) as c:
        yield c


def _one_model_gateway(args: dict, preprocessor, classifier) -> Gateway:
    """A Gateway over one model (the default), with these ``args`` and fake handles."""
    settings = parse_app_config(args)
    route, = topology.plan(settings)
    return Gateway({route.name: ModelHandles(route.info.as_dict(), preprocessor, classifier,
                                             route.classifier)}, settings, FakeMetrics())


def _post(client, path, body, **params):
    return client.post(path, content=body, headers={"Content-Type": "image/jpeg"}, params=params)


def test_v1_routes_by_model_and_defaults_to_the_first(client, classifiers):
    default = _post(client, "/v1/classify", b"12345")
    assert default.json()["model"] == LITE0 and default.json()["predictions"][0]["class_id"] == 5
    named = _post(client, f"/v1/models/{LITE2}/classify", b"123", top_k=2)
    assert named.json()["model"] == LITE2 and len(named.json()["predictions"]) == 2
    assert len(classifiers[LITE0].calls) == 1 and len(classifiers[LITE2].calls) == 1
    listed = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["default"]) for m in listed] == [(LITE0, True), (LITE2, False)]
    assert client.get(f"/v1/models/{LITE2}").json()["input_size"] == [3, 260, 260]
    batch = client.post(f"/v1/models/{LITE2}/classify/batch",
                        files=[("files", ("a.jpg", b"1234", "image/jpeg")),
                               ("files", ("b.jpg", b"bad", "image/jpeg"))]).json()
    assert batch["model"] == LITE2 and batch["results"][1]["error"]["code"] == "invalid_image"


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/classify/batch"])
def test_a_malformed_multipart_body_is_the_same_400_on_every_route(client, path):
    r = client.post(path, content=b"--x\r\n",  # no boundary parameter: Starlette refuses it
                    headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request", r.text


def test_too_many_files_is_a_400_naming_the_limit(client):
    files = [("files", (f"{i}.jpg", b"1234", "image/jpeg")) for i in range(4)]
    r = client.post("/v1/classify/batch", files=files)
    assert r.status_code == 400 and "at most 3 files" in r.json()["error"]["message"], r.text
    r = client.post("/v1/classify", files=[("file", f) for _, f in files[:2]])
    assert r.status_code == 400 and "at most 1 file " in r.json()["error"]["message"], r.text


def test_unknown_model_is_404_in_each_protocols_shape(client, classifiers):
    v1 = _post(client, "/v1/models/nope/classify", b"123")
    assert v1.status_code == 404
    assert v1.json()["error"]["code"] == "model_not_found"
    assert LITE0 in v1.json()["error"]["message"] and LITE2 in v1.json()["error"]["message"]
    v2 = client.post("/v2/models/nope/infer", json={"inputs": []})
    assert v2.status_code == 404 and set(v2.json()) == {"error"} and LITE2 in v2.json()["error"]
    assert not classifiers[LITE0].calls and not classifiers[LITE2].calls
    assert client.get("/v2/no/such/route").json() == {"error": "Not Found"}
    assert client.get("/v9/no/such/route").json()["error"]["code"] == "not_found"


def test_v2_images_go_through_the_same_grouping_queue(client, classifiers):
    images = triton.InferInput("images", [2], "BYTES")
    images.set_data_from_numpy(np.array([b"abcd", b"abcdef"], dtype=np.object_))
    body, size = triton.InferenceServerClient.generate_request_body(
        [images], outputs=[triton.InferRequestedOutput("class_ids", class_count=3)])
    response = client.post(f"/v2/models/{LITE2}/infer", content=body,
                           headers={"Inference-Header-Content-Length": str(size)})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    result = triton.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers["Inference-Header-Content-Length"]))
    assert [row[0].split(b":")[1] for row in result.as_numpy("class_ids")] == [b"4", b"6"]
    calls = classifiers[LITE2].calls  # bytes: the preprocessor's path, in one or two groups
    assert not any(isinstance(crops, Crops) for crops, _, _ in calls)
    assert sorted(d for crops, _, _ in calls for d in crops) == [b"abcd", b"abcdef"]
    assert {k for _, top_ks, _ in calls for k in top_ks} == {5}  # max(top_k 5, class_count 3)


def test_v2_pixels_go_straight_to_the_classifier(client, classifiers):
    pixels = np.ones((1, 3, 224, 224), np.uint8)
    request = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 224, 224],
                           "parameters": {"binary_data_size": pixels.size}}],
               "outputs": [{"name": "class_ids"}], "parameters": {"top_k": 2}}
    import orjson

    header = orjson.dumps(request)
    response = client.post(f"/v2/models/{LITE0}/infer", content=header + pixels.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [(3 * 224 * 224) % 1000,
                                                     (3 * 224 * 224 + 1) % 1000]
    crops, top_ks, _ = classifiers[LITE0].calls[0]
    assert isinstance(crops, Crops) and crops.pixels.shape == (1, 3, 224, 224) and top_ks == [2]


def test_v2_errors(client):
    row = client.post(f"/v2/models/{LITE0}/infer", json={"inputs": [{
        "name": "images", "datatype": "BYTES", "shape": [2],
        "data": [base64.b64encode(b"good").decode(), base64.b64encode(b"bad").decode()]}]})
    assert row.status_code == 400 and row.json() == {"error": "row 1: bad image"}
    big = client.post(f"/v2/models/{LITE0}/infer", content=b" " * 200_001)
    assert big.status_code == 413 and set(big.json()) == {"error"}
    rows = client.post(f"/v2/models/{LITE0}/infer", json={"inputs": [{
        "name": "images", "datatype": "BYTES", "shape": [4], "data": ["YQ=="] * 4}]})
    assert rows.status_code == 413 and "at most 3" in rows.json()["error"]
    gzip = client.post(f"/v2/models/{LITE0}/infer", content=b"x",
                       headers={"Content-Encoding": "gzip"})
    assert gzip.status_code == 415 and "Content-Encoding gzip" in gzip.json()["error"]
    assert client.get(f"/v2/models/{LITE0}/versions/3/ready").status_code == 404


def test_readiness_per_model_and_overall(client, classifiers):
    assert client.get("/readyz").json()["models"] == [LITE0, LITE2]
    assert client.get("/v2/health/ready").json() == {"ready": True}
    classifiers[LITE2].is_ready = False
    assert client.get(f"/v2/models/{LITE0}/ready").status_code == 200
    down = client.get(f"/v2/models/{LITE2}/ready")
    assert down.status_code == 503 and LITE2 in down.json()["error"]
    assert client.get("/v2/health/ready").status_code == 503
    readyz = client.get("/readyz")
    assert readyz.status_code == 503 and readyz.json()["error"]["code"] == "not_ready"
    assert client.get("/v2/health/live").json() == {"live": True}


def test_a_full_queue_is_503_overloaded_with_retry_after_in_both_protocols():
    """One call in flight (blocked), one image queued: the next request is refused at once."""
    import asyncio

    import httpx

    class Blocking(FakeClassifier):
        def __init__(self):
            super().__init__()
            self.release = asyncio.Event()
            self.classify = self

        def remote(self, crops, top_ks, request_ids):
            async def call():
                await self.release.wait()
                return self._classify(crops, top_ks, request_ids)
            return call()

    async def scenario():
        settings = parse_app_config({"dispatch": {"max_batch_size": 1, "max_in_flight": 1,
                                                  "max_queued": 1, "retry_after_s": 2.5}})
        route, = topology.plan(settings)
        blocking = Blocking()
        gw = Gateway({route.name: ModelHandles(route.info.as_dict(), FakePreprocessor(),
                                               blocking, route.classifier)}, settings,
                     FakeMetrics())
        transport = httpx.ASGITransport(app=api.build_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            post = lambda: c.post("/v1/classify", content=b"1234",  # noqa: E731
                                  headers={"Content-Type": "image/jpeg"})
            held = [asyncio.ensure_future(post()) for _ in range(2)]
            for _ in range(20):
                await asyncio.sleep(0.01)
            refused = await post()
            v2 = await c.post(f"/v2/models/{LITE0}/infer", json={"inputs": [{
                "name": "images", "datatype": "BYTES", "shape": [1], "data": ["YQ=="]}]})
            assert gw.autoscaling_stats()["images_queued"] == 1
            # Every image asked for counts towards the rate the policy sizes for, refused too.
            assert gw._models[route.name].offered.count == 4
            blocking.release.set()
            served = await asyncio.gather(*held)
        return refused, v2, served

    refused, v2, served = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "overloaded"
    assert v2.status_code == 503 and set(v2.json()) == {"error"}
    assert v2.headers["retry-after"] == "3"
    assert [r.status_code for r in served] == [200, 200]



def _app_with_auth(monkeypatch, token: str | None):
    if token is None:
        monkeypatch.delenv("SERVE_APP_API_TOKEN", raising=False)
    else:
        monkeypatch.setenv("SERVE_APP_API_TOKEN", token)
    settings = parse_app_config({"auth": {}})
    route, = topology.plan(settings)
    gw = Gateway({route.name: ModelHandles(route.info.as_dict(), FakePreprocessor(),
                                           FakeClassifier(), route.classifier)}, settings,
                 FakeMetrics())
    return api.build_app(gw)


def test_bearer_token_auth(monkeypatch):
    with TestClient(_app_with_auth(monkeypatch, "s3cret-token")) as c:
        missing = _post(c, "/v1/classify", b"1234")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = c.post("/v1/classify", content=b"1234", headers={
            "Content-Type": "image/jpeg", "Authorization": "Bearer s3cret-tokeN"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["message"]
        v2 = c.get(f"/v2/models/{LITE0}")
        assert v2.status_code == 401 and set(v2.json()) == {"error"}
        right = c.post("/v1/classify", content=b"1234", headers={
            "Content-Type": "image/jpeg", "Authorization": "Bearer s3cret-token"})
        assert right.status_code == 200
        for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert c.get(probe).status_code == 200, probe  # open for probes
        assert c.get("/v1/models").status_code == 401


def test_auth_without_its_token_fails_at_start_naming_the_setting(monkeypatch):
    with pytest.raises(RuntimeError, match="args.auth.token_env names 'SERVE_APP_API_TOKEN'"):
        _app_with_auth(monkeypatch, None)


@pytest.mark.parametrize("listed", [{"Preprocessor": 1, "Classifier": 0}, {}],
                         ids=["none-running", "app-rebuilding"])
def test_a_lost_replica_is_a_retryable_503_and_the_model_refuses_at_once_until_one_answers(
        monkeypatch, listed):
    """The classifier's replica dies mid-call (Ray's ActorDiedError): that request gets 503
    replica_lost; the probe finds no replica and the controller counts no running classifier,
    so the next requests get 503 not_ready without reaching the classifier; once ``ready``
    answers again, requests are served. While a new config builds, the controller lists no
    deployment at all (Ray clears its targets): no count is no outage, and requests wait."""
    import asyncio

    import httpx
    from ray.exceptions import ActorDiedError

    from serve_app import gateway

    monkeypatch.setattr(gateway, "running_replicas",
                        lambda names: {n: listed[n] for n in names if n in listed})

    class Dying(FakeClassifier):
        def __init__(self):
            super().__init__()
            self.dead = True
            self.classify = _Remote(self._maybe_die)
            self.ready = self

        def _maybe_die(self, *args):
            if self.dead:
                raise ActorDiedError()
            return self._classify(*args)

        def remote(self):  # classifier.ready.remote(): hangs while no replica is up
            async def call():
                while self.dead:
                    await asyncio.sleep(0.01)
                return True
            return call()

    async def scenario():
        dying = Dying()
        gw = _one_model_gateway({"readiness_timeout_s": 0.05, "replica_probe_interval_s": 0.02},
                                FakePreprocessor(), dying)
        transport = httpx.ASGITransport(app=api.build_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            post = lambda: c.post("/v1/classify", content=b"1234",  # noqa: E731
                                  headers={"Content-Type": "image/jpeg"})
            lost = await post()
            await asyncio.sleep(0.2)
            calls = len(dying.calls)
            refused = await post()
            v2 = await c.post(f"/v2/models/{LITE0}/infer", json={"inputs": [{
                "name": "images", "datatype": "BYTES", "shape": [1], "data": ["YQ=="]}]})
            untouched = len(dying.calls) == calls
            dying.dead = False
            await asyncio.sleep(0.2)
            served = await post()
        return lost, refused, v2, untouched, served

    lost, refused, v2, untouched, served = asyncio.run(scenario())
    assert lost.status_code == 503 and lost.json()["error"]["code"] == "replica_lost"
    assert lost.headers["retry-after"] == "1"
    if listed:
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert refused.headers["retry-after"] == "1" and untouched
        assert v2.status_code == 503 and set(v2.json()) == {"error"}
    else:  # not refused: it reached the classifier, whose replica was still "dead"
        assert refused.json()["error"]["code"] == "replica_lost"
    assert served.status_code == 200


@pytest.mark.parametrize("running", [0, 1], ids=["none-running", "rollout"])
def test_a_call_held_for_a_missing_replica_is_noticed_and_refused_with_not_ready(monkeypatch,
                                                                                running):
    """No replica of the preprocessor answers (Ray holds its calls for the replacement, so no
    call fails): a call with no answer after stall_probe_after_s makes the ingress probe; the
    probe hangs too. If the controller counts no running replica, the held request and the
    next ones get 503 not_ready (the held one is cancelled); if it still counts one (a rollout
    swapping replicas), the request only waits, and is served when the hold ends."""
    import asyncio
    import time

    import httpx

    from serve_app import gateway

    asked = []

    def running_replicas(names):
        asked.append(names)
        return {name: running for name in names}

    monkeypatch.setattr(gateway, "running_replicas", running_replicas)

    class Gone(FakePreprocessor):
        deployment_name = "Preprocessor"

        def __init__(self):
            self.gone = False
            self.cancelled = 0

        def remote(self, images, request_ids):
            async def held():
                try:
                    while self.gone:
                        await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    self.cancelled += bool(images)  # a request's call, not the probe's
                    raise
                return images
            return held()

    async def scenario():
        pre = Gone()
        gw = _one_model_gateway({"readiness_timeout_s": 0.1, "replica_probe_interval_s": 0.02,
                                 "stall_probe_after_s": 0.2}, pre, Resolving())
        transport = httpx.ASGITransport(app=api.build_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            post = lambda: c.post("/v1/classify", content=b"1234",  # noqa: E731
                                  headers={"Content-Type": "image/jpeg"})
            assert (await post()).status_code == 200  # the model has answered here
            pre.gone = True
            if running:  # the hold ends by itself after 0.6 s
                asyncio.get_running_loop().call_later(0.6, setattr, pre, "gone", False)
            started = time.monotonic()
            held = await post()
            held_s = time.monotonic() - started
            after = await post()
            pre.gone = False
            await asyncio.sleep(0.2)
            served = await post()
        return held, held_s, after, served, pre.cancelled

    held, held_s, after, served, cancelled = asyncio.run(scenario())
    assert asked and asked[0][0] == "Preprocessor"  # the controller was asked about both
    if running:
        assert held.status_code == 200 and held_s >= 0.5 and cancelled == 0, held.text
        assert after.status_code == 200
    else:
        assert held.status_code == 503 and held.json()["error"]["code"] == "not_ready", held.text
        assert 0.2 <= held_s < 1.0 and cancelled >= 1  # stall + probe timeout, not 60 s
        assert after.status_code == 503 and after.json()["error"]["code"] == "not_ready"
    assert served.status_code == 200, served.text


def test_a_slow_call_with_replicas_up_is_only_waited_for():
    """A call slower than stall_probe_after_s while the probe answers (a busy model, not a
    missing one) is served, and nothing is refused."""
    import asyncio

    import httpx

    class Slow(FakeClassifier):
        def __init__(self):
            super().__init__()
            self.classify = self

        def remote(self, crops, top_ks, request_ids):
            async def call():
                await asyncio.sleep(0.5)
                return self._classify(crops, top_ks, request_ids)
            return call()

    async def scenario():
        gw = _one_model_gateway({"readiness_timeout_s": 0.1, "stall_probe_after_s": 0.1},
                                FakePreprocessor(), Slow())
        transport = httpx.ASGITransport(app=api.build_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/v1/classify", content=b"1234",
                                                 headers={"Content-Type": "image/jpeg"})
                                          for _ in range(3)))

    assert [r.status_code for r in asyncio.run(scenario())] == [200, 200, 200]


def test_a_new_ingress_learns_the_replicas_first_and_its_first_slow_calls_are_only_waited_for():
    """Gateway.warm (the ingress's constructor) probes every model under readiness_timeout_s,
    and returns in time even when a model is not up; until the model has answered here, a slow
    call (handles still learning their replicas) never makes the ingress refuse."""
    import asyncio
    import time

    import httpx

    class Late(FakePreprocessor):  # no replica for the first 0.6 s
        def __init__(self):
            self.up_at = time.monotonic() + 0.6

        def remote(self, images, request_ids):
            async def held():
                while time.monotonic() < self.up_at:
                    await asyncio.sleep(0.01)
                return images
            return held()

    async def scenario():
        gw = _one_model_gateway({"readiness_timeout_s": 0.1, "replica_probe_interval_s": 0.02,
                                 "stall_probe_after_s": 0.1}, Late(), Resolving())
        started = time.monotonic()
        await gw.warm()
        warm_s = time.monotonic() - started
        transport = httpx.ASGITransport(app=api.build_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = await c.post("/v1/classify", content=b"1234",
                                 headers={"Content-Type": "image/jpeg"})
        return warm_s, first

    warm_s, first = asyncio.run(scenario())
    assert warm_s < 0.5  # bounded by readiness_timeout_s, not by the model
    assert first.status_code == 200, first.text  # held ~0.5 s past stall_probe_after_s, served
