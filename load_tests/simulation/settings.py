"""What the simulator reads from a Serve config: each deployment's autoscaling and limits, the
classifier's batching, the ingress's dispatch and the replica start time. Pure: the YAML is
read with serve_app.configfile.load, Ray's own AutoscalingConfig fills in Ray's defaults.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

from ray.serve._private.constants import (
    DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
    DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
    DEFAULT_MAX_ONGOING_REQUESTS,
)
from ray.serve.config import AutoscalingConfig

from serve_app import topology
from serve_app.config import (
    SIMULATED,
    ClassifierSettings,
    DispatchConfig,
    SimulatedModelConfig,
)
from serve_app.configfile import APP_IMPORT_PATH

DEPLOYMENTS = (topology.INGRESS, topology.PREPROCESSOR, topology.CLASSIFIER)
#: Ray's controller loop period (ray.serve._private.constants.CONTROL_LOOP_INTERVAL_S).
CONTROL_LOOP_S = 0.1


@dataclass(frozen=True)
class DeploymentSettings:
    """One deployment as the simulator runs it."""

    name: str
    autoscaling: AutoscalingConfig
    max_ongoing_requests: int
    max_queued_requests: int  # -1: unbounded (Ray's default)
    start_s: float
    graceful_wait_loop_s: float
    graceful_timeout_s: float

    @property
    def record_interval_s(self) -> float:
        """How often replicas and handles sample their metrics (Ray's replica.py/router.py:
        min(look_back_period_s * 0.2, metrics_interval_s))."""
        cfg = self.autoscaling
        return min(cfg.look_back_period_s * 0.2, cfg.metrics_interval_s)


@dataclass(frozen=True)
class PolicySpec:
    """Which policy runs: an import path with kwargs, app- or deployment-scoped; or Ray's."""

    function: str  # import path, or "default"
    kwargs: dict = field(default_factory=dict)
    scope: str = "deployment"  # "app" or "deployment"

    @property
    def label(self) -> str:
        if self.function == "default":
            return "Ray default (replica_queue_length)"
        return f"{self.function} ({'application' if self.scope == 'app' else 'Classifier'})"


@dataclass(frozen=True)
class SimSettings:
    deployments: dict[str, DeploymentSettings]
    classifier: ClassifierSettings
    dispatch: DispatchConfig
    profile: Optional[SimulatedModelConfig]
    policy: PolicySpec
    preprocess_ms: float = 10.0
    gpu_fraction: float = 1.0
    control_period_s: float = CONTROL_LOOP_S
    #: How often the policy is called: Ray's loop (``control_period_s``, 0.1 s) unless a long
    #: run trades cadence for speed; the model still steps every ``control_period_s``.
    decision_period_s: Optional[float] = None
    app_name: str = "serve_app"
    #: A new replica's worker process: it takes ``process_start_s`` before the replica's own
    #: start (``start_s``), and the node starts at most ``startup_concurrency`` at once (Ray's
    #: raylet: min(cores, num_cpus), 2 on this laptop). None: no limit, no process time.
    process_start_s: float = 0.0
    startup_concurrency: Optional[int] = None

    def dep(self, name: str) -> DeploymentSettings:
        return self.deployments[name]

    @property
    def decide_every(self) -> int:
        """Control-loop steps per policy call (a whole number, at least 1)."""
        if self.decision_period_s is None:
            return 1
        steps = self.decision_period_s / self.control_period_s
        if steps < 1 - 1e-9 or abs(steps - round(steps)) > 1e-6:
            raise ValueError(f"decision_period_s ({self.decision_period_s}) must be a whole "
                             f"multiple of control_period_s ({self.control_period_s})")
        return int(round(steps))


def serve_app_entry(config: dict) -> dict:
    for app in config.get("applications") or []:
        if app.get("import_path") == APP_IMPORT_PATH:
            return app
    raise ValueError("the config has no serve_app application")


def _entry(app: dict, name: str) -> dict:
    for dep in app.get("deployments") or []:
        if dep.get("name") == name:
            return dep
    return {}


def autoscaling_config(raw: Optional[dict], overrides: Optional[dict] = None
                       ) -> AutoscalingConfig:
    """Ray's AutoscalingConfig (Ray's defaults for what is unset), with ``overrides``."""
    data = {**(raw or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    with warnings.catch_warnings():  # metrics_interval_s is deprecated but is what works
        warnings.simplefilter("ignore")
        return AutoscalingConfig(**data)


def _model(args: dict) -> dict:
    if args.get("model"):
        return args["model"]
    models = args.get("models") or []
    return models[0] if models else {}


def config_profile(app: dict) -> Optional[SimulatedModelConfig]:
    """The config's simulated latency profile (``args.model.simulated``), if it has one."""
    model = _model(app.get("args") or {})
    if model.get("name") == SIMULATED and model.get("simulated"):
        return SimulatedModelConfig.model_validate(model["simulated"])
    return None


def config_policy(app: dict) -> PolicySpec:
    """The policy the config selects: the application's, else the Classifier's, else Ray's."""
    policy = app.get("autoscaling_policy") or {}
    if policy.get("policy_function"):
        return PolicySpec(policy["policy_function"], dict(policy.get("policy_kwargs") or {}),
                          "app")
    dep = _entry(app, topology.CLASSIFIER).get("autoscaling_config") or {}
    fn = (dep.get("policy") or {}).get("policy_function")
    if fn and fn != "ray.serve.autoscaling_policy:default_autoscaling_policy":
        return PolicySpec(fn, dict(dep["policy"].get("policy_kwargs") or {}), "deployment")
    return PolicySpec("default")


def resolve_policy(app: dict, function: Optional[str], kwargs: Optional[dict],
                   scope: Optional[str]) -> PolicySpec:
    """The CLI's ``--policy`` against the config: kwargs and scope as the config uses the same
    function, unless given."""
    configured = config_policy(app)
    if function is None or function == configured.function:
        spec = configured
    elif function == "default":
        spec = PolicySpec("default")
    else:
        spec = PolicySpec(function, {}, "deployment")
        if function.rsplit(":", 1)[-1].lower().startswith("app"):
            spec = replace(spec, scope="app")
    if kwargs is not None:
        spec = replace(spec, kwargs=dict(kwargs))
    if scope is not None and spec.function != "default":
        spec = replace(spec, scope=scope)
    return spec


def from_config(config: dict, *, profile: Optional[SimulatedModelConfig] = None,
                policy: Optional[PolicySpec] = None, start_s: Optional[float] = None,
                other_start_s: float = 2.0, classifier_overrides: Optional[dict] = None,
                max_ongoing_requests: Optional[int] = None,
                max_batch_size: Optional[int] = None,
                batch_wait_timeout_s: Optional[float] = None,
                dispatch_overrides: Optional[dict] = None, ingress_overrides: Optional[dict] = None,
                preprocess_ms: float = 10.0, gpu_fraction: float = 1.0,
                control_period_s: float = CONTROL_LOOP_S, process_start_s: float = 0.0,
                startup_concurrency: Optional[int] = None,
                decision_period_s: Optional[float] = None) -> SimSettings:
    """The settings of a Serve config (a dict from serve_app.configfile.load), with overrides.

    ``start_s``: a new Classifier replica's start time (default: the simulated model's
    ``start_s``; required otherwise). ``other_start_s``: the Ingress's and Preprocessor's.
    """
    app = serve_app_entry(config)
    args = app.get("args") or {}
    profile = profile or config_profile(app)
    if start_s is None:
        start_s = config_profile(app).start_s if config_profile(app) else None
    if start_s is None and profile is not None and config_profile(app) is None:
        start_s = profile.start_s
    if start_s is None:
        raise ValueError("the config's model is not simulated: give --start-s")
    deployments = {}
    for name in DEPLOYMENTS:
        entry = _entry(app, name)
        raw = dict(entry.get("autoscaling_config") or {"min_replicas": 1, "max_replicas": 1})
        overrides = {topology.CLASSIFIER: classifier_overrides,
                     topology.INGRESS: ingress_overrides}.get(name)
        mor = entry.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
        if name == topology.CLASSIFIER and max_ongoing_requests is not None:
            mor = max_ongoing_requests
        deployments[name] = DeploymentSettings(
            name=name, autoscaling=autoscaling_config(raw, overrides),
            max_ongoing_requests=int(mor),
            max_queued_requests=int(entry.get("max_queued_requests", -1)),
            start_s=float(start_s if name == topology.CLASSIFIER else other_start_s),
            graceful_wait_loop_s=float(entry.get("graceful_shutdown_wait_loop_s",
                                                 DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S)),
            graceful_timeout_s=float(entry.get("graceful_shutdown_timeout_s",
                                               DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S)))
    user_config = dict(_entry(app, topology.CLASSIFIER).get("user_config") or {})
    if max_batch_size is not None:
        user_config["max_batch_size"] = max_batch_size
    if batch_wait_timeout_s is not None:
        user_config["batch_wait_timeout_s"] = batch_wait_timeout_s
    classifier = ClassifierSettings.model_validate(
        {k: v for k, v in user_config.items() if k in ClassifierSettings.model_fields})
    dispatch = DispatchConfig.model_validate(
        {**(args.get("dispatch") or {}),
         **{k: v for k, v in (dispatch_overrides or {}).items() if v is not None}})
    return SimSettings(deployments=deployments, classifier=classifier, dispatch=dispatch,
                       profile=profile, policy=policy or config_policy(app),
                       preprocess_ms=preprocess_ms, gpu_fraction=gpu_fraction,
                       control_period_s=control_period_s, decision_period_s=decision_period_s,
                       app_name=app.get("name", "serve_app"),
                       process_start_s=process_start_s, startup_concurrency=startup_concurrency)
