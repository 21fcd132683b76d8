"""Compiled-model artifacts (serve_app/artifacts.py): built once, loaded without a compile,
never loaded when stale or corrupt, safe to build from several replicas at once. No Ray."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from serve_app import artifacts, compiling
from serve_app.artifacts import Artifact
from serve_app.classifier import Classifier, Predictor
from serve_app.config import ModelConfig
from serve_app.configfile import load

CPU = torch.device("cpu")
# The torchvision classifier Inductor compiles fastest here (~20 s; lite0 takes ~60 s).
SMALL = {"name": "squeezenet1_1", "weights": None, "compile": True}


def small(tmp: Path, **extra) -> ModelConfig:
    return ModelConfig(**SMALL, artifact_dir=str(tmp), **extra)


def batch(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n))


def fake_export(calls: list, delay_s: float = 0.0):
    """Stands in for export + AOTInductor where only the file handling is under test."""
    def export(cfg, device, threads, out: Path) -> None:
        calls.append(threading.get_ident())
        time.sleep(delay_s)
        out.write_bytes(b"compiled" * 1000)
    return export


@pytest.fixture(scope="module")
def swap(tmp_path_factory) -> dict:
    """The first start on a machine: a replica with no artifact serves the eager network at
    once, builds in a low-priority child process, then swaps the artifact in. The one real
    compile of this module (~20-45 s): the tests below load what it built."""
    cfg = small(tmp_path_factory.mktemp("artifacts"))
    before = torch.get_num_threads()
    clf = Classifier.func_or_class(cfg)
    try:
        seen = {"eager_first": not clf.predictor.compiled, "builder": clf._builder is not None}
        eager = clf.predictor.predict(batch(3))
        deadline = time.monotonic() + 240
        while not clf.predictor.compiled and time.monotonic() < deadline:
            time.sleep(0.5)
        seen["swapped"] = clf.predictor.compiled
        if seen["swapped"]:
            seen.update(returncode=clf._builder.returncode,
                        eager_dropped=clf.predictor.model is None,
                        same_scores=torch.allclose(clf.predictor.predict(batch(3)), eager,
                                                   atol=1e-5))
    finally:
        clf.__del__()
        torch.set_num_threads(before)
    return {"cfg": cfg, "seen": seen}


@pytest.fixture(scope="module")
def built(swap) -> ModelConfig:
    assert Artifact.of(swap["cfg"], CPU, 1).problem() is None, swap["seen"]
    return swap["cfg"]


@pytest.mark.slow
def test_a_compiled_predictor_loads_without_the_eager_network_and_matches_it(built):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compiled = Predictor(built, threads=1)
        eager = Predictor(built.model_copy(update={"compile": False}))
    finally:
        torch.set_num_threads(before)
    assert compiled.compiled and compiled.model is None  # nothing built but the package
    assert not eager.compiled
    for n in (1, 3, 8, artifacts.MAX_BATCH + 6):  # the last runs in two chunks
        assert torch.allclose(compiled.predict(batch(n)), eager.predict(batch(n)), atol=1e-5), n


@pytest.mark.slow
def test_a_corrupt_artifact_is_never_loaded_and_is_rebuilt(built, tmp_path, monkeypatch):
    cfg = built.model_copy(update={"artifact_dir": str(tmp_path)})
    source, artifact = Artifact.of(built, CPU, 1), Artifact.of(cfg, CPU, 1)
    shutil.copy(source.path, artifact.path)
    shutil.copy(source.meta_path, artifact.meta_path)
    assert artifact.problem() is None
    data = bytearray(artifact.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.path.write_bytes(bytes(data))
    assert artifact.problem().startswith("corrupt")
    assert artifact.load() is None
    assert not Predictor(cfg, threads=1).compiled  # serves eager instead
    calls: list = []
    monkeypatch.setattr(artifacts, "_export_and_compile", fake_export(calls))
    assert artifact.build(cfg, CPU) is True and len(calls) == 1
    assert artifact.problem() is None


def test_a_stale_artifact_is_never_loaded(tmp_path, monkeypatch):
    cfg = small(tmp_path)
    artifact = Artifact.of(cfg, CPU, 1)
    monkeypatch.setattr(artifacts, "_export_and_compile", fake_export([]))
    artifact.build(cfg, CPU)
    meta = json.loads(artifact.meta_path.read_text())
    meta["key"]["torch"] = "2.0.0"  # built by another torch
    artifact.meta_path.write_text(json.dumps(meta))
    assert artifact.problem().startswith("stale")
    assert artifact.load() is None
    assert artifact.build(cfg, CPU) is True and artifact.problem() is None


def test_concurrent_builders_build_once_and_readers_never_see_half_a_file(tmp_path, monkeypatch):
    cfg = small(tmp_path)
    calls: list = []
    monkeypatch.setattr(artifacts, "_export_and_compile", fake_export(calls, delay_s=0.5))
    results: list = []
    seen: set = set()
    builders = [threading.Thread(target=lambda: results.append(Artifact.of(cfg, CPU, 1)
                                                              .build(cfg, CPU)))
                for _ in range(3)]
    for b in builders:
        b.start()
    while any(b.is_alive() for b in builders):
        seen.add(Artifact.of(cfg, CPU, 1).problem())
    assert sorted(results) == [False, False, True] and len(calls) == 1
    assert seen <= {"not built yet", None}
    assert Artifact.of(cfg, CPU, 1).problem() is None
    assert not list(tmp_path.glob(".build-*"))  # no temporary left behind


def test_the_key_names_what_the_code_depends_on(tmp_path):
    cfg = small(tmp_path)
    one, two = Artifact.of(cfg, CPU, 1), Artifact.of(cfg, CPU, 2)
    assert one.path != two.path and one.path.parent == tmp_path
    key = one.key
    assert key["torch"] == torch.__version__ and key["batch"] == [1, artifacts.MAX_BATCH]
    assert key["cpu_isa"] and key["cpu_flags"] and key["dtype"] == "float32"
    assert Artifact.of(small(tmp_path, seed=1), CPU, 1).path != one.path
    # The CPU computes in float32 whatever dtype says, so the artifact is the same.
    assert Artifact.of(small(tmp_path, dtype="float16"), CPU, 1).path == one.path


def test_the_artifact_dir_comes_from_the_config_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.DIR_ENV, str(tmp_path / "env"))
    assert artifacts.artifact_dir(ModelConfig()) == tmp_path / "env"
    monkeypatch.setenv("MY_DIR", str(tmp_path / "var"))
    assert artifacts.artifact_dir(ModelConfig(artifact_dir="$MY_DIR/a")) == tmp_path / "var" / "a"
    monkeypatch.delenv(artifacts.DIR_ENV)
    assert artifacts.artifact_dir(ModelConfig()) == Path.home() / ".cache/serve_app/artifacts"


def test_building_without_a_cxx_compiler_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    cfg = small(tmp_path)
    with pytest.raises(RuntimeError, match="model.compile: true needs a C\\+\\+ compiler"):
        Artifact.of(cfg, CPU, 1).build(cfg, CPU)


def test_compile_command_builds_what_a_config_needs_once(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    text = (Path(__file__).parents[2] / "configs" / "local.yaml").read_text()
    config.write_text(text.replace("compile: true", f"compile: true\n        artifact_dir: {tmp_path}"))
    calls: list = []
    monkeypatch.setattr(artifacts, "_export_and_compile", fake_export(calls))
    assert [(app, d.type, t) for app, _, d, t in compiling.artifacts_of(load(config))] == \
        [("serve_app", "cpu", 1)]  # num_cpus 0.8: one thread, as the replicas
    assert compiling.compile_configs([str(config)]) == 0
    assert compiling.compile_configs([str(config)]) == 0
    out = capsys.readouterr().out
    assert "built in" in out and "already built" in out and len(calls) == 1
    gpu = Path(__file__).parents[2] / "configs" / "gpu.yaml"
    assert compiling.compile_configs([str(gpu)]) == 0
    assert "nothing to compile" in capsys.readouterr().out


@pytest.mark.slow
def test_a_replica_without_an_artifact_serves_eager_and_swaps_the_built_one_in(swap):
    seen = swap["seen"]
    assert seen["eager_first"] and seen["builder"], seen  # no waiting for a compile
    assert seen["swapped"], "the artifact was not swapped in"
    assert seen["returncode"] == 0 and seen["eager_dropped"] and seen["same_scores"], seen
