"""Kubernetes (KubeRay) manifests for serve_app: generated from ``configs/``, checked here.

    python -m serve_app k8s render    # or: make k8s; rewrites the files under k8s/
    python -m serve_app k8s check     # stale? KubeRay CRD schema? Serve schema? sizes add up?

One renderer, two generated variants (not Kustomize overlays, so what the tests validate is
byte for byte what ``kubectl apply -f`` sends):

* ``k8s/rayservice.yaml``: ``configs/gpu.yaml`` on GPU nodes (fractional-GPU classifiers).
* ``k8s/rayservice-cpu.yaml``: ``configs/local.yaml`` on a laptop cluster (kind, minikube).

Pod CPU comes from the deployments' ``num_cpus``; pod memory from replica footprints measured
by ``k8s/measure_footprint.py`` (the numbers are in :data:`FOOTPRINTS`).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from serve_app import haproxy_errors, haproxy_replay, haproxy_shedding, placement
from serve_app.configfile import APP_IMPORT_PATH, deployment_options, load
from serve_app.launch import RAY_CLUSTER_ENV

ROOT = Path(__file__).resolve().parent.parent
PYTHON_TAG = "py311"  # the Python of the rayproject/ray base image (Dockerfile)
IMAGE_NAME = "serve-app"
GPU_RESOURCE = "nvidia.com/gpu"
GPUS_PER_POD = 1  # one GPU per GPU pod; fractional classifier replicas share it
MIB = 1024 * 1024
# Ray's memory monitor kills workers once a node uses 95% of its memory
# (RAY_memory_usage_threshold); pods are sized so the measured peaks stay under that line.
RAY_MEMORY_THRESHOLD = 0.95
RAY_MIN_OBJECT_STORE_MIB = 75  # ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES
MEMORY_STEP_MIB = 256  # pods are rounded up to this; the measurements vary by ~60 MiB per run
SERVE_PORT = 8000
#: Ray's Prometheus endpoint on every pod (serve_app's metrics included), scraped through
#: k8s/podmonitor.yaml (Prometheus Operator) or the prometheus.io/* pod annotations.
METRICS_PORT = 8080
POD_LABELS = {"app.kubernetes.io/name": "serve-app"}
PODMONITOR_PATH = "k8s/podmonitor.yaml"
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": SERVE_PORT}
# The rayproject/ray images run as user "ray" (uid 1000) in group "users" (gid 100); the
# Dockerfile says so (USER 1000:100) and bakes the weights and artifacts as that user.
RAY_UID, RAY_GID = 1000, 100


@dataclass(frozen=True)
class Footprint:
    """Peak memory in MiB measured by ``k8s/measure_footprint.py --config CONFIG`` (CPU,
    2 cores, the highest of 3-5 runs), and the settings it was measured with: a config that
    changes them fails ``k8s check`` until someone measures again.

    ``shared_libs`` are file-backed pages (torch, ray); a pod's cgroup is charged for them once,
    however many replicas map them. The rest are private (anonymous) peaks per process.
    """

    model: str
    compile: bool  # a compiled classifier holds Inductor's code and frozen weights besides
    max_batch_size: int
    max_image_pixels: int
    shared_libs: float
    classifier: float  # load_state_dict + warm-up + one max_batch_size batch
    preprocessor: float  # one RGBA PNG at max_image_pixels (the worst single request)
    ingress: float  # imports; it holds request bodies besides
    serve_actor: float  # a Serve controller or proxy process
    ray_head: float  # GCS, dashboard and its modules, agents, raylet, log monitor (USS)
    ray_worker: float  # raylet, dashboard agent, runtime-env agent, log monitor (USS)


# Measured 2026-11-29 on this repo's CI machine (2 cores, CPU only):
#   .venv/bin/python k8s/measure_footprint.py --config configs/gpu.yaml    (summary_mib)
#   .venv/bin/python k8s/measure_footprint.py --config configs/local.yaml
#   Classifier: resnet50 1021-1071 MiB private at peak over 5 runs (loading holds the weights
#   twice for a moment; a 32-image batch's activations are ~126 MiB), efficientnet_lite0
#   577-607 eager. Compiled (model.compile, configs/local.yaml), measured 2026-12-01 with an
#   empty artifact directory, the worst case of a pod whose image has no artifact for its
#   CPU: 1900 = the replica serving eager (~580 private) + the background builder process
#   and its g++ (1320 RSS at their peak); with the baked artifact a replica holds far less.
#   Every replica starts at ~412 MiB private once ray and torch are imported (ray and
#   ray.serve alone: 71). Preprocessor: peaks of +196 MiB for a 12 MP JPEG, +607 MiB for
#   a 40 MP JPEG, +968 MiB for a 40 MP RGBA PNG (alpha compositing copies the image).
#   On a GPU the model and activations move to device memory but CUDA adds host memory of its
#   own; that is not measured here: run the script with --device cuda on a GPU node.
FOOTPRINTS: dict[str, Footprint] = {
    "configs/gpu.yaml": Footprint(
        model="resnet50", compile=False, max_batch_size=32, max_image_pixels=40_000_000,
        shared_libs=574.0, classifier=1070.8, preprocessor=1380.3, ingress=413.8,
        serve_actor=71.4, ray_head=500.2, ray_worker=168.8),
    "configs/local.yaml": Footprint(
        model="efficientnet_lite0", compile=True, max_batch_size=8, max_image_pixels=40_000_000,
        shared_libs=573.9, classifier=1900.1, preprocessor=1380.2, ingress=413.9,
        serve_actor=71.4, ray_head=499.6, ray_worker=168.8),
}


@dataclass(frozen=True)
class Variant:
    """One generated RayService: which Serve config, and the pod shapes around it."""

    name: str
    config: str
    output: str
    cpu_pod_cpus: int  # CPUs of one pod of the CPU worker group
    head_cpus: int
    gpu_group: bool


VARIANTS = (
    # 4-CPU pods hold 4 preprocessors or 8 ingress replicas. The head runs GCS, the dashboard
    # and the Serve controller (autoscaling loop every 0.1 s); a throttled GCS fails every
    # node's health checks, so it gets 2 whole CPUs on a real cluster, 1 on a laptop.
    Variant("gpu", "configs/gpu.yaml", "k8s/rayservice.yaml", cpu_pod_cpus=4, head_cpus=2,
            gpu_group=True),
    # configs/local.yaml, not gpu.yaml minus its GPUs: resnet50 with 8 classifier and 16
    # preprocessor replicas of 1 CPU wants 26 CPUs, and local.yaml is what `make run` serves,
    # so a laptop cluster behaves like the laptop. 1-CPU pods: one classifier (0.8) with an
    # ingress and a preprocessor (0.1 each) per pod, so scaling to max adds a pod.
    Variant("cpu", "configs/local.yaml", "k8s/rayservice-cpu.yaml", cpu_pod_cpus=1,
            head_cpus=1, gpu_group=False),
)

# The autoscaler sidecar: KubeRay's own default size for it.
AUTOSCALER_RESOURCES = {"cpu": "500m", "memory": "512Mi"}
# A GPU pod takes minutes to come back (a multi-GB image on a new node, CUDA init, model
# load), so the autoscaler keeps an idle pod for 5 minutes: longer than one Serve downscale
# (downscale_delay_s: 120) so a brief lull does not cost a GPU pod's cold start.
IDLE_TIMEOUT_S = 300


# ---------------------------------------------------------------- reading Serve configs ---


@dataclass(frozen=True)
class Replica:
    """One deployment's per-replica resources and replica bounds, read from a Serve config."""

    name: str
    num_cpus: float
    num_gpus: float
    min_replicas: int
    max_replicas: int
    max_ongoing: int


def replicas(config: dict[str, Any]) -> list[Replica]:
    out = []
    for app in config["applications"]:
        for d in app.get("deployments") or []:
            opts = d.get("ray_actor_options") or {}
            auto = d.get("autoscaling_config")
            if auto:
                low, high = auto.get("min_replicas", 1), auto["max_replicas"]
            else:
                low = high = d.get("num_replicas", 1)
            if "num_cpus" not in opts:
                raise ValueError(f"deployment {d['name']}: set ray_actor_options.num_cpus; "
                                 "pods are sized from it")
            out.append(Replica(d["name"], float(opts["num_cpus"]),
                               float(opts.get("num_gpus", 0)), int(low), int(high),
                               int(d.get("max_ongoing_requests", 5))))
    return out


def _args(config: dict[str, Any]) -> dict[str, Any]:
    return config["applications"][0].get("args") or {}


def _crop_bytes(config: dict[str, Any]) -> int:
    from serve_app.config import parse_app_config
    from serve_app.models import describe

    crop = describe(parse_app_config(_args(config)).primary).transform.crop_size
    return 3 * crop * crop  # uint8 CHW


def _private_mib(fp: Footprint, name: str) -> float:
    return {"Classifier": fp.classifier, "Preprocessor": fp.preprocessor,
            "Ingress": fp.ingress}[name]


def _store_bytes_per_request(config: dict[str, Any], name: str) -> int:
    """What one in-flight request of ``name`` keeps in the object store on its node: the
    preprocessor's input body and output crop, the classifier's input crop. Ingress passes
    bodies on, and proxy-to-ingress chunks are small enough to travel inline."""
    crop = _crop_bytes(config)
    body = int(_args(config).get("max_body_bytes", 10 * MIB))
    return {"Preprocessor": body + crop, "Classifier": crop, "Ingress": 0}[name]


# ------------------------------------------------------------------------ pod arithmetic ---


def _worst_packing(items: list[tuple[Replica, float]], cpus: float, gpus: float) -> float:
    """The largest sum of ``weight`` over any set of replicas that fits one pod's CPUs and GPUs
    (each deployment at most its max_replicas): the pod's worst case, whatever Ray packs."""
    ranges = [range(min(r.max_replicas, _fit(r, cpus, gpus)) + 1) for r, _ in items]
    best = 0.0
    for counts in itertools.product(*ranges):
        cpu = sum(n * r.num_cpus for n, (r, _) in zip(counts, items))
        gpu = sum(n * r.num_gpus for n, (r, _) in zip(counts, items))
        if cpu <= cpus + 1e-6 and gpu <= gpus + 1e-6:
            best = max(best, sum(n * w for n, (_, w) in zip(counts, items)))
    return best


def _fit(r: Replica, cpus: float, gpus: float) -> int:
    """How many replicas of ``r`` one pod holds."""
    by_cpu = math.floor(cpus / r.num_cpus + 1e-6) if r.num_cpus > 0 else r.max_replicas
    by_gpu = math.floor(gpus / r.num_gpus + 1e-6) if r.num_gpus > 0 else r.max_replicas
    return min(by_cpu, by_gpu)


def pods_needed(reps: Iterable[tuple[float, float]], cpus: float, gpus: float) -> int:
    """Pods of (cpus, gpus) that first-fit-decreasing packs these (cpu, gpu) replicas into."""
    pods: list[list[float]] = []
    for cpu, gpu in sorted(reps, key=lambda x: (x[1], x[0]), reverse=True):
        for pod in pods:
            if pod[0] + 1e-6 >= cpu and pod[1] + 1e-6 >= gpu:
                pod[0] -= cpu
                pod[1] -= gpu
                break
        else:
            if cpu > cpus + 1e-6 or gpu > gpus + 1e-6:
                raise ValueError(f"a replica of {cpu} CPU / {gpu} GPU fits no pod of {cpus}/{gpus}")
            pods.append([cpus - cpu, gpus - gpu])
    return len(pods)


def _round_up(mib: float) -> int:
    return int(math.ceil(mib / MEMORY_STEP_MIB) * MEMORY_STEP_MIB)


@dataclass(frozen=True)
class GroupPlan:
    """One Ray node type as Kubernetes sees it."""

    name: str
    cpus: float
    gpus: int
    memory_mib: int
    object_store_mib: int
    min_replicas: int
    max_replicas: int


def group_on(r: Replica, gpu_group: bool) -> str:
    """Where a replica lands: GPU deployments on GPU pods, the rest on CPU pods."""
    return "gpu" if gpu_group and r.num_gpus > 0 else "cpu"


def plan(variant: Variant, config: dict[str, Any], fp: Footprint) -> tuple[GroupPlan, list[GroupPlan]]:
    """Head and worker groups for ``config``: sized so every deployment's max replicas fit
    and every pod's memory covers its worst packing of measured replica footprints."""
    reps = replicas(config)
    proxies_everywhere = config.get("proxy_location", "EveryNode") == "EveryNode"
    groups = []
    names = ["cpu"] + (["gpu"] if variant.gpu_group else [])
    for name in names:
        mine = [r for r in reps if group_on(r, variant.gpu_group) == name]
        gpus = GPUS_PER_POD if name == "gpu" else 0
        if name == "gpu":
            # CPUs for as many GPU replicas as fit the pod's GPUs, no more: spare CPUs on a
            # GPU pod would draw CPU-only replicas onto it.
            cpus = max(sum(_fit(r, 1e9, gpus) * r.num_cpus for r in mine), 1)
        else:
            cpus = variant.cpu_pod_cpus
        replicas_mib = _worst_packing([(r, _private_mib(fp, r.name)) for r in mine], cpus, gpus)
        store_bytes = _worst_packing(
            [(r, r.max_ongoing * _store_bytes_per_request(config, r.name)) for r in mine],
            cpus, gpus)
        store_mib = max(RAY_MIN_OBJECT_STORE_MIB, int(math.ceil(store_bytes / MIB)))
        processes = fp.shared_libs + replicas_mib + fp.ray_worker + (
            fp.serve_actor if proxies_everywhere else 0)
        memory = _round_up((processes + store_mib) / RAY_MEMORY_THRESHOLD)

        def count(attr: str) -> int:
            return pods_needed([(r.num_cpus, r.num_gpus) for r in mine
                                for _ in range(getattr(r, attr))], cpus, gpus)

        groups.append(GroupPlan(name, cpus, gpus, memory, store_mib, max(count("min_replicas"), 1),
                                max(count("max_replicas"), 1)))
    # The head: Ray's own processes, the Serve controller and a proxy, and the one-shot task
    # that imports the app (serve_app + torch) to build it; no replicas (num-cpus: 0).
    head_processes = fp.ray_head + 2 * fp.serve_actor + fp.shared_libs + fp.ingress
    head_store = RAY_MIN_OBJECT_STORE_MIB
    head = GroupPlan("head", variant.head_cpus, 0,
                     _round_up((head_processes + head_store) / RAY_MEMORY_THRESHOLD),
                     head_store, 1, 1)
    return head, groups


# --------------------------------------------------------------------------- rendering ---


def pinned_ray_version(root: Path = ROOT) -> str:
    """The Ray version pyproject.toml pins (``ray[serve]==X``): what the image and rayVersion use."""
    text = (root / "pyproject.toml").read_text()
    match = re.search(r'"ray(?:\[[^\]]*\])?==([0-9][^"]*)"', text)
    if not match:
        raise ValueError("pyproject.toml does not pin ray (ray[serve]==X.Y.Z)")
    return match.group(1)


def default_image(root: Path = ROOT) -> str:
    """The image the Dockerfile builds, tagged with the Ray and Python it is based on."""
    version = re.search(r'^version = "([^"]+)"', (root / "pyproject.toml").read_text(), re.M)
    return f"{IMAGE_NAME}:{version.group(1)}-ray{pinned_ray_version(root)}-{PYTHON_TAG}-gpu"


def base_image(root: Path = ROOT) -> str:
    return f"rayproject/ray:{pinned_ray_version(root)}-{PYTHON_TAG}-gpu"


def serve_config(variant: Variant, root: Path = ROOT) -> dict[str, Any]:
    """The Serve config a variant deploys: its config file, with the settings Kubernetes
    needs (configs/gpu.yaml has the first two already):

    * proxies listen on all interfaces: a Service cannot reach 127.0.0.1 inside a pod;
    * a proxy on every node: KubeRay's readiness probe on worker pods asks the local proxy,
      so with HeadOnly every worker stays NotReady (kuberay#4994);
    * the API asks for a bearer token (``args.auth``), read from the Secret
      :data:`AUTH_SECRET` that every pod maps into :data:`AUTH_TOKEN_ENV`; health paths stay
      open for probes.
    """
    config = load(root / variant.config)
    for app in config.get("applications") or []:
        if app.get("import_path") == APP_IMPORT_PATH:
            args = app.setdefault("args", {})
            args.setdefault("auth", {"token_env": AUTH_TOKEN_ENV})
    http = config.get("http_options") or {}
    if http.get("host", "0.0.0.0") != "0.0.0.0":  # Serve's default is 0.0.0.0
        http["host"] = "0.0.0.0"
    if config.get("proxy_location") == "HeadOnly":
        config["proxy_location"] = "EveryNode"
    return config


#: The Secret (key ``token``) the API's bearer token comes from, and the variable it lands in:
#: ``kubectl create secret generic serve-app-api-token --from-literal=token=...``.
AUTH_SECRET = "serve-app-api-token"
AUTH_TOKEN_ENV = "SERVE_APP_API_TOKEN"


def _haproxy_env(env: dict[str, Any], shed: dict[str, Any] | None) -> dict[str, str]:
    """In HAProxy mode: the wrapper, the replay, and the edge shedding at ``shed``
    (haproxy_shedding.limits of the Serve config; none: not checked), as serve_app/runner.py
    sets them for ``make run``."""
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return {}
    if shed is None:
        return dict(HAPROXY_ENV)
    return {**HAPROXY_ENV, haproxy_shedding.LIMITS_ENV: json.dumps(shed, sort_keys=True)}


def _env(shed: dict[str, Any]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v}
                                 for k, v in {**RAY_CLUSTER_ENV, **WRITABLE_ENV,
                                              **_haproxy_env(RAY_CLUSTER_ENV, shed)}.items()]
    env.append({"name": AUTH_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": AUTH_SECRET, "key": "token"}}})
    return env


def _memory(mib: int) -> str:
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


# ------------------------------------------------------------------- pod security ---
#
# Every container runs as the image's non-root user with a read-only root filesystem, no
# privilege escalation, no capabilities and the runtime's default seccomp profile (the
# Kubernetes "restricted" Pod Security Standard). What Ray and serve_app write at run time goes
# to emptyDir volumes instead:
#
# * /tmp (node disk): Ray's session directory /tmp/ray (logs, Unix sockets, runtime envs,
#   objects spilled when the store is full), HAProxy's /tmp/haproxy-serve (its config, admin
#   and metrics sockets, server state), AOTInductor's extraction of a compiled model's .pt2
#   package (~20 MB with its .so, at every classifier start: it must allow exec, as emptyDir
#   does), torch Inductor's cache and g++'s temporary files while a replica builds an artifact,
#   and CUDA's JIT cache (CUDA_CACHE_PATH below; ~/.nv by default). No sizeLimit: spilled
#   objects and logs grow with traffic, and the kubelet evicts a pod whose emptyDir outgrows
#   its limit rather than fail one write; it is node ephemeral storage, as the container's
#   writable layer was.
# * /dev/shm (memory): the object store (see _pod).
# * ARTIFACT_DIR (node disk), only where compiled classifiers run: a copy of the artifacts the
#   image bakes, made by an init container, so a replica on a CPU the image was not built for
#   can build and install its own there (serve_app/artifacts.py) instead of serving eager.
#
# HOME (/home/ray) stays read-only: $TORCH_HOME's weights and the artifacts are only read;
# ~/.ray/auth_token is written only by a ray.init() that starts a new local cluster, never in
# these pods (KubeRay's authOptions passes Ray's token as the RAY_AUTH_TOKEN variable).

#: Where the Dockerfile bakes compiled artifacts (its ENV SERVE_APP_ARTIFACT_DIR; k8s check
#: holds the two equal) and where pods mount their writable copy.
ARTIFACT_DIR = "/home/ray/serve_app_artifacts"
ARTIFACT_SEED_MOUNT = "/mnt/serve_app_artifacts"
#: Paths under HOME that something writes to, redirected to the writable /tmp.
WRITABLE_ENV = {"CUDA_CACHE_PATH": "/tmp/cuda-cache"}
#: Where the Dockerfile installs serve_app's HAProxy error pages and the wrapper Ray runs as
#: HAProxy (serve_app/haproxy_errors.py): without it every 502/503/504 of HAProxy's reaches a
#: client as Ray's plain-text 500. The wrapper only reads there; it rewrites Ray's config in
#: /tmp/haproxy-serve.
HAPROXY_DIR = "/home/ray/serve_app_haproxy"
HAPROXY_ENV = {haproxy_errors.BINARY_ENV: f"{HAPROXY_DIR}/haproxy", **haproxy_replay.REPLAY_ENV}
#: What each container's securityContext must hold (after the pod's defaults apply).
CONTAINER_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID,
    "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
#: The pod's defaults, for containers KubeRay or someone else adds without their own.
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
    "seccompProfile": {"type": "RuntimeDefault"}}
# The init container that copies the baked artifacts: KubeRay's own init container's size,
# requests = limits so the pod stays Guaranteed (its request is the max of this and the rest).
SEED_RESOURCES = {"cpu": "200m", "memory": "256Mi"}
AUTOSCALER_TMP = "autoscaler-tmp"


def _container_security() -> dict[str, Any]:
    return copy.deepcopy(CONTAINER_SECURITY)


def _tmp_volume(name: str = "tmp") -> dict[str, Any]:
    return {"name": name, "emptyDir": {}}


def _artifact_seed(image: str) -> dict[str, Any]:
    """The init container that fills the writable artifact volume with the image's artifacts
    (a volume hides what the image has at its mount path). A missing directory is not fatal:
    replicas then build their own, as on a CPU the image was not built for."""
    copy_cmd = (f'cp -R -p {ARTIFACT_DIR}/. {ARTIFACT_SEED_MOUNT}/ || echo "no artifacts '
                f'baked at {ARTIFACT_DIR}: classifier replicas build their own"')
    return {"name": "seed-artifacts", "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["/bin/sh", "-c", copy_cmd],
            "resources": {"requests": dict(SEED_RESOURCES), "limits": dict(SEED_RESOURCES)},
            "securityContext": _container_security(),
            "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACT_SEED_MOUNT}]}


def _pod(group: GroupPlan, image: str, container: str, ports: dict[str, int],
         shed: dict[str, Any], extra: dict[str, Any] | None = None, artifacts: bool = False,
         volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    resources = {"cpu": _cpu(group.cpus), "memory": _memory(group.memory_mib)}
    if group.gpus:
        resources[GPU_RESOURCE] = group.gpus
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    spec: dict[str, Any] = {
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [{
            "name": container,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "env": _env(shed),
            "ports": [{"name": n, "containerPort": p} for n, p in ports.items()],
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            "securityContext": _container_security(),
            "volumeMounts": mounts + ([{"name": "artifacts", "mountPath": ARTIFACT_DIR}]
                                      if artifacts else []),
        }],
        # The object store lives in /dev/shm (the container runtime's default is 64 MiB);
        # Ray falls back to slow /tmp unless /dev/shm has object-store-memory free
        # (services.determine_plasma_store_config), so it gets the store rounded up to the
        # 256 MiB step: the rest is headroom for the few small files besides (multiprocessing
        # semaphores). Its pages count against the container's memory limit once written,
        # which budgets for the store (plan()), so the limit also keeps it within that budget.
        "volumes": [{"name": "dshm", "emptyDir": {
            "medium": "Memory", "sizeLimit": _memory(_round_up(group.object_store_mib))}},
            _tmp_volume(), *(volumes or [])] + (
            [{"name": "artifacts", "emptyDir": {}}] if artifacts else []),
    }
    if artifacts:
        spec["initContainers"] = [_artifact_seed(image)]
    spec.update(extra or {})
    return {"metadata": {"labels": dict(POD_LABELS), "annotations": {
                "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                "prometheus.io/path": "/metrics"}},
            "spec": spec}


def artifact_groups(variant: Variant, config: dict[str, Any]) -> set[str]:
    """The worker groups whose classifiers load (and may build) compiled artifacts."""
    if not (_args(config).get("model") or {}).get("compile"):
        return set()
    return {group_on(r, variant.gpu_group) for r in replicas(config) if r.name == "Classifier"}


def _cpu(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(round(cpus * 1000))}m"


def manifest(variant: Variant, root: Path = ROOT, image: str | None = None) -> dict[str, Any]:
    """The RayService for ``variant``, as a dict."""
    config = serve_config(variant, root)
    fp = FOOTPRINTS[variant.config]
    head, groups = plan(variant, config, fp)
    image = image or default_image(root)
    port = (config.get("http_options") or {}).get("port", SERVE_PORT)
    head_ports = dict(HEAD_PORTS, serve=port, metrics=METRICS_PORT)
    compiled = artifact_groups(variant, config)
    shed = haproxy_shedding.limits(config)  # once: it validates the whole Serve config
    workers = []
    for g in groups:
        extra = None
        if g.gpus:
            extra = {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists",
                                      "effect": "NoSchedule"}],
                     "nodeSelector": {"nvidia.com/gpu.present": "true"}}
        workers.append({
            "groupName": g.name,
            # Ray node labels (KubeRay passes them to `ray start --labels`): the deployments'
            # label_selectors keep CPU-only replicas off GPU pods (serve_app/placement.py).
            "labels": {placement.POOL_LABEL: g.name},
            "replicas": g.min_replicas,
            "minReplicas": g.min_replicas,
            "maxReplicas": g.max_replicas,
            "rayStartParams": {"object-store-memory": str(g.object_store_mib * MIB),
                               "metrics-export-port": str(METRICS_PORT)},
            "template": _pod(g, image, "ray-worker", {"serve": port, "metrics": METRICS_PORT},
                             shed, extra, artifacts=g.name in compiled),
        })
    name = "serve-app" if variant.name == "gpu" else f"serve-app-{variant.name}"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "serve-app",
                                              "app.kubernetes.io/component": variant.name}},
        "spec": {
            # A rayClusterConfig change brings up a whole new cluster and switches traffic once
            # its Serve apps are healthy; a serveConfigV2-only change updates in place.
            "upgradeStrategy": {"type": "NewCluster"},
            # With a proxy on every node, keep HTTP off the head: it runs the control plane.
            "excludeHeadPodFromServeSvc": config.get("proxy_location", "EveryNode") == "EveryNode",
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False, width=100),
            "rayClusterConfig": {
                "rayVersion": pinned_ray_version(root),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": IDLE_TIMEOUT_S,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {"requests": dict(AUTOSCALER_RESOURCES),
                                  "limits": dict(AUTOSCALER_RESOURCES)},
                    # The sidecar runs in the head pod with the head's image: hardened the
                    # same way, with a /tmp of its own (KubeRay mounts its log volume at
                    # /tmp/ray, shared with the head, over it).
                    "securityContext": _container_security(),
                    "volumeMounts": [{"name": AUTOSCALER_TMP, "mountPath": "/tmp"}],
                },
                "headGroupSpec": {
                    "labels": {placement.POOL_LABEL: "head"},
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "object-store-memory": str(head.object_store_mib * MIB),
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": _pod(head, image, "ray-head", head_ports, shed,
                                     volumes=[_tmp_volume(AUTOSCALER_TMP)]),
                },
                "workerGroupSpecs": workers,
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(root: Path = ROOT, image: str | None = None) -> dict[str, str]:
    """Every generated file under k8s/: relative path -> text."""
    out = {}
    for v in VARIANTS:
        header = (f"# GENERATED from {v.config} by `make k8s` (python -m serve_app k8s render).\n"
                  f"# Do not edit: change {v.config} or serve_app/k8s.py and regenerate.\n"
                  f"# kubectl apply -f {v.output}    (docs/kubernetes.md)\n")
        out[v.output] = header + yaml.dump(manifest(v, root, image), Dumper=_Dumper,
                                           sort_keys=False, width=100)
    out[PODMONITOR_PATH] = (
        "# GENERATED from configs/ by `make k8s` (python -m serve_app k8s render). Do not edit.\n"
        "# Prometheus Operator: scrape Ray's metrics port on every serve_app pod of every\n"
        "# variant (docs/observability.md). Without the Operator, the pods' prometheus.io/*\n"
        "# annotations serve the same purpose.\n"
        + yaml.dump(podmonitor(), Dumper=_Dumper, sort_keys=False, width=100))
    return out


def podmonitor() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "serve-app", "labels": dict(POD_LABELS)},
        "spec": {
            "selector": {"matchLabels": {**POD_LABELS, "ray.io/is-ray-node": "yes"}},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                     # Ray's pods carry their cluster and node type: keep them.
                                     "relabelings": [
                                         {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                                          "targetLabel": "ray_io_cluster"},
                                         {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"],
                                          "targetLabel": "ray_io_node_type"}]}],
        },
    }


def metrics_errors(doc: dict[str, Any], monitor: dict[str, Any] | None) -> list[str]:
    """Every pod exports Ray's metrics on the port the PodMonitor scrapes."""
    errors = []
    cluster = doc["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"],
              **{g["groupName"]: g for g in cluster.get("workerGroupSpecs") or []}}
    endpoint = ((monitor or {}).get("spec", {}).get("podMetricsEndpoints") or [{}])[0]
    selector = (monitor or {}).get("spec", {}).get("selector", {}).get("matchLabels", {})
    if monitor is None:
        errors.append(f"{PODMONITOR_PATH} is missing: run `make k8s`")
    for name, pod, container in _containers(doc):
        params = groups[name].get("rayStartParams") or {}
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        if str(params.get("metrics-export-port")) != str(ports.get("metrics")):
            errors.append(f"{name}: container port 'metrics' must be rayStartParams "
                          "metrics-export-port")
        labels = {**(groups[name]["template"].get("metadata") or {}).get("labels", {}),
                  "ray.io/is-ray-node": "yes"}  # KubeRay adds it to every Ray pod
        if monitor is not None and not all(labels.get(k) == v for k, v in selector.items()):
            errors.append(f"{name}: pod labels {labels} do not match the PodMonitor's selector")
        if monitor is not None and endpoint.get("port") not in ports:
            errors.append(f"{name}: no container port named {endpoint.get('port')!r} to scrape")
    return errors


def write(root: Path = ROOT, out_dir: Path | None = None, image: str | None = None) -> list[Path]:
    written = []
    for rel, text in render(root, image).items():
        path = (out_dir / Path(rel).name) if out_dir else root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- checking ---


def stale(root: Path = ROOT) -> list[str]:
    """Files under k8s/ that differ from a fresh render (with the first lines of the diff)."""
    problems = []
    for rel, text in render(root).items():
        path = root / rel
        current = path.read_text() if path.exists() else ""
        if current != text:
            diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(),
                                             f"{rel} (on disk)", f"{rel} (rendered)", lineterm=""))
            problems.append(f"{rel} is out of date with its config: run `make k8s`\n"
                            + "\n".join(diff[:40]))
    return problems


def crd_schema(crd_dir: Path, kind: str = "RayService") -> dict[str, Any]:
    """The v1 openAPIV3Schema of KubeRay's CRD for ``kind``, made strict like ``kubectl apply``
    (--validate=strict, the default): unknown fields are errors, not silently pruned.

    Int-or-string fields (``x-kubernetes-int-or-string``, e.g. resource quantities: "1" or 1)
    accept both; the CRD spells that as anyOf, which is added where it is missing.
    """
    return copy.deepcopy(_crd_schema(str(Path(crd_dir).resolve()), kind))


@functools.lru_cache(maxsize=4)
def _crd_schema(crd_dir: str, kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 1 MB of YAML: 0.2 s instead of 6
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        if (isinstance(crd, dict) and crd.get("kind") == "CustomResourceDefinition"
                and crd["spec"]["names"]["kind"] == kind):
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            return _strict(version["schema"]["openAPIV3Schema"])
    raise FileNotFoundError(f"no CustomResourceDefinition for {kind} in {crd_dir}")


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


def schema_errors(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    """Where ``doc`` breaks the CRD schema (jsonschema; CEL rules are not evaluated)."""
    import jsonschema

    schema = _crd_schema(str(Path(crd_dir).resolve()), doc.get("kind", "RayService"))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "4", 2, "8Gi", "512Mi") as a number (CPUs or bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3, "Ti": 1024 ** 4,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def _groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head ("head") and each worker group."""
    cluster = doc["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs") or []]


def _containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, pod spec, ray container) for the head and each worker group."""
    return [(name, g["template"]["spec"], g["template"]["spec"]["containers"][0])
            for name, g in _groups(doc)]


def artifact_errors(dockerfile_text: str, config: str) -> list[str]:
    """A compiled config's image must carry its artifact, in the directory pods look in: a pod
    without one serves the eager network until it has compiled its own (a minute or more of a
    core, per pod)."""
    errors = []
    if not re.search(rf"^RUN\s+python -m serve_app compile\b[^\n]*\s{re.escape(config)}\b",
                     dockerfile_text, re.M):
        errors.append(f"{config} serves a compiled model (model.compile: true) but the "
                      f"Dockerfile does not bake its artifact: add `RUN python -m serve_app "
                      f"compile {config}`")
    baked = re.search(r"^ENV\b[^#]*?\bSERVE_APP_ARTIFACT_DIR=(\S+)", dockerfile_text,
                      re.M | re.S)
    if not baked:
        errors.append("the Dockerfile does not set ENV SERVE_APP_ARTIFACT_DIR: baked artifacts "
                      "would land in the build user's home cache, not where pods look")
    elif baked.group(1) != ARTIFACT_DIR:
        errors.append(f"the Dockerfile's SERVE_APP_ARTIFACT_DIR is {baked.group(1)}, but pods "
                      f"copy baked artifacts from and mount their writable copy at "
                      f"{ARTIFACT_DIR} (serve_app/k8s.py ARTIFACT_DIR): make them agree")
    return errors


def haproxy_page_errors(doc: dict[str, Any], dockerfile_text: str) -> list[str]:
    """Pods that run HAProxy must run it through serve_app's wrapper, installed by the image,
    with the shedding limits of the serveConfigV2 they serve."""
    from serve_app.config import ConfigError

    errors, uses = [], False
    try:
        shed = haproxy_shedding.limits(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    except ConfigError:  # reported on its own (consistency_errors); the limits are moot
        shed = None
    for name, _, ray in _containers(doc):
        env = {e.get("name"): e.get("value") for e in ray.get("env") or []}
        for var, want in _haproxy_env(env, shed).items():
            uses = True
            if env.get(var) != want:
                errors.append(f"{name}/{ray.get('name')}: HAProxy mode without serve_app's "
                              f"HAProxy settings: env {var} must be {want} (without them a "
                              "502/503/504 is Ray's plain-text 500, what a dying ingress held "
                              "is dropped, and refusals wait for the ingress): `make k8s`")
    if uses and not re.search(rf"^RUN\s+python -m serve_app\.haproxy_errors install "
                              rf"{re.escape(HAPROXY_DIR)}\s*$", dockerfile_text, re.M):
        errors.append(f"the pods run HAProxy through {HAPROXY_ENV[haproxy_errors.BINARY_ENV]}, "
                      f"but the Dockerfile does not install it: add `RUN python -m "
                      f"serve_app.haproxy_errors install {HAPROXY_DIR}`")
    return errors


def dockerfile_user_errors(dockerfile_text: str) -> list[str]:
    """The image's user must be the one the pods run as: the files it bakes (weights,
    artifacts) are then that user's, and nothing relies on root at build or run time."""
    users = re.findall(r"^USER\s+(\S+)", dockerfile_text, re.M)
    expected = {str(RAY_UID), f"{RAY_UID}:{RAY_GID}", "ray", "ray:users"}
    if users and users[-1] not in expected:
        return [f"the Dockerfile's last USER is {users[-1]}, not {RAY_UID}:{RAY_GID}, the "
                "user the pods run as (runAsUser/runAsGroup)"]
    return []


# ------------------------------------------------------------------ checking security ---


def _security_problems(effective: dict[str, Any]) -> list[str]:
    """What ``effective`` (a container's securityContext over its pod's) lacks of
    :data:`CONTAINER_SECURITY`; ``privileged`` and added capabilities are refused outright."""
    problems = []
    for key, want in CONTAINER_SECURITY.items():
        have = effective.get(key)
        if key == "capabilities":
            if "ALL" not in ((have or {}).get("drop") or []):
                problems.append(f"capabilities.drop must include ALL (found {have})")
            if (have or {}).get("add"):
                problems.append(f"capabilities.add must be empty (found {have['add']})")
        elif have != want:
            problems.append(f"{key} must be {want} (found {have})")
    if effective.get("privileged"):
        problems.append("privileged must not be true")
    return problems


def _effective_security(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """A container's securityContext as Kubernetes applies it: its own fields over the pod's."""
    pod_sc = pod.get("securityContext") or {}
    inherited = {k: pod_sc[k] for k in ("runAsNonRoot", "runAsUser", "runAsGroup",
                                        "seccompProfile") if k in pod_sc}
    return {**inherited, **(container.get("securityContext") or {})}


def _writable_mount(pod: dict[str, Any], container: dict[str, Any], path: str
                    ) -> dict[str, Any] | None:
    """The emptyDir ``container`` mounts read-write at ``path`` (None: none there)."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for m in container.get("volumeMounts") or []:
        if m.get("mountPath") == path and not m.get("readOnly"):
            empty = (volumes.get(m.get("name")) or {}).get("emptyDir")
            if empty is not None:
                return {**empty, "name": m["name"]}
    return None


def _seeded(pod: dict[str, Any], ray: dict[str, Any]) -> bool:
    """``ray`` has a writable ARTIFACT_DIR that one of the pod's init containers fills."""
    volume = _writable_mount(pod, ray, ARTIFACT_DIR)
    return volume is not None and any(
        (_writable_mount(pod, c, ARTIFACT_SEED_MOUNT) or {}).get("name") == volume["name"]
        for c in pod.get("initContainers") or [])


def security_errors(doc: dict[str, Any], compiled_groups: Iterable[str] = ()) -> list[str]:
    """Every container (Ray's, init containers, the autoscaler) non-root, read-only root
    filesystem, no privilege escalation, no capabilities, RuntimeDefault seccomp; Ray's
    containers with writable /tmp; where classifiers run compiled, a writable artifact dir
    seeded from the image. Each error names the group/container and the setting."""
    errors: list[str] = []
    cluster, compiled = doc["spec"]["rayClusterConfig"], set(compiled_groups)
    for name, pod, ray in _containers(doc):
        pod_sc = pod.get("securityContext") or {}
        for key, want in POD_SECURITY.items():
            if pod_sc.get(key) != want:
                errors.append(f"{name}: pod securityContext.{key} must be {want} "
                              f"(found {pod_sc.get(key)})")
        containers = [(c, "") for c in pod.get("containers") or []] + [
            (c, " (init)") for c in pod.get("initContainers") or []]
        for c, kind in containers:
            errors += [f"{name}/{c.get('name')}{kind}: securityContext.{p}"
                       for p in _security_problems(_effective_security(pod, c))]
        where = f"{name}/{ray.get('name')}"
        tmp = _writable_mount(pod, ray, "/tmp")
        if tmp is None or tmp.get("medium") == "Memory":
            errors.append(f"{where}: the root filesystem is read-only, so /tmp must be a "
                          "writable disk emptyDir (Ray's /tmp/ray, HAProxy's /tmp/haproxy-serve,"
                          " AOTInductor's extracted packages)")
        env = {e.get("name"): e.get("value") for e in ray.get("env") or []}
        for var, path in WRITABLE_ENV.items():
            if env.get(var) != path:
                errors.append(f"{where}: env {var} must be {path} (on the writable /tmp; its "
                              f"default is under the read-only HOME)")
        if name in compiled and not _seeded(pod, ray):
            errors.append(f"{where}: compiled classifiers run here, so {ARTIFACT_DIR} must be "
                          f"a writable emptyDir that an init container fills with the image's "
                          f"artifacts (mounted at {ARTIFACT_SEED_MOUNT}): a replica on another "
                          "CPU builds its own there")
    head = cluster["headGroupSpec"]["template"]["spec"]
    auto = cluster.get("autoscalerOptions") or {}
    if cluster.get("enableInTreeAutoscaling"):
        sidecar = {"name": "autoscaler", "securityContext": auto.get("securityContext"),
                   "volumeMounts": auto.get("volumeMounts")}
        errors += [f"head/autoscaler: autoscalerOptions.securityContext.{p}"
                   for p in _security_problems(_effective_security(head, sidecar))]
        if _writable_mount(head, sidecar, "/tmp") is None:
            errors.append("head/autoscaler: autoscalerOptions.volumeMounts must mount a "
                          "writable emptyDir of the head pod at /tmp (read-only root filesystem)")
    return errors


def consistency_errors(doc: dict[str, Any], variant: Variant, root: Path = ROOT) -> list[str]:
    """What KubeRay's schema cannot see: versions, resources against the Serve config's
    replicas and the measured footprints, GPU scheduling, the object store, security."""
    errors: list[str] = []
    spec, cluster = doc["spec"], doc["spec"]["rayClusterConfig"]
    ray_version = pinned_ray_version(root)

    config = yaml.safe_load(spec["serveConfigV2"])
    expected = serve_config(variant, root)
    if config != expected:
        errors.append(f"serveConfigV2 is not the Serve config of {variant.config} "
                      "(host 0.0.0.0, proxies on every node): regenerate with `make k8s`")
    if not isinstance(config, dict) or not config.get("applications"):
        return errors + ["serveConfigV2 has no applications"]
    from serve_app.config import ConfigError
    from serve_app.configfile import check

    try:
        check(config, f"{variant.output}: serveConfigV2")
    except ConfigError as exc:
        errors.append(str(exc))
    host = (config.get("http_options") or {}).get("host", "0.0.0.0")
    if host != "0.0.0.0":
        errors.append(f"serveConfigV2 http_options.host is {host}: a Service cannot reach it")
    if config.get("proxy_location") == "HeadOnly":
        errors.append("proxy_location HeadOnly: KubeRay's readiness probe keeps every worker "
                      "pod NotReady without a local proxy (kuberay#4994); use EveryNode")
    for app in config["applications"]:
        auth = (app.get("args") or {}).get("auth")
        if app.get("import_path") == APP_IMPORT_PATH and (
                auth is None or auth.get("token_env", AUTH_TOKEN_ENV) != AUTH_TOKEN_ENV):
            errors.append(f"application {app.get('name')!r} does not require the API token "
                          f"(args.auth.token_env {AUTH_TOKEN_ENV}): the Service would be open")

    if cluster.get("rayVersion") != ray_version:
        errors.append(f"rayVersion {cluster.get('rayVersion')} is not the pinned Ray {ray_version}")
    dockerfile = root / "Dockerfile"
    dockerfile_text = dockerfile.read_text() if dockerfile.exists() else ""
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile_text, re.M)
    if froms[:1] != [base_image(root)]:
        errors.append(f"Dockerfile is not FROM {base_image(root)} (found {froms[:1]})")

    fp = FOOTPRINTS.get(variant.config)
    settings = _args(config)
    model = settings.get("model", {})
    if model.get("compile") and not re.search(r"apt-get install[^\n]*\bg\+\+", dockerfile_text):
        errors.append(f"{variant.config} compiles the model (model.compile: true), which needs "
                      "g++ in the image; the Dockerfile does not apt-get install it")
    if model.get("compile"):
        errors += artifact_errors(dockerfile_text, variant.config)
    errors += dockerfile_user_errors(dockerfile_text)
    errors += haproxy_page_errors(doc, dockerfile_text)
    try:
        compiled = artifact_groups(variant, config)
    except ValueError:  # a deployment without num_cpus: reported below
        compiled = set()
    errors += security_errors(doc, compiled)
    classifier = deployment_options(config["applications"][0], "Classifier")
    measured = (model.get("name"), bool(model.get("compile", False)),
                settings.get("max_image_pixels"),
                (classifier.get("user_config") or {}).get("max_batch_size"))
    sized = fp and (fp.model, fp.compile, fp.max_image_pixels, fp.max_batch_size)
    if measured != sized:
        errors.append(f"{variant.config} now serves {measured} (model, compile, "
                      f"max_image_pixels, max_batch_size) but pods are sized for {sized}: "
                      f"run k8s/measure_footprint.py --config {variant.config} and update FOOTPRINTS")
        return errors

    head_params = cluster["headGroupSpec"].get("rayStartParams") or {}
    if str(head_params.get("num-cpus")) != "0":
        errors.append('the head must take no replicas: rayStartParams num-cpus: "0"')
    if not cluster.get("enableInTreeAutoscaling"):
        errors.append("enableInTreeAutoscaling is off: Serve replicas would never get new pods")
    auto = cluster.get("autoscalerOptions") or {}
    for key in ("idleTimeoutSeconds", "upscalingMode", "resources"):
        if key not in auto:
            errors.append(f"autoscalerOptions.{key} is not set")

    pods: dict[str, dict[str, float]] = {}
    for name, pod, container in _containers(doc):
        image = container.get("image", "")
        if f"ray{ray_version}-{PYTHON_TAG}" not in image.rsplit(":", 1)[-1]:
            errors.append(f"{name}: image {image} is not tagged for Ray {ray_version} / {PYTHON_TAG}")
        res = container.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        for key in ("cpu", "memory"):
            if key not in limits or quantity(requests.get(key, -1)) != quantity(limits[key]):
                errors.append(f"{name}: {key} requests must equal limits (Guaranteed QoS)")
        secret = next((e["valueFrom"]["secretKeyRef"] for e in container.get("env") or []
                       if e.get("name") == AUTH_TOKEN_ENV and "valueFrom" in e), None)
        if secret != {"name": AUTH_SECRET, "key": "token"}:
            errors.append(f"{name}: {AUTH_TOKEN_ENV} must come from Secret {AUTH_SECRET} "
                          "(key token): args.auth reads the API token from it")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                errors.append(f"{name}: {probe} is KubeRay's to inject; remove it")
        shm = [v for v in pod.get("volumes") or []
               if (v.get("emptyDir") or {}).get("medium") == "Memory"]
        mounted = {m["name"] for m in container.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"}
        params = (cluster["headGroupSpec"] if name == "head" else next(
            g for g in cluster["workerGroupSpecs"] if g["groupName"] == name)).get("rayStartParams") or {}
        store = float(params.get("object-store-memory", 0))
        if not any(v["name"] in mounted and quantity(v["emptyDir"].get("sizeLimit", 0)) >= store
                   for v in shm):
            errors.append(f"{name}: /dev/shm must be a memory-backed emptyDir at least as large "
                          "as object-store-memory")
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        if name == "head" and ports.get("serve") != (config.get("http_options") or {}).get("port", SERVE_PORT):
            errors.append("head: container port 'serve' must be the Serve HTTP port")
        pods[name] = {"cpu": quantity(limits.get("cpu", 0)), "memory": quantity(limits.get("memory", 0)),
                      "gpu": quantity(limits.get(GPU_RESOURCE, 0)), "store": store}

    try:
        reps = replicas(config)
        head_plan, plans = plan(variant, config, fp)
    except ValueError as exc:
        return errors + [str(exc)]
    workers = {g["groupName"]: g for g in cluster.get("workerGroupSpecs") or []}
    for p in [head_plan, *plans]:
        if p.name not in pods:
            errors.append(f"no worker group {p.name!r}")
            continue
        have = pods[p.name]
        if have["memory"] < p.memory_mib * MIB:
            errors.append(f"{p.name}: memory {have['memory'] / MIB:.0f} MiB is below the worst "
                          f"packing of measured footprints ({p.memory_mib} MiB)")
        if p.name == "head":
            continue
        group = workers[p.name]
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            errors.append(f"{p.name}: replicas must lie within [minReplicas, maxReplicas]")
        mine = [r for r in reps if group_on(r, variant.gpu_group) == p.name]
        if p.name == "gpu":
            gpus = sum(r.num_gpus * r.max_replicas for r in mine)
            if gpus > group["maxReplicas"] * have["gpu"] + 1e-6:
                errors.append(f"gpu: max replicas need {gpus:g} GPUs; the group has at most "
                              f"{group['maxReplicas']} pods x {have['gpu']:g}")
            tol = [t for t in pod_spec(group).get("tolerations") or [] if t.get("key") == GPU_RESOURCE]
            if not tol:
                errors.append(f"gpu: no toleration for the {GPU_RESOURCE} taint")
            if not pod_spec(group).get("nodeSelector"):
                errors.append("gpu: no nodeSelector for GPU nodes")
            for r in mine:
                per_pod = _fit(r, 1e9, have["gpu"])
                if per_pod * r.num_cpus > have["cpu"] + 1e-6:
                    errors.append(f"gpu: {per_pod} {r.name} replicas share a pod's GPUs but need "
                                  f"{per_pod * r.num_cpus:g} CPUs; the pod has {have['cpu']:g}")
        try:
            need = pods_needed([(r.num_cpus, r.num_gpus) for r in mine for _ in range(r.max_replicas)],
                               have["cpu"], have["gpu"])
        except ValueError as exc:
            errors.append(f"{p.name}: {exc}")
            continue
        if need > group["maxReplicas"]:
            errors.append(f"{p.name}: max replicas of {[r.name for r in mine]} need {need} pods "
                          f"of {have['cpu']:g} CPUs; maxReplicas is {group['maxReplicas']}")
    return errors


def pod_spec(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]


def node_types(doc: dict[str, Any]) -> list[placement.NodeType]:
    """The Ray node types a RayService's groups make: labels, logical CPUs and GPUs as Ray
    counts them (``num-cpus`` in rayStartParams, else the container's CPU limit)."""
    out = []
    for name, group in _groups(doc):
        limits = (pod_spec(group)["containers"][0].get("resources") or {}).get("limits") or {}
        params = group.get("rayStartParams") or {}
        cpus = float(params["num-cpus"]) if "num-cpus" in params else quantity(limits.get("cpu", 0))
        gpus = float(params["num-gpus"]) if "num-gpus" in params else quantity(
            limits.get(GPU_RESOURCE, 0))
        out.append(placement.NodeType(name, dict(group.get("labels") or {}), cpus, gpus))
    return out


def placement_errors(doc: dict[str, Any], variant: Variant) -> list[str]:
    """Every deployment fits some group (labels and resources), and only the group its pods
    were sized for: a replica that could also land elsewhere breaks the sizing."""
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    nodes = node_types(doc)
    errors = placement.placement_errors(config, nodes)
    by_name = {r.name: r for r in replicas(config)}
    for p in placement.placements(config):
        planned = group_on(by_name[p.deployment], variant.gpu_group)
        others = [n.name for n in nodes if n.name != planned and p.fits(n)]
        if others:
            errors.append(f"deployment {p.deployment}: replicas can land on {others} besides "
                          f"the {planned!r} group its pods are sized for: give it a "
                          f"ray_actor_options.label_selector on {placement.POOL_LABEL}")
    return errors


def check(root: Path = ROOT, crd_dir: Path | None = None) -> list[str]:
    """Every problem with the checked-in manifests; CRD validation only with ``crd_dir``."""
    problems = stale(root)
    for v in VARIANTS:
        path = root / v.output
        if not path.exists():
            continue
        doc = yaml.safe_load(path.read_text())
        problems += [f"{v.output}: {e}" for e in consistency_errors(doc, v, root)]
        monitor_path = root / PODMONITOR_PATH
        monitor = yaml.safe_load(monitor_path.read_text()) if monitor_path.exists() else None
        problems += [f"{v.output}: {e}" for e in metrics_errors(doc, monitor)]
        problems += [f"{v.output}: placement: {e}" for e in placement_errors(doc, v)]
        if crd_dir is not None:
            problems += [f"{v.output}: CRD schema: {e}" for e in schema_errors(doc, crd_dir)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app k8s",
                                     description="Render or check the KubeRay manifests in k8s/.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="regenerate k8s/ from configs/")
    r.add_argument("--image", help=f"image for every pod (default {default_image()})")
    r.add_argument("--out", type=Path, help="write here instead of k8s/ (e.g. for --image)")
    c = sub.add_parser("check", help="k8s/ up to date, consistent, and valid for KubeRay's CRDs")
    c.add_argument("--crd-dir", type=Path, default=os.environ.get("KUBERAY_CRD_DIR") or None,
                   help="KubeRay CRD YAMLs (default $KUBERAY_CRD_DIR; skipped when unset)")
    args = parser.parse_args(argv)
    if args.command == "render":
        for path in write(ROOT, args.out, args.image):
            print(f"wrote {path}")
        return 0
    problems = check(ROOT, args.crd_dir)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        where = f"CRD schema from {args.crd_dir}" if args.crd_dir else "no CRD schema (KUBERAY_CRD_DIR unset)"
        print(f"k8s: ok ({', '.join(v.output for v in VARIANTS)}; {where})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
