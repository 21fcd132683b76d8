"""Label-selector placement (serve_app/placement.py) and the k8s check built on it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from serve_app import configfile, k8s, placement
from serve_app.placement import NodeType, selector_matches, value_matches

ROOT = Path(__file__).resolve().parents[2]
GPU = next(v for v in k8s.VARIANTS if v.name == "gpu")


@pytest.mark.parametrize("selector,value,expected", [
    ("gpu", "gpu", True), ("gpu", "cpu", False), ("gpu", None, False),
    ("!gpu", "gpu", False), ("!gpu", "cpu", True), ("!gpu", None, True),
    ("in(cpu, gpu)", "gpu", True), ("in(cpu,gpu)", "head", False), ("in(cpu, gpu)", None, False),
    ("!in(cpu, gpu)", "cpu", False), ("!in(cpu, gpu)", "head", True), ("!in(cpu,gpu)", None, True),
])
def test_selector_values_match_as_ray_matches_them(selector, value, expected):
    # A missing key fails a positive value and passes a negation: checked against a live
    # Ray 2.60 raylet (an unlabelled node ran a "!gpu" task, left a "gpu" one pending).
    assert value_matches(selector, value) is expected


def test_every_key_of_a_selector_must_match():
    labels = {placement.POOL_LABEL: "cpu", "zone": "a"}
    assert selector_matches({placement.POOL_LABEL: "cpu", "zone": "a"}, labels)
    assert not selector_matches({placement.POOL_LABEL: "cpu", "zone": "b"}, labels)
    assert selector_matches(None, labels) and selector_matches({}, {})


def test_gpu_yaml_keeps_cpu_replicas_off_gpu_nodes_and_classifiers_off_cpu_nodes():
    config = configfile.load(ROOT / "configs/gpu.yaml")
    cpu = NodeType("cpu", {placement.POOL_LABEL: "cpu"}, 4, 0)
    gpu = NodeType("gpu", {placement.POOL_LABEL: "gpu"}, 4, 1)
    bare = NodeType("one machine", {}, 16, 1)  # `serve run configs/gpu.yaml` on a GPU box
    where = {p.deployment: [n.name for n in (cpu, gpu, bare) if p.fits(n)]
             for p in placement.placements(config)}
    assert where == {"Ingress": ["cpu", "one machine"], "Preprocessor": ["cpu", "one machine"],
                     "Classifier": ["gpu", "one machine"]}


def _doc() -> dict:
    return yaml.safe_load((ROOT / GPU.output).read_text())


def _edit_serve_config(doc: dict, edit) -> dict:
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    edit({d["name"]: d for d in config["applications"][0]["deployments"]})
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
    return doc


def test_the_rendered_groups_carry_the_pool_labels_and_every_deployment_fits_its_own():
    doc = _doc()
    types = {n.name: n for n in k8s.node_types(doc)}
    assert {n: dict(t.labels) for n, t in types.items()} == {
        "head": {placement.POOL_LABEL: "head"}, "cpu": {placement.POOL_LABEL: "cpu"},
        "gpu": {placement.POOL_LABEL: "gpu"}}
    assert (types["head"].cpus, types["gpu"].gpus, types["cpu"].gpus) == (0, 1, 0)
    assert k8s.placement_errors(doc, GPU) == []


def test_a_cpu_deployment_without_its_selector_is_caught_because_it_fits_a_gpu_pod():
    doc = _edit_serve_config(_doc(), lambda d: d["Ingress"]["ray_actor_options"].pop(
        "label_selector"))
    errors = k8s.placement_errors(doc, GPU)
    assert len(errors) == 1 and "Ingress" in errors[0] and "['gpu']" in errors[0], errors


def test_a_selector_no_group_matches_is_caught_naming_the_deployment():
    def edit(d):
        d["Classifier"]["ray_actor_options"]["label_selector"] = {placement.POOL_LABEL: "tpu"}
    errors = k8s.placement_errors(_edit_serve_config(_doc(), edit), GPU)
    assert len(errors) == 1 and errors[0].startswith("deployment Classifier: no node group"), errors


def test_a_gpu_group_that_loses_its_label_is_caught():
    doc = copy.deepcopy(_doc())
    gpu = next(g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
               if g["groupName"] == "gpu")
    del gpu["labels"]
    errors = k8s.placement_errors(doc, GPU)
    assert sorted(e.split(":")[0] for e in errors) == [
        "deployment Ingress", "deployment Preprocessor"], errors
