"""Redeploys and a scale-down while clients run (4 here, 16 for the figures), on the shared
service's ``configs/local.yaml`` application (HAProxy in front): ``serve deploy`` with a changed
``user_config`` (replicas reconfigured, not restarted), with a changed model and back (every
deployment restarted: replacements start before the old replicas stop), and a classifier
removed under load (it drains its batches first). Asserted: not one request fails, and the
change happened (same replicas; the new model answers once settled; one classifier left).
Switch and settle times: ``python -m load_tests.reliability --scenario redeploy-model``.

The shared cluster has logical CPUs to spare: room for one replacement replica beside the
serving ones, as a cluster with spare capacity has. These change the shared service, so they
run last (tests/integration/conftest.py).
"""

import json

import pytest

from load_tests import reliability

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _assert_nothing_failed(report: dict, answers: list) -> None:
    assert answers and report["statuses"] == {"200": len(answers)}, report


def test_a_changed_user_config_reconfigures_under_load_without_a_failure(service):
    report, answers = reliability.redeploy_user_config(service)
    print("redeploy user_config:", json.dumps(report))
    _assert_nothing_failed(report, answers)
    assert report["kept_replicas"], "a user_config change restarted a replica"


@pytest.mark.parametrize("to", ["efficientnet_lite2", "back"])
def test_a_changed_model_rolls_out_under_load_without_a_failure(service, to):
    model = reliability.OTHER_MODEL if to != "back" else \
        reliability.app_config(service)["args"]["model"]  # what the shared cluster started with
    report, answers = reliability.redeploy_model(service, model)
    print(f"redeploy model -> {model['name']}:", json.dumps(report))
    _assert_nothing_failed(report, answers)
    assert report["first_new_model_after_s"] is not None, report  # it switched
    assert report["after_settled"] == [model["name"]], report  # and only it answers once settled


def test_a_classifier_removed_under_load_drains_without_a_failure(service):
    report, answers = reliability.scale_down(service)
    print("scale-down under load:", json.dumps(report))
    _assert_nothing_failed(report, answers)
    assert report["replicas_before"] == 2 and report["replicas_after"] == 1, report
