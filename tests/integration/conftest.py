"""A real Serve cluster on loopback, started from configs/local.yaml by `serve run` (its model
served eager: no compile in the background of the run).

Besides the default application at "/", the test config adds two small applications to the
same cluster (one cluster start instead of three):
- "/exact": resnet18 with random weights, to prove the served scores equal an in-process
  forward for a torchvision model;
- "/mobilenet": mobilenet_v2 with the real weights file named by
  SERVE_APP_TEST_MOBILENET_V2_WEIGHTS (added only when that variable is set);
- "/multi": configs/multi-model.yaml (EfficientNet-Lite0 and -Lite2, real weights), eager and
  small, its classifiers still autoscaling (tests/integration/test_multi_model.py);
- "/sim": configs/autoscale-sim.yaml's simulated accelerator, one replica each, with its
  latency profile (tests/integration/test_simulated.py).

The cluster gets 5 logical CPUs for the applications' small shares: room for "/multi" to add a
classifier replica, and for the default application's Classifier (0.8) to scale to 2 and
surge during a redeploy (tests/integration/test_redeploy.py).

Every application logs a line per request and stage (``args.log_requests``), "/exact" in
Ray's JSON encoding: tests/integration/test_monitoring.py follows request ids through both.
"""

import copy
import os
from pathlib import Path

import httpx
import pytest

from serve_app import configfile, topology
from serve_app.fault_injection import WEDGE_ENV
from serve_app.launch import ServeProcess
from tests.conftest import CONFIGS

MOBILENET_ENV = "SERVE_APP_TEST_MOBILENET_V2_WEIGHTS"


def _small_app(base: dict, name: str, model: dict) -> dict:
    app = copy.deepcopy(base)
    app.update(name=name, route_prefix=f"/{name}", args={**app["args"], "model": model})
    app.pop("autoscaling_policy", None)  # fixed replicas: nothing to scale
    for entry in app["deployments"]:
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = 1
        entry["ray_actor_options"] = {"num_cpus": 0.3 if entry["name"] == "Classifier" else 0.05}
    return app


def _multi_model_app() -> dict:
    """configs/multi-model.yaml's application at "/multi": eager (no background compile during
    the tests), small CPU shares, classifiers autoscaling from 1 to 2 replicas."""
    app = configfile.load(CONFIGS / "multi-model.yaml")["applications"][0]
    app.update(name="multi", route_prefix="/multi")
    app["args"]["log_requests"] = True
    for model in app["args"]["models"]:
        model["compile"] = False
    for entry in app["deployments"]:
        role = topology.role(entry["name"])
        entry["ray_actor_options"] = {"num_cpus": 0.25 if role == topology.CLASSIFIER else 0.05}
        if role != topology.CLASSIFIER:  # one replica; still under the app's policy, which
            # Ray applies only when every deployment of the app autoscales
            entry["autoscaling_config"] = {**entry["autoscaling_config"], "max_replicas": 1}
    return app


#: How often the shared cluster's processes report metrics (Ray's ``metrics_report_interval_ms``,
#: 10 s by default): test_monitoring waits for two reports to agree before it reads a total.
METRICS_REPORT_MS = 2000


#: The profile "/sim" serves (configs/autoscale-sim.yaml's, with a short start).
SIM_PROFILE = {"base_ms": 200, "per_image_ms": 40, "start_s": 1, "crop_size": 64}


def _simulated_app(name: str, profile: dict) -> dict:
    """configs/autoscale-sim.yaml's application at ``/name``, one replica per deployment."""
    app = configfile.load(CONFIGS / "autoscale-sim.yaml")["applications"][0]
    app.update(name=name, route_prefix=f"/{name}")
    app["args"]["model"] = {"name": "simulated", "simulated": profile}
    app.pop("autoscaling_policy", None)
    for entry in app["deployments"]:
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = 1
        entry["ray_actor_options"] = {"num_cpus": 0.02}
    return app


def _add_test_apps(config: dict) -> None:
    base = config["applications"][0]
    base["args"]["log_requests"] = True
    # Eager: on a new machine the compiled model would build in the background through the
    # whole run (a minute and more of CPU beside the tests); building, loading and swapping it
    # in are tests/unit/test_artifacts.py's.
    base["args"]["model"]["compile"] = False
    exact = _small_app(base, "exact", {"name": "resnet18", "weights": None})
    exact["logging_config"] = {"encoding": "JSON", "enable_access_log": False}
    config["applications"].append(exact)
    if os.environ.get(MOBILENET_ENV):
        config["applications"].append(_small_app(
            base, "mobilenet", {"name": "mobilenet_v2", "weights_path": f"${MOBILENET_ENV}"}))
    config["applications"].append(_multi_model_app())
    config["applications"].append(_simulated_app("sim", SIM_PROFILE))


@pytest.fixture(scope="package")
def service(tmp_path_factory):
    """The shared cluster. Its serve_app application is also the one the fault, overload and
    redeploy tests break and change (they run last, below): ``SERVE_APP_WEDGE_FILE`` lets a
    test wedge a classifier, and 5 logical CPUs leave room for its Classifier's second replica
    and a redeploy's surge beside the test applications (physically still this machine's
    cores: the shares are for Ray's placement)."""
    wedge_file = tmp_path_factory.mktemp("faults") / "wedge"
    svc = ServeProcess(CONFIGS / "local.yaml", edit=_add_test_apps, num_cpus=5,
                       env={WEDGE_ENV: str(wedge_file),
                            "RAY_metrics_report_interval_ms": str(METRICS_REPORT_MS)})
    svc.wedge_file = wedge_file
    with svc:
        for app in svc.config["applications"][1:]:
            svc.wait_ready(f"{app['route_prefix']}/readyz", timeout_s=180)
        yield svc


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


#: Modules that start clusters of their own: they run before the shared cluster starts (it
#: stays up until the package ends and would share the cores with them).
RUN_FIRST = ("test_multinode.py", "test_autoscaler.py", "test_autoscaling.py",
             "test_bench_smoke.py", "test_hops_smoke.py", "test_start_and_stop.py",
             "test_haproxy_rules.py")
#: Modules that break or change the shared service: after every test that only uses it, the
#: redeploys (which leave another config deployed) last.
RUN_LAST = ("test_faults.py", "test_overload.py", "test_redeploy.py")


#: Fixtures of a cluster of its own, in a module that otherwise uses the shared one.
OWN_CLUSTER_FIXTURES = ("rays_proxy",)


def _order(item) -> tuple[int, int]:
    name = item.path.name
    if name in RUN_FIRST:
        return (0, RUN_FIRST.index(name))
    if any(f in getattr(item, "fixturenames", ()) for f in OWN_CLUSTER_FIXTURES):
        return (0, len(RUN_FIRST))
    if name in RUN_LAST:
        return (2, RUN_LAST.index(name))
    return (1, 0)


def pytest_collection_modifyitems(session, config, items):
    """Own-cluster tests first, then the shared cluster's, the tests that break it last; the
    order within a module is kept, and tests outside this folder keep theirs, before these."""
    here = Path(__file__).parent
    ours = sorted((item for item in items if here in item.path.parents), key=_order)
    others = [item for item in items if here not in item.path.parents]
    items[:] = others + ours
