"""Model registry, weight loading and the Predictor (no Ray)."""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import torch
import torchvision
from skimage import data

from serve_app import classifier, imaging, models, runtime
from serve_app.classifier import Classifier, Predictor
from serve_app.config import ModelConfig

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _pixels(array) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def test_describe_reads_the_torchvision_preset():
    info = models.describe(ModelConfig(name="resnet50", weights="IMAGENET1K_V2"))
    assert (info.transform.resize_size, info.transform.crop_size) == (232, 224)
    assert info.num_classes == 1000 and info.categories[285] == "Egyptian cat"
    assert info.weights_source == "torchvision:IMAGENET1K_V2"
    assert info.as_dict()["input_size"] == [3, 224, 224]


def test_describe_random_and_file_weights(tmp_path):
    assert models.describe(ModelConfig(name="resnet18", weights=None)).weights_source == "random(seed=0)"
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    info = models.describe(ModelConfig(name="resnet18", weights_path=str(path)))
    assert info.weights_source == f"file:{path}"


def test_efficientnet_lite0_declares_tf_style_normalization():
    spec = models.describe(ModelConfig()).transform
    assert spec.mean == (0.498,) * 3 and spec.std == (0.502,) * 3
    assert (spec.resize_size, spec.crop_size) == (256, 224)


def test_efficientnet_lite0_sees_real_photos():
    predictor = Predictor(ModelConfig())
    spec = predictor.info.transform
    batch = torch.stack([imaging.resize_crop(_pixels(getattr(data, n)()), spec)
                         for n in ("chelsea", "coffee")])
    probs = predictor.predict(batch)
    cat, coffee = (imaging.top_k(p, 1, predictor.info.categories)[0] for p in probs)
    assert cat["label"] in CAT_CLASSES and coffee["label"] == "espresso", (cat, coffee)


def test_random_weights_are_seeded():
    a = models.build_model(ModelConfig(name="resnet18", weights=None, seed=3))
    b = models.build_model(ModelConfig(name="resnet18", weights=None, seed=3))
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_weights_path_loads_a_state_dict_saved_in_half_precision(tmp_path):
    source = torchvision.models.mobilenet_v2()
    path = tmp_path / "mnv2.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()},
               path)
    loaded = models.build_model(ModelConfig(name="mobilenet_v2", weights_path=str(path)))
    assert torch.allclose(loaded.classifier[1].weight, source.classifier[1].weight.half().float())
    assert not loaded.training


def test_predictor_equals_the_reference_pipeline():
    """Our uint8 path (resize on uint8, normalize in the classifier) against torchvision's
    preset + model forward, for a random-weights model."""
    cfg = ModelConfig(name="resnet18", weights=None)
    predictor = Predictor(cfg)
    reference_model = models.build_model(cfg)
    preset = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    pixels = _pixels(data.coffee())
    ours = predictor.predict(imaging.resize_crop(pixels, predictor.info.transform)[None])[0]
    with torch.inference_mode():
        reference = reference_model(preset(pixels)[None]).softmax(-1)[0]
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("SERVE_APP_TEST_MOBILENET_V2_WEIGHTS"),
                    reason="SERVE_APP_TEST_MOBILENET_V2_WEIGHTS is unset (CI sets it to the "
                           "mobilenet_v2 weights in ../shared/models)")
def test_mobilenet_v2_weights_file_classifies_real_photos():
    predictor = Predictor(ModelConfig(name="mobilenet_v2",
                                      weights_path=os.environ["SERVE_APP_TEST_MOBILENET_V2_WEIGHTS"]))
    spec = predictor.info.transform
    probs = predictor.predict(imaging.resize_crop(_pixels(data.coffee()), spec)[None])[0]
    assert imaging.top_k(probs, 1, predictor.info.categories)[0]["label"] == "espresso"


@pytest.mark.parametrize("share,threads", [(0.25, 1), (0.8, 1), (1.0, 1), (2.5, 2), (4, 4)])
def test_threads_follow_the_cpu_share(share, threads):
    assert runtime.cpu_threads({"CPU": share}) == threads


def test_classifier_threads_follow_user_config_without_a_restart():
    """``user_config.torch_threads`` overrides the CPU share on reconfigure (no model reload),
    null hands the choice back to the share, and the forward pass uses it even on a thread
    that ran ops before the change (torch's count is per thread then; Ray calls reconfigure
    and serves requests on different threads)."""
    before = torch.get_num_threads()
    crop = torch.zeros((3, 224, 224), dtype=torch.uint8)
    loop = asyncio.new_event_loop()

    async def forward() -> int:  # the batch handler itself, without Serve's batch queue
        await Classifier.func_or_class._predict_batch.__wrapped__(clf, [(crop, "r1", 0.0)])
        return torch.get_num_threads()

    try:
        clf = Classifier.func_or_class(ModelConfig(name="mobilenet_v3_small", weights=None))
        model = clf.predictor.model
        with ThreadPoolExecutor(1) as requests:  # one thread, like a replica's request loop
            assert requests.submit(loop.run_until_complete, forward()).result() == 1
            with mock.patch.object(classifier.logger, "warning") as warning:
                clf.reconfigure({"torch_threads": 2, "max_batch_size": 4})
            assert "OMP_WAIT_POLICY=PASSIVE" in warning.call_args.args[0]  # beyond the share
            assert requests.submit(loop.run_until_complete, forward()).result() == 2
            assert clf.predictor.model is model and clf._warm_sizes == {1, 4, 8}
            clf.reconfigure({"max_batch_size": 4})
            assert requests.submit(loop.run_until_complete, forward()).result() == 1
        assert clf.threads == 1
    finally:
        loop.close()
        torch.set_num_threads(before)


def test_device_is_cpu_without_a_gpu_assignment():
    assert runtime.select_device({"CPU": 1}).type == "cpu"
    if not torch.cuda.is_available():
        assert runtime.select_device({"GPU": 0.25}).type == "cpu"


class _Payload:
    """Unpickling this creates a file: what a hostile weights file would do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_weights_load_with_weights_only_so_a_hostile_file_runs_nothing(tmp_path):
    import pickle

    from serve_app.config import ModelConfig
    from serve_app.models import build_model

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": _Payload(marker)}, weights)
    with pytest.raises(pickle.UnpicklingError):
        build_model(ModelConfig(name="resnet18", weights=None, weights_path=str(weights)))
    assert not marker.exists()
