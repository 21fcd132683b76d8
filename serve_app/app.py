"""The application builder named by ``import_path`` in every config under ``configs/``.

    serve run configs/local.yaml      # import_path: serve_app.app:build_app

Ray calls :func:`build_app` with the config's ``args``; deployment options (replicas,
resources, autoscaling, each classifier's user_config) come from the config's
``deployments`` section and override the defaults set on each class. Which deployments
there are, and their names, is serve_app/topology.py.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.serve import Application

from serve_app import topology
from serve_app.classifier import Classifier
from serve_app.config import parse_app_config
from serve_app.gateway import ModelHandles
from serve_app.ingress import Ingress
from serve_app.preprocessor import Preprocessor
from serve_app.simulated_classifier import SimulatedClassifier


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """Ingress -> Preprocessor -> Classifier per model, from validated ``args``.

    Invalid args raise ``ConfigError`` here, in ``serve run``, naming the key.
    """
    settings = parse_app_config(args)
    routes = topology.plan(settings)
    preprocessors: dict[str, Any] = {}
    models = {}
    for route in routes:
        if route.preprocessor not in preprocessors:
            feeds = tuple(r.classifier for r in routes if r.preprocessor == route.preprocessor)
            preprocessors[route.preprocessor] = Preprocessor.options(name=route.preprocessor).bind(
                route.info.transform, settings.max_image_pixels, settings.log_requests, feeds,
                settings.decode_budget_pixels)
        # The description travels with the model: the classifier replica then never imports
        # torchvision when it loads a compiled artifact (~2 s less CPU per start).
        # A simulated accelerator (model.name: simulated) takes the same arguments but no
        # description: a ModelInfo would import torch (serve_app/models.py) into its replica.
        if route.model.is_simulated:
            deployment, info = SimulatedClassifier, None
        else:
            deployment, info = Classifier, route.info
        classifier = deployment.options(name=route.classifier).bind(
            route.model, settings.warmup_iterations, info, settings.log_requests,
            settings.classifier_nice)
        # A plain dict: the ingress then never imports torch (about 340 MiB less per replica).
        models[route.name] = ModelHandles(route.info.as_dict(), preprocessors[route.preprocessor],
                                          classifier, route.classifier)
    return Ingress.bind(models, settings)
