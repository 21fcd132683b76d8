# serve_app: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=
# HAProxy in front of the ingress replicas instead of Ray's Python proxy (serve_app/launch.py,
# RAY_CLUSTER_ENV); HA_PROXY=0 for Ray's proxy.
HA_PROXY ?= 1

.PHONY: install install-test run check test test-unit bench k8s clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The shared first step: the project with its test and load-test extras.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'

check: install
	$(BIN)/python -m serve_app check configs/*.yaml

# Serve CONFIG in the foreground on 127.0.0.1:8000; Ctrl-C stops the service and Ray.
run: install
	$(BIN)/python -m serve_app check $(CONFIG)
	RAY_ADDRESS=local RAY_SERVE_ENABLE_HA_PROXY=$(HA_PROXY) $(BIN)/serve run $(CONFIG)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m load_tests.bench --config $(CONFIG)

# Regenerate k8s/ (the KubeRay RayServices) from configs/, then check them (docs/kubernetes.md).
k8s: install
	$(BIN)/python -m serve_app k8s render
	$(BIN)/python -m serve_app k8s check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
