# serve_app: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=
# HAProxy in front of the ingress replicas instead of Ray's Python proxy (serve_app/launch.py,
# RAY_CLUSTER_ENV); HA_PROXY=0 for Ray's proxy.
HA_PROXY ?= 1
# Ray's Prometheus endpoint for `make run` (http://127.0.0.1:$(METRICS_PORT)/metrics) and the
# Prometheus that `make monitor` starts against it (docs/observability.md).
METRICS_PORT ?= 8080
PROMETHEUS_PORT ?= 9090

.PHONY: install install-test run check test test-unit bench k8s dashboard monitor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The shared first step: the project with its test and load-test extras.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'

check: install
	$(BIN)/python -m serve_app check configs/*.yaml

# Serve CONFIG in the foreground on 127.0.0.1:8000; Ctrl-C stops the service and Ray.
# `serve run` with Ray's metrics on a fixed port (serve_app/runner.py).
run: install
	$(BIN)/python -m serve_app check $(CONFIG)
	RAY_ADDRESS=local RAY_SERVE_ENABLE_HA_PROXY=$(HA_PROXY) \
	  $(BIN)/python -m serve_app run $(CONFIG) --metrics-port $(METRICS_PORT)

# Prometheus (Debian's package: apt-get install prometheus) on 127.0.0.1:$(PROMETHEUS_PORT),
# scraping `make run`; in the foreground, Ctrl-C stops it. Data in .prometheus/.
monitor:
	@command -v prometheus >/dev/null || { echo "prometheus not found: apt-get install prometheus" >&2; exit 1; }
	sed 's/127.0.0.1:8080/127.0.0.1:$(METRICS_PORT)/' monitoring/prometheus.yml > .prometheus.yml
	prometheus --config.file=.prometheus.yml --web.listen-address=127.0.0.1:$(PROMETHEUS_PORT) \
	  --storage.tsdb.path=.prometheus

# Regenerate monitoring/grafana/serve_app.json from serve_app/dashboard.py.
dashboard: install
	$(BIN)/python -m serve_app dashboard

# The whole suite; the 25 slowest tests are listed at the end of every run. One process: the
# cluster tests are CPU-bound on 2 cores (two pytest-xdist workers took 19.8 min against
# ~21 serially, each test twice as slow beside the other).
test: install
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

# The inner loop: no cluster started, under 2 minutes.
test-unit: install
	$(BIN)/python -m pytest tests/unit --durations=10 $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m load_tests.bench --config $(CONFIG)

# Regenerate k8s/ (the KubeRay RayServices) from configs/, then check them (docs/kubernetes.md).
k8s: install
	$(BIN)/python -m serve_app k8s render
	$(BIN)/python -m serve_app k8s check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
