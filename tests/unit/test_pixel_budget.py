"""The preprocessor's pixel budget, with threads and no Ray: what it lets through at once."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from serve_app import imaging
from serve_app.imaging import TransformSpec
from serve_app.pixel_budget import PixelBudget
from tests.hostile_images import encode

SPEC = TransformSpec(resize_size=64, crop_size=56, mean=(0.5,) * 3, std=(0.5,) * 3)


def _hold(budget: PixelBudget, pixels: int, seconds: float, seen: list[int]) -> None:
    with budget.reserve(pixels):
        seen.append(budget.in_use)
        time.sleep(seconds)


def test_never_more_than_the_limit_at_once():
    budget, seen = PixelBudget(100), []
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: _hold(budget, 30, 0.02, seen), range(16)))
    assert max(seen) <= 100 and budget.peak == 90  # three of 30 fit, a fourth waits
    assert budget.in_use == 0 and budget.waiting == 0


def test_without_a_limit_nothing_waits():
    budget, seen = PixelBudget(None), []
    barrier = threading.Barrier(8, timeout=5)

    def one(_):
        with budget.reserve(10**9):
            barrier.wait()  # all eight inside at once, or this times out
            seen.append(budget.in_use)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))
    assert budget.peak == 8 * 10**9


def test_an_image_over_the_whole_budget_runs_alone_and_does_not_deadlock():
    budget, seen = PixelBudget(100), []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_hold, budget, 60, 0.05, seen),
                   pool.submit(_hold, budget, 500, 0.05, seen),
                   pool.submit(_hold, budget, 60, 0.05, seen)]
        for f in futures:
            f.result(timeout=5)
    assert 500 in seen and budget.peak == 500  # alone: nothing else was in use beside it


def test_first_come_first_served_so_a_large_image_is_not_starved():
    budget, order = PixelBudget(100), []
    hold = budget.acquire(50)  # something is decoding

    def take(name, pixels):
        with budget.reserve(pixels):
            order.append(name)
            time.sleep(0.01)

    with ThreadPoolExecutor(4) as pool:
        big = pool.submit(take, "big", 100)  # waits for the 50 in use
        while budget.waiting < 1:
            time.sleep(0.001)
        small = [pool.submit(take, f"small{i}", 10) for i in range(3)]  # would fit beside it
        while budget.waiting < 4:
            time.sleep(0.001)
        budget.release(hold)
        for f in (big, *small):
            f.result(timeout=5)
    assert order[0] == "big", order


def test_a_limit_must_be_positive():
    with pytest.raises(ValueError):
        PixelBudget(0)


def test_preprocess_holds_the_budget_through_decode_and_resize(monkeypatch):
    """Concurrent preprocess calls (as Ray's thread pool runs the preprocessor's) decode one
    image's worth of pixels at a time when the budget is one image, and the reservation lasts
    until the resize is done: the full-size pixels are alive until then."""
    blob = encode(Image.new("RGB", (400, 300), (10, 120, 30)), "PNG")
    budget, during_resize = PixelBudget(400 * 300), []
    real = imaging.resize_crop

    def resize(image, spec):
        during_resize.append(budget.in_use)
        time.sleep(0.01)
        return real(image, spec)

    monkeypatch.setattr(imaging, "resize_crop", resize)
    with ThreadPoolExecutor(8) as pool:
        crops = list(pool.map(lambda _: imaging.preprocess(blob, SPEC, 10**7, budget), range(8)))
    assert all(c.shape == (3, 56, 56) for c in crops)
    assert during_resize == [400 * 300] * 8  # each resize ran holding its image, alone
    assert budget.peak == 400 * 300 and budget.in_use == 0


def test_a_failed_decode_gives_its_pixels_back():
    budget = PixelBudget(10**6)
    png = encode(Image.new("RGB", (400, 300)), "PNG")
    crops = imaging.preprocess_many([png[: len(png) // 2], png], SPEC, 10**7, budget=budget)
    assert crops.errors[0] is not None and crops.errors[1] is None
    assert budget.in_use == 0 and budget.peak == 400 * 300


def test_an_extreme_aspect_ratio_reserves_its_resized_size():
    """A 1000x10 image is 10 000 pixels, but its resize to a 64-pixel short side makes
    6400x64: that is what it costs, so that is what it reserves."""
    budget = PixelBudget(10**6)
    imaging.preprocess(encode(Image.new("RGB", (1000, 10)), "PNG"), SPEC, 10**7, budget)
    assert budget.peak == 6400 * 64


def test_the_budget_setting_defaults_to_one_image_and_names_its_key_when_too_small():
    from serve_app.config import ConfigError, parse_app_config

    assert parse_app_config({}).decode_budget_pixels == 40_000_000  # max_image_pixels
    assert parse_app_config({"max_image_pixels": 10**6}).decode_budget_pixels == 10**6
    assert parse_app_config({"max_decoding_pixels": 10**9}).decode_budget_pixels == 10**9
    for bad, why in [({"max_decoding_pixels": 39_999_999}, "under max_image_pixels"),
                     ({"max_decoding_pixels": 0}, "greater than 0"),
                     ({"max_decoding_pixels": "lots"}, "valid integer")]:
        with pytest.raises(ConfigError, match=f"args.max_decoding_pixels: .*{why}"):
            parse_app_config(bad)


def test_the_preprocessor_replica_gets_the_budget_from_args():
    """build_app passes args' budget to the Preprocessor deployment, default or set."""
    from serve_app.app import build_app

    for args, budget in [({}, 40_000_000), ({"max_decoding_pixels": 123_456_789}, 123_456_789)]:
        app = build_app({"model": {"name": "resnet18", "weights": None}, **args})
        models = app._bound_deployment.init_args[0]  # the Ingress's ModelHandles per model
        preprocessor = next(iter(models.values())).preprocessor._bound_deployment
        assert preprocessor.name == "Preprocessor"
        assert preprocessor.init_args[4] == budget, preprocessor.init_args
