"""The simulated accelerator's profile, answers and configuration (serve_app/simulated.py), and
that its replica module never imports torch."""

import json
import subprocess
import sys

import pytest

from serve_app import simulated
from serve_app.config import ConfigError, SimulatedModelConfig, parse_app_config

LINEAR = SimulatedModelConfig(base_ms=20, per_image_ms=5)
TABLE = SimulatedModelConfig(service_ms={1: 10, 4: 16, 16: 40})


@pytest.mark.parametrize("n, ms", [(1, 25), (8, 60), (32, 180)])
def test_linear_profile(n, ms):
    assert simulated.service_time_s(LINEAR, n) == pytest.approx(ms / 1000)


@pytest.mark.parametrize("n, ms", [
    (1, 10), (4, 16), (16, 40),  # the table's own points
    (2, 12), (10, 28),           # between them
    (32, 72),                    # beyond the last, along the last two (2 ms per image)
])
def test_table_profile_interpolates_and_extends(n, ms):
    assert simulated.service_time_s(TABLE, n) == pytest.approx(ms / 1000)


def test_a_table_of_one_point_is_constant_and_times_never_go_negative():
    assert simulated.service_time_s(SimulatedModelConfig(service_ms={8: 30}), 1) == 0.030
    falling = SimulatedModelConfig(service_ms={2: 10, 4: 2})  # extended below 0 at 8
    assert simulated.service_time_s(falling, 8) == 0.0
    with pytest.raises(ValueError):
        simulated.service_time_s(LINEAR, 0)


def test_profiles_from_the_command_line(tmp_path):
    assert simulated.load_profile("20+5n") == LINEAR
    table = tmp_path / "gpu.json"
    table.write_text(json.dumps({"1": 10, "4": 16, "16": 40}))
    assert simulated.load_profile(str(table)).service_ms == TABLE.service_ms
    mapping = tmp_path / "profile.json"
    mapping.write_text(json.dumps({"base_ms": 1, "per_image_ms": 2, "start_s": 3}))
    assert simulated.load_profile(str(mapping)).start_s == 3


def test_answers_are_well_formed_distinct_and_stable():
    labels = simulated.categories(10)
    first = simulated.top_k(b"cat", 3, labels)
    assert [set(p) for p in first] == [{"label", "class_id", "score"}] * 3
    assert len({p["class_id"] for p in first}) == 3
    assert all(labels[p["class_id"]] == p["label"] for p in first)
    assert [p["score"] for p in first] == [0.5, 0.25, 0.125]
    assert simulated.top_k(b"cat", 3, labels) == first
    assert simulated.top_k(b"cat", 3, labels, seed=1) != first
    assert len(simulated.top_k(b"cat", 50, labels)) == 10  # k bounded by the classes


def _model_error(model: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_app_config({"model": model})
    return str(err.value)


def test_config_errors_name_the_key():
    assert "args.model.simulated: name: simulated needs its latency profile" in _model_error(
        {"name": "simulated"})
    assert "args.model.simulated: only for name: simulated" in _model_error(
        {"name": "resnet18", "weights": None, "simulated": {"base_ms": 1, "per_image_ms": 1}})
    assert "args.model.compile: a simulated model has no network" in _model_error(
        {"name": "simulated", "compile": True, "simulated": {"base_ms": 1, "per_image_ms": 1}})
    assert "args.model.simulated.service_ms: give either" in _model_error(
        {"name": "simulated", "simulated": {"base_ms": 1, "per_image_ms": 1,
                                            "service_ms": {1: 2}}})
    assert "args.model.simulated.base_ms: a simulated model needs" in _model_error(
        {"name": "simulated", "simulated": {"base_ms": 1}})
    assert "args.model.simulated.per_image_ms" in _model_error(
        {"name": "simulated", "simulated": {"base_ms": 1, "per_image_ms": -1}})


def test_described_as_simulated_without_torchvision():
    from serve_app import topology

    settings = parse_app_config({"model": {"name": "simulated", "served_name": "fake",
                                           "simulated": {"base_ms": 5, "per_image_ms": 1,
                                                         "crop_size": 32, "num_classes": 7}}})
    info = topology.plan(settings)[0].info.as_dict()
    assert info["name"] == "fake" and info["weights_source"] == "simulated"
    assert info["simulated"] == {"base_ms": 5.0, "per_image_ms": 1.0, "start_s": 15.0}
    assert info["input_size"] == [3, 32, 32] and info["num_classes"] == 7


def test_the_replica_module_imports_no_torch():
    """A simulated classifier replica is light: its module, the config it is bound with and
    the crops it receives import neither torch nor PIL."""
    code = ("import pickle, sys\n"
            "import serve_app.simulated_classifier\n"
            "from serve_app.config import parse_app_config\n"
            "from serve_app.crops import Crops\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'PIL') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


class _ReplicaContext:
    """What @serve.batch and ``stats`` ask of ``serve.get_replica_context()``."""

    class _DeploymentConfig:
        max_ongoing_requests = 32

    class _ReplicaId:
        unique_id = "r0"

    _deployment_config = _DeploymentConfig()
    replica_id = _ReplicaId()


def _run_one_group() -> tuple:
    """In a forked child (see below): one group through the replica class, without Ray."""
    import asyncio
    import time

    import numpy as np
    from ray import serve

    from serve_app.crops import Crops
    from serve_app.simulated_classifier import SimulatedClassifier

    serve.get_replica_context = lambda: _ReplicaContext()
    model = parse_app_config({"model": {"name": "simulated", "simulated": {
        "base_ms": 50, "per_image_ms": 10, "start_s": 0}}}).model
    replica = SimulatedClassifier.func_or_class(model)
    replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0})
    pixels = np.random.default_rng(0).integers(0, 255, (3, 3, 64, 64), dtype=np.uint8)

    async def run():
        started = time.perf_counter()
        answers = await replica.classify(
            Crops(pixels, [None, ValueError("not an image"), None, None]), [2] * 4)
        return time.perf_counter() - started, answers, await replica.record_autoscaling_stats()

    return (*asyncio.run(run()), replica.stats())


def test_a_group_is_one_batch_held_for_its_service_time():
    """The replica class itself, without Ray: a group of 4 with one failed decode is one batch
    of 3, held at least t(3) = 80 ms; the failure keeps its place; the counters the autoscaling
    policy reads (serve_app/classifier_base.py, shared with the real classifier) add up.

    In a forked child: running it leaves state in the class's ``@serve.batch`` queue (and
    ``reconfigure`` sets its batch size), after which Ray can no longer serialize the class."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        elapsed, answers, stats, counters = pool.submit(_run_one_group).result(timeout=60)
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "not an image"
    assert [len(a) for a in (answers[0], answers[2], answers[3])] == [2, 2, 2]
    assert 0.080 <= elapsed < 2.0
    assert stats["batch_fill"] == 3 and stats["images_in_flight"] == 0
    assert 0.080 <= stats["batch_latency_s"] < 2.0
    assert stats["max_batch_size"] == 8
    assert (counters["calls"], counters["batches"], counters["images"]) == (1, 1, 3)
    assert counters["simulated"] is True and "first_batch_at" in counters


def test_what_the_replica_is_bound_with_imports_no_torch():
    """The arguments the app binds to the simulated classifier, unpickled in a fresh process,
    import no torch (a ModelInfo among them once did: serve_app/models.py imports it)."""
    import pickle

    from serve_app.app import build_app

    app = build_app({"model": {"name": "simulated", "simulated": {"base_ms": 1,
                                                                  "per_image_ms": 1}}})
    handles = app._bound_deployment.init_args[0]["simulated"]
    bound = handles.classifier._bound_deployment
    assert bound.func_or_class.__name__ == "SimulatedClassifier"
    code = ("import pickle, sys\n"
            "pickle.loads(sys.stdin.buffer.read())\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'PIL') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         input=pickle.dumps((bound.init_args, bound.init_kwargs))).stdout
    assert out.decode().strip() == "[]"
