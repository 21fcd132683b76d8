"""Which deployments a serve_app application has, and what each is called.

One model: ``Ingress``, ``Preprocessor`` and ``Classifier``, the names every single-model
config under ``configs/`` uses. Several models (``args.models``): one Classifier per model,
``Classifier_<served name>``, each with its own resources, batching and autoscaling in the
YAML; and one Preprocessor per distinct preprocessing, ``Preprocessor_<served name of the
first model that uses it>``: models that resize and crop alike share decoding replicas.

Light on purpose: the autoscaling policy (in Serve's controller) reads :func:`role` and
:func:`preprocessor_feeds`, and must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from serve_app.config import AppConfig, ModelConfig
    from serve_app.models import ModelInfo

INGRESS = "Ingress"
PREPROCESSOR = "Preprocessor"
CLASSIFIER = "Classifier"
ROLES = (INGRESS, PREPROCESSOR, CLASSIFIER)


@dataclass(frozen=True)
class ModelRoute:
    """One served model and the two deployments its images go through."""

    model: "ModelConfig"
    info: "ModelInfo"
    preprocessor: str
    classifier: str

    @property
    def name(self) -> str:
        return self.model.id


def plan(settings: "AppConfig") -> list["ModelRoute"]:
    """The routes of an application's models, in config order (reads no weights)."""
    from serve_app.models import describe  # imports torchvision

    served = settings.served
    infos = [describe(m) for m in served]
    if len(served) == 1:
        return [ModelRoute(served[0], infos[0], PREPROCESSOR, CLASSIFIER)]
    shared: dict = {}
    return [ModelRoute(m, info, shared.setdefault(info.transform, f"{PREPROCESSOR}_{m.id}"),
                       f"{CLASSIFIER}_{m.id}") for m, info in zip(served, infos)]


def deployment_names(routes: list[ModelRoute]) -> list[str]:
    """Every deployment of the application: what its ``deployments`` entries may name."""
    names = [INGRESS]
    for route in routes:
        for name in (route.preprocessor, route.classifier):
            if name not in names:
                names.append(name)
    return names


def role(deployment: str) -> Optional[str]:
    """``Ingress``, ``Preprocessor`` or ``Classifier`` for a serve_app deployment name."""
    head = deployment.split("_", 1)[0]
    return head if head in ROLES else None


#: Preprocessor.record_autoscaling_stats reports ``feeds/<classifier deployment>`` = 1 for each
#: classifier it feeds, so the policy can size it to them without knowing the transforms.
FEEDS = "feeds/"


def preprocessor_feeds(preprocessor: str, reported: Optional[dict] = None) -> list[str]:
    """The classifiers a preprocessor feeds: as it reported them, else by name
    (``Preprocessor`` -> ``Classifier``, ``Preprocessor_x`` -> ``Classifier_x``)."""
    fed = sorted(k[len(FEEDS):] for k in (reported or {}) if k.startswith(FEEDS))
    if fed:
        return fed
    return [CLASSIFIER + preprocessor[len(PREPROCESSOR):]]
