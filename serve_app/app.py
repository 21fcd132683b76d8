"""The application builder named by ``import_path`` in every config under ``configs/``.

    serve run configs/local.yaml      # import_path: serve_app.app:build_app

Ray calls :func:`build_app` with the config's ``args``; deployment options (replicas,
resources, autoscaling, the classifier's user_config) come from the config's
``deployments`` section and override the defaults set on each class.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.serve import Application

from serve_app.classifier import Classifier
from serve_app.config import parse_app_config
from serve_app.ingress import Ingress
from serve_app.models import describe
from serve_app.preprocessor import Preprocessor


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """Ingress -> Preprocessor -> Classifier, from validated ``args``.

    Invalid args raise ``ConfigError`` here, in ``serve run``, naming the key.
    """
    settings = parse_app_config(args)
    info = describe(settings.model)
    preprocessor = Preprocessor.bind(info.transform, settings.max_image_pixels,
                                     settings.log_requests)
    # The description travels with the model: the classifier replica then never imports
    # torchvision when it loads a compiled artifact (~2 s less CPU per start).
    classifier = Classifier.bind(settings.model, settings.warmup_iterations, info,
                                 settings.log_requests)
    # A plain dict: the ingress then never imports torch (about 340 MiB less per replica).
    return Ingress.bind(preprocessor, classifier, settings, info.as_dict())
