"""k8s/: generated from configs/, valid for KubeRay's CRD, consistent with the Serve configs.

No cluster: these load YAML, render, diff, and validate with jsonschema and Ray's own schema.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app import configfile, k8s
from serve_app.__main__ import main as cli

ROOT = Path(__file__).resolve().parents[2]
GPU, CPU = k8s.VARIANTS
CRD_DIR = os.environ.get("KUBERAY_CRD_DIR")
needs_crds = pytest.mark.skipif(
    not CRD_DIR, reason="KUBERAY_CRD_DIR is unset: KubeRay's CRD YAMLs are needed to validate "
                        "k8s/ against its schema (.ci/run sets it to ../shared/kuberay)")


def doc(variant: k8s.Variant) -> dict:
    return yaml.safe_load((ROOT / variant.output).read_text())


def copy_repo(tmp_path: Path) -> Path:
    """What rendering and checking read, in a scratch copy that a test may break."""
    for rel in ["pyproject.toml", "Dockerfile", GPU.config, CPU.config, GPU.output, CPU.output,
                k8s.PODMONITOR_PATH]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def worker(d: dict, name: str) -> dict:
    return next(g for g in d["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == name)


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


# ---- drift --------------------------------------------------------------------------------


def test_k8s_is_up_to_date_with_configs():
    problems = k8s.stale(ROOT)
    assert not problems, "\n".join(problems)


def test_a_config_change_without_make_k8s_is_caught(tmp_path):
    root = copy_repo(tmp_path)
    path = root / GPU.config
    path.write_text(path.read_text().replace("max_replicas: 8", "max_replicas: 12"))
    problems = k8s.stale(root)
    assert len(problems) == 1 and problems[0].startswith(f"{GPU.output} is out of date")
    assert "+          max_replicas: 12" in problems[0]
    k8s.write(root)
    assert k8s.stale(root) == []


def test_render_is_deterministic_and_every_file_says_it_is_generated():
    first, second = k8s.render(ROOT), k8s.render(ROOT)
    assert first == second and set(first) == {GPU.output, CPU.output, k8s.PODMONITOR_PATH}
    for text in first.values():
        assert text.startswith("# GENERATED from configs/")


# ---- serveConfigV2 ------------------------------------------------------------------------


def test_gpu_serve_config_is_gpu_yaml_with_the_api_token_and_valid_for_ray_and_serve_app():
    serve = yaml.safe_load(doc(GPU)["spec"]["serveConfigV2"])
    gpu = configfile.load(ROOT / "configs/gpu.yaml")
    assert "auth" not in gpu["applications"][0]["args"]  # open on a workstation
    gpu["applications"][0]["args"]["auth"] = {"token_env": "SERVE_APP_API_TOKEN"}
    assert serve == gpu
    ServeDeploySchema.model_validate(serve)
    [(name, settings, batching)] = configfile.check(serve, "serveConfigV2")
    assert settings.primary.name == "resnet50" and batching.max_batch_size == 32
    classifier = configfile.deployment_options(serve["applications"][0], "Classifier")
    assert classifier["ray_actor_options"]["num_gpus"] == 0.25


def test_cpu_serve_config_is_local_yaml_with_proxies_reachable_on_every_pod():
    serve = yaml.safe_load(doc(CPU)["spec"]["serveConfigV2"])
    local = configfile.load(ROOT / "configs/local.yaml")
    assert (local["http_options"]["host"], local["proxy_location"]) == ("127.0.0.1", "HeadOnly")
    local["http_options"]["host"] = "0.0.0.0"
    local["proxy_location"] = "EveryNode"
    local["applications"][0]["args"]["auth"] = {"token_env": "SERVE_APP_API_TOKEN"}
    assert serve == local
    configfile.check(serve, "serveConfigV2")
    assert not any(d.get("ray_actor_options", {}).get("num_gpus")
                   for d in serve["applications"][0]["deployments"])


# ---- consistency --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
def test_manifests_are_consistent(variant):
    assert k8s.consistency_errors(doc(variant), variant) == []


@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
def test_every_pod_runs_ray_with_serve_apps_cluster_env(variant):
    from serve_app.launch import RAY_CLUSTER_ENV

    from serve_app import haproxy_shedding

    d = doc(variant)
    cluster = d["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    shed = json.dumps(haproxy_shedding.limits(yaml.safe_load(d["spec"]["serveConfigV2"])),
                      sort_keys=True)
    for group in groups:
        env = {e["name"]: e.get("value", e.get("valueFrom"))
               for e in ray_container(group).get("env", [])}
        token = env.pop("SERVE_APP_API_TOKEN")
        assert token == {"secretKeyRef": {"name": "serve-app-api-token", "key": "token"}}
        assert env == {**RAY_CLUSTER_ENV, **k8s.WRITABLE_ENV, **k8s.HAPROXY_ENV,
                       haproxy_shedding.LIMITS_ENV: shed}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_gpu_manifest_shape():
    d = doc(GPU)
    cluster = d["spec"]["rayClusterConfig"]
    assert (d["apiVersion"], d["kind"]) == ("ray.io/v1", "RayService")
    assert cluster["rayVersion"] == k8s.pinned_ray_version() == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = worker(d, "gpu")
    limits = ray_container(gpu)["resources"]["limits"]
    # 8 classifier replicas x 0.25 GPU = 2 pods of one GPU, 4 replicas (4 CPUs) on each.
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 2)
    assert limits["nvidia.com/gpu"] == 1 and k8s.quantity(limits["cpu"]) == 4
    # 2 CPUs of ingress + 16 of preprocessors = 5 pods of 4 CPUs.
    assert worker(d, "cpu")["maxReplicas"] == 5
    ports = {p["name"]: p["containerPort"] for p in
             ray_container(cluster["headGroupSpec"])["ports"]}
    assert ports["serve"] == 8000


def _break(path, value):
    def apply(d):
        *parents, last = path
        node = d
        for key in parents:
            node = node[key] if not callable(key) else key(node)
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return apply


_DELETE = object()
_CLUSTER = ("spec", "rayClusterConfig")
_GPU_POD = (*_CLUSTER, lambda c: worker({"spec": {"rayClusterConfig": c}}, "gpu"))
_CPU_POD = (*_CLUSTER, lambda c: worker({"spec": {"rayClusterConfig": c}}, "cpu"))
_GPU_RES = (*_GPU_POD, "template", "spec", "containers", 0, "resources")


@pytest.mark.parametrize("mutate,expected", [
    (_break((*_GPU_POD, "maxReplicas"), 1), "max replicas need 2 GPUs"),
    (_break((*_GPU_RES, "limits", "cpu"), "2"), "need 4 CPUs; the pod has 2"),
    (_break((*_GPU_RES, "requests", "memory"), "4Gi"), "requests must equal limits"),
    (_break((*_CPU_POD, "maxReplicas"), 3), "need 5 pods"),
    (_break((*_CPU_POD, "template", "spec", "containers", 0, "resources"),
            {"requests": {"cpu": "4", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "2Gi"}}),
     "below the worst packing"),
    (_break((*_CLUSTER, "rayVersion"), "2.59.0"), "not the pinned Ray 2.60.0"),
    (_break((*_GPU_POD, "template", "spec", "containers", 0, "image"), "serve-app:latest"),
     "is not tagged for Ray 2.60.0"),
    (_break((*_CLUSTER, "headGroupSpec", "rayStartParams", "num-cpus"), _DELETE), "num-cpus"),
    (_break((*_CLUSTER, "enableInTreeAutoscaling"), False), "enableInTreeAutoscaling"),
    (_break((*_GPU_POD, "template", "spec", "tolerations"), _DELETE), "toleration"),
    (_break((*_GPU_POD, "template", "spec", "nodeSelector"), _DELETE), "nodeSelector"),
    (_break((*_GPU_POD, "template", "spec", "volumes"), []), "/dev/shm"),
    (_break((*_GPU_POD, "template", "spec", "securityContext"), {}), "runAsNonRoot"),
    (_break((*_GPU_POD, "template", "spec", "containers", 0, "readinessProbe"),
            {"exec": {"command": ["true"]}}), "readinessProbe is KubeRay's"),
    (_break(("spec", "serveConfigV2"), "applications: []\n"), "not the Serve config"),
    (_break((*_GPU_POD, "template", "spec", "containers", 0, "env"), []),
     "must come from Secret serve-app-api-token"),
])
def test_inconsistencies_are_reported(mutate, expected):
    d = copy.deepcopy(doc(GPU))
    mutate(d)
    errors = k8s.consistency_errors(d, GPU)
    assert any(expected in e for e in errors), errors


# ---- pod security -------------------------------------------------------------------------


def _all_containers(d: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container of every group, init ones included."""
    out = []
    for name, pod, _ in k8s._containers(d):
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            out.append((f"{name}/{c['name']}", pod, c))
    return out


@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
def test_every_container_is_non_root_read_only_and_unprivileged(variant):
    d = doc(variant)
    assert k8s.security_errors(d, k8s.artifact_groups(variant, k8s.serve_config(variant))) == []
    cluster = d["spec"]["rayClusterConfig"]
    sidecar = cluster["autoscalerOptions"]["securityContext"]
    for where, pod, c in _all_containers(d):
        sc = c["securityContext"]
        assert (sc["runAsNonRoot"], sc["runAsUser"], sc["runAsGroup"]) == (True, 1000, 100), where
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and "add" not in sc["capabilities"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc == sidecar
        assert pod["securityContext"]["fsGroup"] == 100 and pod["securityContext"]["runAsNonRoot"]
    for name, pod, ray in k8s._containers(d):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]]["emptyDir"] for m in ray["volumeMounts"]}
        assert mounts["/tmp"] == {} and mounts["/dev/shm"]["medium"] == "Memory", name
    head = cluster["headGroupSpec"]["template"]["spec"]
    [mount] = cluster["autoscalerOptions"]["volumeMounts"]
    assert mount["mountPath"] == "/tmp" and mount["name"] in {v["name"] for v in head["volumes"]}


def test_the_image_runs_as_the_user_the_pods_run_as():
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER 1000:100\n" in text and "--chown=1000:100" in text
    assert k8s.dockerfile_user_errors(text) == []
    assert k8s.dockerfile_user_errors(text + "USER root\n")
    assert k8s.dockerfile_user_errors(text.replace("USER 1000:100", "USER 0"))
    assert re.search(rf"SERVE_APP_ARTIFACT_DIR={k8s.ARTIFACT_DIR}\b", text)


def test_ray_and_haproxy_write_under_tmp(monkeypatch):
    """The writable /tmp covers what Ray 2.60 writes by default: if Ray moves a path, the pods
    need a volume there too."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray.serve._private import constants

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.delenv("TMPDIR", raising=False)
    assert get_default_ray_temp_dir() == "/tmp/ray"
    for name in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
                 "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
        if name not in os.environ:
            assert getattr(constants, name).startswith("/tmp/haproxy-serve"), name
    assert all(path.startswith("/tmp/") for path in k8s.WRITABLE_ENV.values())


def test_compiled_classifiers_get_a_writable_copy_of_the_baked_artifacts(tmp_path):
    """Only the CPU variant compiles (configs/local.yaml), on its cpu group: the seeding init
    container's command copies the image's artifacts, and tolerates an image without them."""
    assert k8s.artifact_groups(GPU, k8s.serve_config(GPU)) == set()
    assert k8s.artifact_groups(CPU, k8s.serve_config(CPU)) == {"cpu"}
    assert "initContainers" not in pod_of(doc(GPU), "cpu")
    [seed] = pod_of(doc(CPU), "cpu")["initContainers"]
    mounts = {m["mountPath"]: m["name"] for m in ray_container(worker(doc(CPU), "cpu"))["volumeMounts"]}
    assert mounts[k8s.ARTIFACT_DIR] == seed["volumeMounts"][0]["name"] == "artifacts"
    baked, copy_to = tmp_path / "baked", tmp_path / "copy"
    baked.mkdir(), copy_to.mkdir()
    (baked / "efficientnet_lite0-0123.pt2").write_bytes(b"package")
    (baked / ".build-x").mkdir()
    command = [part.replace(k8s.ARTIFACT_DIR, str(baked)).replace(k8s.ARTIFACT_SEED_MOUNT, str(copy_to))
               for part in seed["command"]]
    subprocess.run(command, check=True)
    assert (copy_to / "efficientnet_lite0-0123.pt2").read_bytes() == b"package"
    shutil.rmtree(baked)
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    assert "replicas build their own" in result.stdout


def pod_of(d: dict, group: str) -> dict:
    return worker(d, group)["template"]["spec"]


_CPU_SPEC = (*_CPU_POD, "template", "spec")
_CPU_RAY_SC = (*_CPU_SPEC, "containers", 0, "securityContext")
_AUTOSCALER = (*_CLUSTER, "autoscalerOptions")
_HEAD_SPEC = (*_CLUSTER, "headGroupSpec", "template", "spec")


def _both(key, value=_DELETE):
    """``key`` broken in the cpu group's pod and in its Ray container (one would cover the other)."""
    def apply(d):
        _break((*_CPU_SPEC, "securityContext", key), value)(d)
        _break((*_CPU_RAY_SC, key), value)(d)
    return apply


@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("mutate,expected", [
    # each container setting, absent or wrong, on the Ray container of a worker group
    (_break((*_CPU_RAY_SC, "readOnlyRootFilesystem"), _DELETE),
     "cpu/ray-worker: securityContext.readOnlyRootFilesystem must be True (found None)"),
    (_break((*_CPU_RAY_SC, "readOnlyRootFilesystem"), False),
     "cpu/ray-worker: securityContext.readOnlyRootFilesystem must be True (found False)"),
    (_break((*_CPU_RAY_SC, "allowPrivilegeEscalation"), _DELETE),
     "cpu/ray-worker: securityContext.allowPrivilegeEscalation must be False"),
    (_break((*_CPU_RAY_SC, "allowPrivilegeEscalation"), True),
     "cpu/ray-worker: securityContext.allowPrivilegeEscalation must be False (found True)"),
    (_break((*_CPU_RAY_SC, "capabilities"), _DELETE),
     "cpu/ray-worker: securityContext.capabilities.drop must include ALL"),
    (_break((*_CPU_RAY_SC, "capabilities"), {"drop": ["NET_RAW"]}),
     "cpu/ray-worker: securityContext.capabilities.drop must include ALL"),
    (_break((*_CPU_RAY_SC, "capabilities"), {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
     "cpu/ray-worker: securityContext.capabilities.add must be empty"),
    (_break((*_CPU_RAY_SC, "privileged"), True), "cpu/ray-worker: securityContext.privileged"),
    # the container's own value wins over the pod's
    (_break((*_CPU_RAY_SC, "runAsUser"), 0),
     "cpu/ray-worker: securityContext.runAsUser must be 1000 (found 0)"),
    (_break((*_CPU_RAY_SC, "runAsNonRoot"), False),
     "cpu/ray-worker: securityContext.runAsNonRoot must be True (found False)"),
    (_break((*_CPU_RAY_SC, "seccompProfile"), {"type": "Unconfined"}),
     "cpu/ray-worker: securityContext.seccompProfile must be {'type': 'RuntimeDefault'}"),
    # set on neither the container nor the pod
    (_both("runAsNonRoot"), "cpu/ray-worker: securityContext.runAsNonRoot must be True (found None)"),
    (_both("runAsUser"), "cpu/ray-worker: securityContext.runAsUser must be 1000 (found None)"),
    (_both("runAsGroup"), "cpu/ray-worker: securityContext.runAsGroup must be 100 (found None)"),
    (_both("seccompProfile"), "cpu/ray-worker: securityContext.seccompProfile must be"),
    # the pod's defaults, for containers added without their own
    (_break((*_CPU_SPEC, "securityContext", "fsGroup"), _DELETE),
     "cpu: pod securityContext.fsGroup must be 100 (found None)"),
    (_break((*_CPU_SPEC, "securityContext", "runAsUser"), 0),
     "cpu: pod securityContext.runAsUser must be 1000 (found 0)"),
    (_break((*_HEAD_SPEC, "securityContext", "seccompProfile"), _DELETE),
     "head: pod securityContext.seccompProfile"),
    (_break((*_HEAD_SPEC, "containers", 0, "securityContext"), _DELETE),
     "head/ray-head: securityContext.readOnlyRootFilesystem must be True"),
    # the writable paths
    (_break((*_CPU_SPEC, "volumes"), [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]),
     "cpu/ray-worker: the root filesystem is read-only, so /tmp must be a writable disk emptyDir"),
    (_break((*_CPU_SPEC, "containers", 0, "volumeMounts"), [{"name": "dshm", "mountPath": "/dev/shm"}]),
     "cpu/ray-worker: the root filesystem is read-only, so /tmp"),
    (_break((*_HEAD_SPEC, "containers", 0, "volumeMounts", 1, "readOnly"), True),
     "head/ray-head: the root filesystem is read-only, so /tmp"),
    (lambda d: pod_of(d, "cpu")["volumes"][1]["emptyDir"].update(medium="Memory"),
     "cpu/ray-worker: the root filesystem is read-only, so /tmp"),
    (_break((*_CPU_SPEC, "containers", 0, "env"), [{"name": "SERVE_APP_API_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "serve-app-api-token", "key": "token"}}}]),
     "cpu/ray-worker: env CUDA_CACHE_PATH must be /tmp/cuda-cache"),
    # the autoscaler sidecar (its securityContext and mounts come from autoscalerOptions)
    (_break((*_AUTOSCALER, "securityContext"), _DELETE),
     "head/autoscaler: autoscalerOptions.securityContext.readOnlyRootFilesystem must be True"),
    (_break((*_AUTOSCALER, "securityContext", "capabilities"), _DELETE),
     "head/autoscaler: autoscalerOptions.securityContext.capabilities.drop must include ALL"),
    (_break((*_AUTOSCALER, "volumeMounts"), _DELETE),
     "head/autoscaler: autoscalerOptions.volumeMounts must mount a writable emptyDir"),
    (_break((*_HEAD_SPEC, "volumes"), []),
     "head/autoscaler: autoscalerOptions.volumeMounts must mount a writable emptyDir"),
])
def test_pod_security_mistakes_are_reported(variant, mutate, expected):
    d = copy.deepcopy(doc(variant))
    mutate(d)
    errors = k8s.consistency_errors(d, variant)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("mutate,expected", [
    (_break((*_CPU_SPEC, "initContainers", 0, "securityContext", "readOnlyRootFilesystem"), False),
     "cpu/seed-artifacts (init): securityContext.readOnlyRootFilesystem must be True"),
    (_break((*_CPU_SPEC, "initContainers", 0, "securityContext"), _DELETE),
     "cpu/seed-artifacts (init): securityContext.allowPrivilegeEscalation must be False"),
    (_break((*_CPU_SPEC, "initContainers"), _DELETE),
     "cpu/ray-worker: compiled classifiers run here, so /home/ray/serve_app_artifacts must be"),
    (_break((*_CPU_SPEC, "containers", 0, "volumeMounts", 2, "mountPath"), "/home/ray/elsewhere"),
     "cpu/ray-worker: compiled classifiers run here"),
    (_break((*_CPU_SPEC, "initContainers", 0, "volumeMounts", 0, "name"), "tmp"),
     "cpu/ray-worker: compiled classifiers run here"),
])
def test_compiled_artifact_mistakes_are_reported(mutate, expected):
    d = copy.deepcopy(doc(CPU))
    mutate(d)
    errors = k8s.consistency_errors(d, CPU)
    assert any(expected in e for e in errors), errors


def test_the_artifact_dir_must_be_where_pods_mount_it(tmp_path):
    root = copy_repo(tmp_path)
    dockerfile = root / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace(
        f"SERVE_APP_ARTIFACT_DIR={k8s.ARTIFACT_DIR}", "SERVE_APP_ARTIFACT_DIR=/opt/artifacts"))
    errors = k8s.consistency_errors(k8s.manifest(CPU, root), CPU, root)
    assert any("SERVE_APP_ARTIFACT_DIR is /opt/artifacts" in e for e in errors), errors
    dockerfile.write_text(dockerfile.read_text() + "USER root\n")
    errors = k8s.consistency_errors(k8s.manifest(GPU, root), GPU, root)
    assert any("last USER is root" in e for e in errors), errors


def test_k8s_check_fails_a_manifest_that_is_not_hardened(tmp_path):
    """`k8s check` itself, not only the renderer: a hand edit that drops a setting is reported
    as such (besides the file being stale), naming the container."""
    root = copy_repo(tmp_path)
    path = root / GPU.output
    d = yaml.safe_load(path.read_text())
    del ray_container(d["spec"]["rayClusterConfig"]["headGroupSpec"])["securityContext"][
        "readOnlyRootFilesystem"]
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    problems = k8s.check(root)
    assert any(p.startswith(f"{GPU.output}: head/ray-head: securityContext.readOnlyRootFilesystem "
                            "must be True (found None)") for p in problems), problems


def test_head_only_proxy_is_reported():
    d = copy.deepcopy(doc(CPU))
    serve = yaml.safe_load(d["spec"]["serveConfigV2"])
    serve["proxy_location"] = "HeadOnly"
    d["spec"]["serveConfigV2"] = yaml.safe_dump(serve)
    errors = k8s.consistency_errors(d, CPU)
    assert any("kuberay#4994" in e for e in errors), errors


def test_serve_config_rejected_by_ray_is_reported():
    d = copy.deepcopy(doc(GPU))
    serve = yaml.safe_load(d["spec"]["serveConfigV2"])
    serve["applications"][0]["deployments"][0]["max_ongoing_requests"] = -1
    d["spec"]["serveConfigV2"] = yaml.safe_dump(serve)
    errors = k8s.consistency_errors(d, GPU)
    assert any("Ray rejects this Serve config" in e for e in errors), errors


@pytest.mark.parametrize("old,new", [
    ("name: resnet50", "name: resnet101"),
    ("channels_last: true", "channels_last: true\n        compile: true"),  # more memory
])
def test_a_model_change_asks_for_a_new_measurement(tmp_path, old, new):
    root = copy_repo(tmp_path)
    path = root / GPU.config
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    errors = k8s.consistency_errors(k8s.manifest(GPU, root), GPU, root)
    assert any("measure_footprint.py" in e for e in errors), errors


def test_a_compiled_model_needs_g_plus_plus_in_the_image(tmp_path):
    root = copy_repo(tmp_path)
    path = root / CPU.config
    assert "compile: true" in path.read_text()
    assert not any("g++" in e for e in k8s.consistency_errors(k8s.manifest(CPU, root), CPU, root))
    dockerfile = root / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("install -y --no-install-recommends g++",
                                                         "install -y --no-install-recommends curl"))
    errors = k8s.consistency_errors(k8s.manifest(CPU, root), CPU, root)
    assert any("needs g++ in the image" in e for e in errors), errors


def test_a_compiled_model_must_be_baked_into_the_image(tmp_path):
    root = copy_repo(tmp_path)
    assert not any("artifact" in e for e in k8s.consistency_errors(k8s.manifest(CPU, root), CPU, root))
    dockerfile = root / "Dockerfile"
    text = dockerfile.read_text()
    dockerfile.write_text(text.replace("RUN python -m serve_app compile configs/local.yaml",
                                       "RUN true"))
    errors = k8s.consistency_errors(k8s.manifest(CPU, root), CPU, root)
    assert any("does not bake its artifact" in e for e in errors), errors
    dockerfile.write_text(text.replace("    SERVE_APP_ARTIFACT_DIR=/home/ray/serve_app_artifacts \\\n", ""))
    errors = k8s.consistency_errors(k8s.manifest(CPU, root), CPU, root)
    assert any("SERVE_APP_ARTIFACT_DIR" in e for e in errors), errors


def test_pods_run_haproxy_through_the_json_error_pages_the_image_installs(tmp_path):
    """Every pod in HAProxy mode names serve_app's wrapper as Ray's HAProxy binary, and the
    Dockerfile installs it there; either missing is an error naming what to add."""
    root = copy_repo(tmp_path)
    dockerfile = root / "Dockerfile"
    text = dockerfile.read_text()
    assert k8s.haproxy_page_errors(doc(GPU), text) == []
    line = f"RUN python -m serve_app.haproxy_errors install {k8s.HAPROXY_DIR}\n"
    assert line in text
    dockerfile.write_text(text.replace(line, ""))
    errors = k8s.consistency_errors(doc(GPU), GPU, root)
    assert any("the Dockerfile does not install it" in e for e in errors), errors
    d = doc(CPU)
    worker = ray_container(d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])
    worker["env"] = [e for e in worker["env"] if e["name"] != "RAY_SERVE_HAPROXY_BINARY_PATH"]
    errors = k8s.haproxy_page_errors(d, text)
    assert len(errors) == 1 and "RAY_SERVE_HAPROXY_BINARY_PATH must be" in errors[0], errors


def test_pods_shed_at_the_limits_of_the_config_they_serve():
    """The pods' edge-shedding limits are those of their serveConfigV2; a config changed
    without `make k8s` (here: a larger grouping queue) is an error naming the variable."""
    from serve_app import haproxy_shedding

    d = doc(CPU)
    head = ray_container(d["spec"]["rayClusterConfig"]["headGroupSpec"])
    env = {e["name"]: e.get("value") for e in head["env"]}
    config = yaml.safe_load(d["spec"]["serveConfigV2"])
    assert json.loads(env[haproxy_shedding.LIMITS_ENV]) == haproxy_shedding.limits(config)
    config["applications"][0]["args"]["dispatch"]["max_queued"] += 32
    d["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
    errors = k8s.haproxy_page_errors(d, (k8s.ROOT / "Dockerfile").read_text())
    assert errors and all(haproxy_shedding.LIMITS_ENV in e for e in errors), errors


def test_the_wrapper_installs_from_its_command_line(tmp_path):
    import sys

    out = subprocess.run([sys.executable, "-m", "serve_app.haproxy_errors", "install",
                          str(tmp_path / "h")], capture_output=True, text=True, check=True)
    wrapper = Path(out.stdout.strip())
    assert wrapper == tmp_path / "h" / "haproxy" and os.access(wrapper, os.X_OK)
    assert (tmp_path / "h" / "502.http").read_bytes().startswith(b"HTTP/1.1 502 Bad Gateway")


def test_dockerfile_must_use_the_pinned_ray_image(tmp_path):
    root = copy_repo(tmp_path)
    dockerfile = root / "Dockerfile"
    assert k8s.base_image() == "rayproject/ray:2.60.0-py311-gpu"
    dockerfile.write_text(dockerfile.read_text().replace("2.60.0-py311-gpu", "2.59.0-py311-gpu"))
    errors = k8s.consistency_errors(doc(GPU), GPU, root)
    assert any("Dockerfile is not FROM rayproject/ray:2.60.0-py311-gpu" in e for e in errors)


def test_pods_needed_packs_first_fit_decreasing():
    assert k8s.pods_needed([(1, 0.25)] * 8, cpus=4, gpus=1) == 2
    assert k8s.pods_needed([(1, 0.25)] * 8, cpus=2, gpus=1) == 4  # CPU-bound
    assert k8s.pods_needed([(0.8, 0)] * 2 + [(0.1, 0)] * 4, cpus=1, gpus=0) == 2
    with pytest.raises(ValueError):
        k8s.pods_needed([(2, 0)], cpus=1, gpus=0)


def test_quantities():
    assert k8s.quantity("500m") == 0.5 and k8s.quantity(4) == 4 and k8s.quantity("4") == 4
    assert k8s.quantity("8Gi") == 8 * 1024 ** 3 and k8s.quantity("5632Mi") == 5632 * 1024 ** 2


# ---- KubeRay CRD schema -------------------------------------------------------------------


@needs_crds
@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
def test_manifests_validate_against_kuberay_crd(variant):
    assert k8s.schema_errors(doc(variant), Path(CRD_DIR)) == []


@needs_crds
@pytest.mark.parametrize("cpu,ok", [("1", True), (1, True), ("500m", True), (0.5, False),
                                    ("one", False)])
def test_int_or_string_quantities(cpu, ok):
    d = copy.deepcopy(doc(GPU))
    for kind in ("requests", "limits"):
        ray_container(worker(d, "cpu"))["resources"][kind]["cpu"] = cpu
    errors = k8s.schema_errors(d, Path(CRD_DIR))
    assert (errors == []) is ok, errors


@needs_crds
@pytest.mark.parametrize("mutate,expected", [
    (_break((*_GPU_POD, "maxReplicas"), "two"), "maxReplicas: 'two' is not of type 'integer'"),
    (_break((*_CLUSTER, "autoscalerOptions", "upscalingMode"), "Fast"), "is not one of"),
    (_break((*_CLUSTER, "headGroupSpec", "rayStartParams"), {"num-cpus": 0}),
     "0 is not of type 'string'"),
    # kubectl's strict validation rejects unknown fields; without it KubeRay would never see them
    (_break((*_CLUSTER, "enableInTreeAutoscalling"), True), "enableInTreeAutoscalling"),
    (_break((*_GPU_POD, "template", "spec", "containers", 0, "resorces"), {}), "resorces"),
])
def test_crd_schema_rejects_mistakes(mutate, expected):
    d = copy.deepcopy(doc(GPU))
    mutate(d)
    errors = k8s.schema_errors(d, Path(CRD_DIR))
    assert any(expected in e for e in errors), errors


def test_crd_schema_needs_a_crd_for_the_kind(tmp_path):
    with pytest.raises(FileNotFoundError):
        k8s.crd_schema(tmp_path)


# ---- the command --------------------------------------------------------------------------


def test_cli_check_passes_on_the_checked_in_manifests(capsys, monkeypatch):
    if CRD_DIR:
        monkeypatch.setenv("KUBERAY_CRD_DIR", CRD_DIR)
    assert cli(["k8s", "check"]) == 0
    assert "k8s: ok" in capsys.readouterr().out


def test_cli_render_with_another_image_writes_elsewhere(tmp_path):
    assert cli(["k8s", "render", "--image", "registry.example/serve-app:0.1.0-ray2.60.0-py311-gpu",
                "--out", str(tmp_path)]) == 0
    d = yaml.safe_load((tmp_path / "rayservice.yaml").read_text())
    assert ray_container(worker(d, "gpu"))["image"].startswith("registry.example/")
    assert k8s.consistency_errors(d, GPU) == []


@pytest.mark.parametrize("variant", k8s.VARIANTS, ids=lambda v: v.name)
def test_every_pod_exports_metrics_where_the_podmonitor_scrapes(variant):
    d = doc(variant)
    monitor = yaml.safe_load((ROOT / k8s.PODMONITOR_PATH).read_text())
    assert k8s.metrics_errors(d, monitor) == []
    for name, pod, container in k8s._containers(d):
        assert {"name": "metrics", "containerPort": k8s.METRICS_PORT} in container["ports"]
    groups = [d["spec"]["rayClusterConfig"]["headGroupSpec"],
              *d["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for g in groups:
        assert g["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(k8s.METRICS_PORT)


def test_metrics_mistakes_are_reported():
    d, monitor = doc(CPU), yaml.safe_load((ROOT / k8s.PODMONITOR_PATH).read_text())
    broken = copy.deepcopy(d)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] = "9999"
    assert any("metrics-export-port" in e for e in k8s.metrics_errors(broken, monitor))
    other = copy.deepcopy(monitor)
    other["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "someone-else"
    assert any("selector" in e for e in k8s.metrics_errors(d, other))
    assert any("missing" in e for e in k8s.metrics_errors(d, None))


def test_the_api_token_is_required_in_every_manifest():
    """args.auth on every serve_app application, its token from the Secret in every pod."""
    for variant in (GPU, CPU):
        d = copy.deepcopy(doc(variant))
        config = yaml.safe_load(d["spec"]["serveConfigV2"])
        assert all(app["args"]["auth"] == {"token_env": "SERVE_APP_API_TOKEN"}
                   for app in config["applications"])
        for app in config["applications"]:
            del app["args"]["auth"]
        d["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
        assert any("does not require the API token" in e
                   for e in k8s.consistency_errors(d, variant)), variant
