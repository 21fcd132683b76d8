"""Redeploys and a scale-down while 16 clients run, on configs/local.yaml (HAProxy in front):
``serve deploy`` with a changed ``user_config`` (the batch size: replicas reconfigured, not
restarted), with a changed model (every deployment restarted: replacements start before the
old replicas stop, ``max_surge_percent``), and a classifier removed under load (it drains its
batches first). Not one request may fail. Figures: docs/reliability.md.

The cluster has 3 logical CPUs (the machine has 2): room for one replacement replica beside
the serving ones, as a cluster with spare capacity has. Without it a surge waits for capacity
and the old replicas keep serving (README, "Redeploying").
"""

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from load_tests.photos import photos_jpeg
from load_tests.processes import replica_pids
from load_tests.sampling import ServeStatusClient, dashboard_url_from_log, parse_applications
from serve_app import configfile
from serve_app.compiling import compile_config
from serve_app.launch import ServeProcess
from tests.conftest import CONFIGS
from tests.integration.closed_loop import Load, summary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 16
APP = "serve_app"
OTHER_MODEL = {"name": "efficientnet_lite2", "weights": "DEFAULT", "compile": True}


def _with_model(config: dict, model: dict) -> dict:
    out = copy.deepcopy(config)
    out["applications"][0]["args"]["model"] = model
    return out


def _deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


@pytest.fixture(scope="module")
def shipped():
    """configs/local.yaml with both models' compiled artifacts built beforehand (a redeploy
    on a machine where the new model was never compiled serves it eager meanwhile)."""
    local = configfile.load(CONFIGS / "local.yaml")
    assert compile_config(local, "configs/local.yaml") == 0
    assert compile_config(_with_model(local, OTHER_MODEL), "efficientnet_lite2") == 0
    with ServeProcess(CONFIGS / "local.yaml", start_timeout_s=400, num_cpus=3) as svc:
        svc.dashboard_url = dashboard_url_from_log(svc.log_path.read_text())
        svc.status = ServeStatusClient(svc.dashboard_url, APP)
        svc.deployed = svc.config
        yield svc


def _settled(svc, deployed_after: float) -> bool:
    """The config deployed after ``deployed_after`` is running: the application RUNNING, every
    deployment at its target with no replica starting or stopping."""
    app = svc.status.application()
    if app.get("status") != "RUNNING" or app.get("last_deployed_time_s", 0) <= deployed_after:
        return False
    replicas = parse_applications({"applications": {APP: app}}, APP)
    return bool(replicas) and all(r.running == r.target and not r.starting and not r.stopping
                                  for r in replicas.values())


def _deploy(svc, config: dict, timeout_s: float = 240.0) -> float:
    """``serve deploy`` of ``config`` to the running cluster; seconds until it settled."""
    path = svc.config_path.with_name(f"deploy-{time.monotonic_ns()}.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    serve = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    started, before = time.monotonic(), svc.status.application().get("last_deployed_time_s", 0)
    done = subprocess.run(serve + ["deploy", str(path), "--address", svc.dashboard_url],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})  # send ~/.ray/auth_token
    assert done.returncode == 0, done.stdout + done.stderr
    svc.deployed = config
    while not _settled(svc, before):
        assert time.monotonic() - started < timeout_s, (svc.status.replicas(), svc.log_tail())
        time.sleep(0.5)
    return time.monotonic() - started


def _under_load(svc, change, seconds: float) -> tuple[dict, list, float]:
    """``change()`` 5 s into at least ``seconds`` of load; the report, the answers, when it
    began."""
    load = Load(f"{svc.url}/v1/classify", [jpeg for _, jpeg in photos_jpeg()], CLIENTS)
    at: dict = {}

    def during():
        time.sleep(5)
        at["t"] = time.monotonic()
        at["settled_s"] = change()
        time.sleep(10)  # and 10 s of the settled service, however long the change took

    load.run(seconds, during)
    report = {**summary(load.answers, at["t"]), "settled_after_s": round(at["settled_s"], 1)}
    return report, load.answers, at["t"]


def _assert_nothing_failed(report: dict, answers: list) -> None:
    assert report["statuses"] == {"200": len(answers)}, report


def _classifier_pids(svc) -> set:
    return {p for p, d in replica_pids(svc.proc.pid, APP).items() if d == "Classifier"}


def test_a_changed_user_config_reconfigures_under_load_without_a_failure(shipped):
    config = copy.deepcopy(shipped.deployed)
    _deployment(config, "Classifier")["user_config"]["max_batch_size"] = 4
    before = _classifier_pids(shipped)
    report, answers, _ = _under_load(shipped, lambda: _deploy(shipped, config), 30)
    print("redeploy user_config:", json.dumps(report))
    _assert_nothing_failed(report, answers)
    assert before <= _classifier_pids(shipped), "a user_config change restarted a replica"


@pytest.mark.parametrize("model", [OTHER_MODEL, None], ids=["to-lite2", "back-to-lite0"])
def test_a_changed_model_rolls_out_under_load_without_a_failure(shipped, model):
    local = configfile.load(CONFIGS / "local.yaml")
    new = model["name"] if model else local["applications"][0]["args"]["model"]["name"]
    config = _with_model(shipped.deployed, model or local["applications"][0]["args"]["model"])
    report, answers, at = _under_load(shipped, lambda: _deploy(shipped, config), 75)
    models = [a.model for a in answers]
    first_new = min(a.ended for a in answers if a.model == new)
    last_old = max(a.ended for a in answers if a.model != new)
    report.update(first_new_model_after_s=round(first_new - at, 1),
                  last_old_model_after_s=round(last_old - at, 1),
                  answers_by_model={m: models.count(m) for m in sorted(set(models))},
                  resized_crop_warnings=shipped.serve_log_count("Crops of "))
    print(f"redeploy model -> {new}:", json.dumps(report))
    _assert_nothing_failed(report, answers)
    assert first_new > at, report  # it switched after the deploy
    settled_at = at + report["settled_after_s"]
    after = [a.model for a in answers if a.started >= settled_at]
    assert after and set(after) == {new}, report  # and only the new model answers once settled


def test_a_classifier_removed_under_load_drains_without_a_failure(shipped):
    two = copy.deepcopy(shipped.deployed)
    _deployment(two, "Classifier")["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    _deploy(shipped, two)
    assert len(_classifier_pids(shipped)) == 2
    one = copy.deepcopy(two)
    _deployment(one, "Classifier")["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    report, answers, _ = _under_load(shipped, lambda: _deploy(shipped, one), 30)
    print("scale-down under load:", json.dumps(report))
    _assert_nothing_failed(report, answers)
    assert len(_classifier_pids(shipped)) == 1
