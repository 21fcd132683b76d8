"""``python -m serve_app compile CONFIG...``: build, ahead of time, the compiled model each
classifier of a config will load, on the machine (or image) it will run on."""

from __future__ import annotations

import sys
import time
from typing import Iterator

import torch

from serve_app import topology
from serve_app.artifacts import Artifact
from serve_app.config import ConfigError, ModelConfig
from serve_app.configfile import check, deployment_options, load
from serve_app.runtime import cpu_threads


def artifacts_of(data: dict, source: str = "config"
                 ) -> Iterator[tuple[str, ModelConfig, torch.device, int]]:
    """(application, model, device, threads) of each compiled classifier in a Serve config,
    with the device and thread count its replicas will have (their share of CPUs and GPUs)."""
    parsed = {name: settings for name, settings, _ in check(data, source)}
    for app in data["applications"]:
        settings = parsed.get(app.get("name", "default"))
        if settings is None:
            continue
        for route in topology.plan(settings):
            if not route.model.compile:
                continue
            options = deployment_options(app, route.classifier)
            resources = options.get("ray_actor_options") or {}
            device = torch.device("cuda" if resources.get("num_gpus", 0) > 0 else "cpu")
            # As Classifier.__init__: threads from the CPU share (Ray's default share is 1 CPU).
            threads = cpu_threads({"CPU": resources.get("num_cpus", 1)})
            yield app.get("name", "default"), route.model, device, threads


def compile_configs(paths: list[str]) -> int:
    status = 0
    for path in paths:
        try:
            status |= compile_config(load(path), str(path))
        except (ConfigError, OSError) as exc:
            print(exc, file=sys.stderr)
            status = 1
    return status


def compile_config(data: dict, path: str = "config") -> int:
    """Build what one loaded Serve config needs; 0 when everything it needs is built."""
    status = 0
    found = list(artifacts_of(data, path))
    if not found:
        print(f"{path}: nothing to compile (no classifier has model.compile: true)")
    for app, model, device, threads in found:
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"{path}: {app}: skipped, its classifier runs on a GPU and this machine "
                  "has none (its first replica on a GPU node builds it)")
            continue
        artifact = Artifact.of(model, device, threads)
        started = time.perf_counter()
        try:
            built = artifact.build(model, device)
        except Exception as exc:
            print(f"{path}: {app}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
            continue
        what = f"built in {time.perf_counter() - started:.1f}s" if built else "already built"
        print(f"{path}: {app}: {model.id} ({device.type}, {threads} threads) {what}: "
              f"{artifact.path}")
    return status
