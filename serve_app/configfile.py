"""Serve config files (``configs/*.yaml``): load and check them the way ``serve run`` will.

``python -m serve_app check configs/local.yaml`` runs Ray's own schema, then serve_app's, so a
mistake is reported before any replica starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ray.serve._private.constants import DEFAULT_HEALTH_CHECK_TIMEOUT_S
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from serve_app import topology
from serve_app.config import (
    AppConfig,
    ClassifierSettings,
    ConfigError,
    format_errors,
    parse_app_config,
    parse_classifier_settings,
    threads_for_share,
)

APP_IMPORT_PATH = "serve_app.app:build_app"


def load(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a Serve config (expected a mapping at the top level)")
    return data


def deployment_options(app: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``deployments`` entry called ``name`` in one application ({} when absent)."""
    for entry in app.get("deployments") or []:
        if entry.get("name") == name:
            return entry
    return {}


def _check_deployment_keys(entry: dict[str, Any], where: str) -> None:
    """Ray ignores unknown keys in a deployment and its autoscaling_config (so the renamed
    ``max_concurrent_queries`` or ``target_num_ongoing_requests_per_replica`` silently do
    nothing); refuse them here, and validate autoscaling_config as Ray will at deploy time."""
    name = entry.get("name")
    unknown = sorted(set(entry) - set(DeploymentSchema.model_fields))
    if unknown:
        raise ConfigError(f"{where}: deployment {name!r} has unknown keys {unknown} "
                          "(Ray would ignore them silently)")
    autoscaling = entry.get("autoscaling_config")
    if isinstance(autoscaling, dict):
        unknown = sorted(set(autoscaling) - set(AutoscalingConfig.model_fields))
        if unknown:
            raise ConfigError(f"{where}: deployment {name!r} autoscaling_config has unknown keys "
                              f"{unknown} (Ray would ignore them silently)")
        try:
            AutoscalingConfig.model_validate(autoscaling)
        except ValidationError as exc:
            raise ConfigError(f"{where}: deployment {name!r}:\n"
                              + format_errors(exc, "autoscaling_config.")) from None


def _check_policy(policy: Any, where: str) -> None:
    """Import the application's autoscaling policy and build it with its kwargs, as the Serve
    controller will: a typo or a bad kwarg shows here instead of in the controller's log."""
    if not policy:
        return
    from ray._common.utils import import_attr

    try:
        target = import_attr(policy["policy_function"])
        if isinstance(target, type):
            target(**(policy.get("policy_kwargs") or {}))
    except Exception as exc:
        raise ConfigError(f"{where}: autoscaling_policy: {type(exc).__name__}: {exc}") from None


def _check_classifier(classifier: dict[str, Any], batching: ClassifierSettings,
                      settings: AppConfig, where: str) -> None:
    """One classifier deployment's options against the app's args."""
    # A replica holds at most max_ongoing_requests calls of at most dispatch.max_batch_size
    # images each; a batch larger than that could never fill (Ray issue #43288).
    max_ongoing = classifier.get("max_ongoing_requests", 32)
    reachable = max_ongoing * settings.dispatch.max_batch_size
    if batching.max_batch_size > reachable:
        raise ConfigError(
            f"{where}: user_config.max_batch_size ({batching.max_batch_size}) is larger than "
            f"its max_ongoing_requests ({max_ongoing}) times args.dispatch.max_batch_size "
            f"({settings.dispatch.max_batch_size}): batches could never fill.")
    _check_threads(classifier, batching, where)
    _check_health_timeout(classifier, batching, where)


def _check_health_timeout(classifier: dict[str, Any], batching: ClassifierSettings,
                          where: str) -> None:
    """The health check's forward pass must be able to time out before Ray gives up on the
    whole check, or a wedged model is reported as Ray's timeout, never as wedged."""
    ray_timeout = classifier.get("health_check_timeout_s", DEFAULT_HEALTH_CHECK_TIMEOUT_S)
    if batching.health_check_forward_timeout_s >= ray_timeout:
        raise ConfigError(
            f"{where}: user_config.health_check_forward_timeout_s "
            f"({batching.health_check_forward_timeout_s}) must be under the deployment's "
            f"health_check_timeout_s ({ray_timeout}).")


def _check_threads(classifier: dict[str, Any], batching: ClassifierSettings, where: str) -> None:
    """Refuse more torch threads than the CPU share on several replicas with OpenMP spinning:
    measured on 2 cores, two replicas of 2 threads ran 4-6x slower (load_tests/RESULTS.md,
    lever N). Idle threads that sleep (OMP_WAIT_POLICY=PASSIVE) share the cores instead."""
    options = classifier.get("ray_actor_options") or {}
    share = threads_for_share(options.get("num_cpus", 1))
    autoscaling = classifier.get("autoscaling_config") or {}
    replicas = (autoscaling.get("max_replicas", 1) if autoscaling
                else classifier.get("num_replicas", 1))
    env = ((options.get("runtime_env") or {}).get("env_vars") or {})
    threads = batching.torch_threads or share
    if threads > share and (replicas == "auto" or replicas > 1) \
            and str(env.get("OMP_WAIT_POLICY", "")).upper() != "PASSIVE":
        raise ConfigError(
            f"{where}: user_config.torch_threads ({batching.torch_threads}) is more "
            f"than its CPU share gives ({share}) on up to {replicas} replicas: OpenMP's spinning "
            "threads would fight over the cores. Set OMP_WAIT_POLICY: PASSIVE in "
            "ray_actor_options.runtime_env.env_vars, or keep one replica.")


def check(data: dict[str, Any], source: str = "config") -> list[tuple[str, AppConfig, ClassifierSettings]]:
    """Validate a whole Serve config; return each serve_app application's parsed settings."""
    try:
        schema = ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: Ray rejects this Serve config:\n{exc}") from None
    parsed = []
    for app, app_schema in zip(data["applications"], schema.applications):
        if app_schema.import_path != APP_IMPORT_PATH:
            continue
        where = f"{source}: application {app_schema.name!r}"
        try:
            settings = parse_app_config(app.get("args"))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        routes = topology.plan(settings)
        known = topology.deployment_names(routes)
        for entry in app.get("deployments") or []:
            if entry.get("name") not in known:
                raise ConfigError(f"{where}: unknown deployment {entry.get('name')!r}; this "
                                  f"application's deployments are {known} "
                                  "(serve_app/topology.py)")
            _check_deployment_keys(entry, where)
        primary = None
        for route in routes:
            classifier = deployment_options(app, route.classifier)
            try:
                batching = parse_classifier_settings(classifier.get("user_config"))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {route.classifier}: {exc}") from None
            _check_classifier(classifier, batching, settings, f"{where}: {route.classifier}")
            if route.model.id == settings.primary.id:
                primary = batching
        _check_policy(app.get("autoscaling_policy"), where)
        parsed.append((app_schema.name, settings, primary))
    return parsed


def check_file(path: str | Path) -> list[tuple[str, AppConfig, ClassifierSettings]]:
    return check(load(path), str(path))
