"""Which deployments an application has (serve_app/topology.py), and the config checks that
use it: one Classifier per model, one Preprocessor per distinct preprocessing."""

import copy

import pytest
import yaml

from serve_app import configfile, topology
from serve_app.config import ConfigError, parse_app_config
from tests.conftest import CONFIGS


def test_one_model_keeps_the_plain_names():
    routes = topology.plan(parse_app_config({}))
    assert [(r.name, r.preprocessor, r.classifier) for r in routes] == [
        ("efficientnet_lite0", "Preprocessor", "Classifier")]
    assert topology.deployment_names(routes) == ["Ingress", "Preprocessor", "Classifier"]


def test_models_with_the_same_preprocessing_share_a_preprocessor():
    settings = parse_app_config({"models": [
        {"name": "resnet18", "weights": None}, {"name": "efficientnet_lite2"},
        {"name": "resnet18", "weights": None, "served_name": "resnet18-finetune", "seed": 3}]})
    routes = topology.plan(settings)
    assert [(r.name, r.preprocessor, r.classifier) for r in routes] == [
        ("resnet18", "Preprocessor_resnet18", "Classifier_resnet18"),
        ("efficientnet_lite2", "Preprocessor_efficientnet_lite2", "Classifier_efficientnet_lite2"),
        ("resnet18-finetune", "Preprocessor_resnet18", "Classifier_resnet18-finetune")]
    assert routes[2].info.name == "resnet18-finetune" and routes[2].info.architecture == "resnet18"
    assert settings.primary.id == "resnet18"


def test_roles_and_what_a_preprocessor_feeds():
    assert [topology.role(n) for n in ("Ingress", "Classifier_x", "Preprocessor", "Other")] == [
        "Ingress", "Classifier", "Preprocessor", None]
    assert topology.preprocessor_feeds("Preprocessor") == ["Classifier"]
    assert topology.preprocessor_feeds("Preprocessor_a") == ["Classifier_a"]
    reported = {"feeds/Classifier_b": {"p": 1.0}, "feeds/Classifier_a": {"p": 1.0}}
    assert topology.preprocessor_feeds("Preprocessor_a", reported) == ["Classifier_a",
                                                                       "Classifier_b"]


@pytest.mark.parametrize("args,key,why", [
    ({"model": {}, "models": [{}]}, "args.models", "not both"),
    ({"models": [{}, {}]}, "args.models", "appear twice"),
    ({"models": []}, "args.models", "at least 1"),
    ({"models": [{"served_name": "has space"}]}, "args.models.0.served_name", "pattern"),
    ({"models": [{"name": "resnet9000"}]}, "args.models.0.name", "unknown model"),
    ({"default_model": "resnet18"}, "args.default_model", "not one of the served models"),
])
def test_bad_model_lists_name_the_key(args, key, why):
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    assert f"{key}:" in str(info.value) and why in str(info.value), str(info.value)


def _multi() -> dict:
    return yaml.safe_load((CONFIGS / "multi-model.yaml").read_text())


def test_multi_model_config_names_every_deployment_it_has():
    (name, settings, batching), = configfile.check(_multi())
    assert [m.id for m in settings.served] == ["efficientnet_lite0", "efficientnet_lite2"]
    app = _multi()["applications"][0]
    assert {d["name"] for d in app["deployments"]} == set(
        topology.deployment_names(topology.plan(settings)))


def test_a_deployment_entry_for_no_deployment_is_refused():
    config = _multi()
    config["applications"][0]["deployments"][-1]["name"] = "Classifier"  # the one-model name
    with pytest.raises(ConfigError, match="unknown deployment 'Classifier'.*Classifier_efficientnet_lite2"):
        configfile.check(config)


def test_each_classifier_user_config_is_checked():
    config = _multi()
    lite2 = copy.deepcopy(config)
    lite2["applications"][0]["deployments"][-1]["user_config"]["max_batch_sise"] = 8
    with pytest.raises(ConfigError, match="(?s)Classifier_efficientnet_lite2: .*max_batch_sise"):
        configfile.check(lite2)
