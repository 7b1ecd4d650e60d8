"""Inference: TTA and sliding windows agree with plain inference where they must; above ``max_pixels`` it
runs in sliding windows, below it exactly as whole-image inference."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.inference import (
    AUTO_WINDOW_SHARE,
    DEFAULT_MAX_PIXELS,
    InferenceConfig,
    _announce_window,
    auto_window,
    segment,
    sliding_window,
)
from deeplab_lit.models import deeplab_v3plus

HEIGHT, WIDTH = 40, 56  # 2240 pixels


@pytest.fixture(scope="module")
def model():
    """A small v3+ in eval mode: its image pooling sees the whole input, so windows change its logits."""
    torch.manual_seed(0)
    return with_varied_statistics(deeplab_v3plus(num_classes=3, backbone="resnet18", channels=8).eval())


def with_varied_statistics(net):
    """Give BatchNorm non-default statistics and the classifier larger weights, so that a random
    network's logits vary across the image by more than float rounding."""
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        net.decoder.classifier.weight.mul_(30)
    return net


@pytest.fixture
def images():
    return torch.randn(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))


class SizeSpy(torch.nn.Module):
    """The real model, noting the size of every input it is given."""

    def __init__(self, net):
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.net(x)


def test_at_or_below_max_pixels_results_are_those_of_whole_image_inference(model, images):
    with torch.inference_mode():
        whole = model(images)
        assert torch.equal(segment(model, images, InferenceConfig(max_pixels=HEIGHT * WIDTH)), whole)
        assert torch.equal(segment(model, images), whole)  # the default is far above this size
        windowed = segment(model, images, InferenceConfig(max_pixels=HEIGHT * WIDTH - 1))
    assert (windowed - whole).abs().max() > 1e-3  # one pixel more and the windows would show


def test_tta_below_max_pixels_sums_the_views_as_whole_image_inference_does(model, images):
    config = InferenceConfig(scales=(0.75, 1.0), flip=True, max_pixels=HEIGHT * WIDTH)
    with torch.inference_mode():
        views = []
        for size in ((30, 42), (HEIGHT, WIDTH)):
            scaled = torch.nn.functional.interpolate(images, size, mode="bilinear", align_corners=False)
            views += [model(scaled), model(scaled.flip(-1)).flip(-1)]
        views = [torch.nn.functional.interpolate(v, (HEIGHT, WIDTH), mode="bilinear") for v in views]
        expected = (((views[0] + views[1]) + views[2]) + views[3]) / 4
        assert torch.equal(segment(model, images, config), expected)
        assert torch.equal(segment(model, images, InferenceConfig(scales=(0.75, 1.0), flip=True)), expected)


def test_tta_never_writes_into_the_models_output():
    images = torch.randn(1, 3, 8, 10)
    before = images.clone()
    logits = segment(lambda x: x, images, InferenceConfig(scales=(1.0, 0.5)))  # scale 1: the input itself
    assert torch.equal(images, before)
    half = torch.nn.functional.interpolate(before, (4, 5), mode="bilinear")
    assert torch.equal(logits, (before + torch.nn.functional.interpolate(half, (8, 10), mode="bilinear")) / 2)


def test_above_max_pixels_every_forward_is_within_max_pixels_and_covers_the_image(model, images):
    spy, max_pixels = SizeSpy(model), 1200
    with torch.inference_mode():
        logits = segment(spy, images, InferenceConfig(max_pixels=max_pixels))
        window = auto_window(HEIGHT, WIDTH, max_pixels // AUTO_WINDOW_SHARE)
        assert torch.equal(logits, sliding_window(model, images, window))
    assert len(spy.sizes) > 1 and all(h * w <= max_pixels // AUTO_WINDOW_SHARE for h, w in spy.sizes)
    assert set(spy.sizes) == {window}


def test_each_scale_is_windowed_only_when_it_is_over_max_pixels(model, images):
    spy = SizeSpy(model)
    with torch.inference_mode():
        segment(spy, images, InferenceConfig(scales=(0.5, 1.0), max_pixels=1200))
    assert spy.sizes[0] == (20, 28)  # 560 pixels: whole
    assert len(spy.sizes) > 2 and all(h * w <= 300 for h, w in spy.sizes[1:])


def test_an_explicit_window_wins_and_max_pixels_none_never_windows(model, images):
    spy = SizeSpy(model)
    with torch.inference_mode():
        segment(spy, images, InferenceConfig(window=(20, 20), max_pixels=None))
        assert set(spy.sizes) == {(20, 20)}
        spy.sizes.clear()
        segment(spy, images, InferenceConfig(max_pixels=None))
        assert spy.sizes == [(HEIGHT, WIDTH)]


@pytest.mark.parametrize(
    ("height", "width", "max_pixels", "expected"),
    [
        (3000, 4000, 4_000_000, (2000, 2000)),  # a square of the budget
        (1000, 8000, 4_000_000, (1000, 4000)),  # a panorama: full height, the rest of the budget in width
        (8000, 500, 4_000_000, (8000, 500)),  # fits: the image itself (whole)
        (9, 9, 10, (3, 3)),
    ],
)
def test_auto_window_uses_the_budget_and_stays_inside_the_image(height, width, max_pixels, expected):
    window = auto_window(height, width, max_pixels)
    assert window == expected
    assert window[0] * window[1] <= max_pixels and window[0] <= height and window[1] <= width


def test_default_keeps_cityscapes_tta_and_12_megapixel_photos_whole_and_windows_24_megapixels():
    config = InferenceConfig()
    assert config.max_pixels == DEFAULT_MAX_PIXELS
    for height, width in ((1024, 2048), (round(1024 * 1.75), round(2048 * 1.75)), (3000, 4000), (3024, 4032)):
        assert config.window_for(height, width) is None
    window = config.window_for(4000, 6000)
    assert window is not None and window[0] * window[1] <= DEFAULT_MAX_PIXELS // AUTO_WINDOW_SHARE


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "4e6"])
def test_max_pixels_must_be_a_positive_integer_or_none(bad):
    with pytest.raises(ValueError, match=rf"max_pixels must be a positive number .*got {bad!r}"):
        InferenceConfig(max_pixels=bad)


def test_the_switch_is_announced_once_per_size_with_the_size_and_the_window(model, caplog):
    _announce_window.cache_clear()
    config = InferenceConfig(max_pixels=1200)
    with caplog.at_level(logging.INFO), torch.inference_mode():
        segment(model, torch.randn(1, 3, HEIGHT, WIDTH), config)
        segment(model, torch.randn(2, 3, HEIGHT, WIDTH), config)
        segment(model, torch.randn(1, 3, 30, 50), config)
    lines = [r.getMessage() for r in caplog.records if "sliding windows" in r.getMessage()]
    assert len(lines) == 2
    assert f"{WIDTH}x{HEIGHT} image" in lines[0] and "windows of 17x17" in lines[0]
    assert "50x30 image" in lines[1] and "max_pixels = 1200" in lines[1]


def _trainer():
    return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False)  # fmt: skip


def test_validate_test_and_predict_all_switch_to_windows_above_max_pixels(caplog):
    torch.manual_seed(0)
    module = DeepLabV3Plus(num_classes=3, backbone="resnet18", channels=8,
                           inference=InferenceConfig(max_pixels=1200))  # fmt: skip
    with_varied_statistics(module.model)
    batch = {"image": torch.randn(3, HEIGHT, WIDTH), "mask": torch.randint(0, 3, (HEIGHT, WIDTH))}
    loader = DataLoader([batch], batch_size=1)
    images, masks = batch["image"][None], batch["mask"][None]
    with torch.inference_mode():
        windowed = sliding_window(module.model.eval(), images, auto_window(HEIGHT, WIDTH, 300))
        whole = module.model(images)
    loss = torch.nn.functional.cross_entropy(windowed, masks).item()
    whole_loss = torch.nn.functional.cross_entropy(whole, masks).item()
    assert abs(loss - whole_loss) > 1e-3
    for stage in ("validate", "test"):
        _announce_window.cache_clear()
        with caplog.at_level(logging.INFO):
            scores = getattr(_trainer(), stage)(module, loader, verbose=False)[0]
        key = "val/loss" if stage == "validate" else "test/loss"
        assert scores[key] == pytest.approx(loss, abs=1e-5)
        assert f"{WIDTH}x{HEIGHT} image" in caplog.text
        caplog.clear()
    _announce_window.cache_clear()
    with caplog.at_level(logging.INFO):
        predicted = _trainer().predict(module, loader)[0]["logits"]
    assert f"{WIDTH}x{HEIGHT} image" in caplog.text
    assert torch.allclose(predicted, windowed, atol=1e-4)  # predict folds BatchNorm: equal to ~1e-5


def test_a_config_saved_before_max_pixels_existed_loads_with_the_default(tmp_path):
    old = InferenceConfig(flip=True)
    del old.__dict__["max_pixels"]  # as pickled in the hyper-parameters of an older checkpoint
    torch.save({"inference": old}, tmp_path / "old.ckpt")
    torch.serialization.add_safe_globals([InferenceConfig])
    loaded = torch.load(tmp_path / "old.ckpt", weights_only=True)["inference"]
    assert loaded.flip and loaded.max_pixels == DEFAULT_MAX_PIXELS
    assert loaded.window_for(4000, 6000) is not None


# ------------------------------------------------------------------------------ TTA and sliding windows
class PixelwiseModel(nn.Module):
    """A 1x1 convolution: receptive field of one pixel, so windows and flips cannot change its output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(scope="module")
def deeplab() -> nn.Module:
    torch.manual_seed(0)
    return DeepLabV3Plus(num_classes=4, backbone="resnet18").model.eval()


def test_one_scale_no_flip_and_a_window_larger_than_the_image_equal_plain_inference(deeplab):
    images = torch.randn(2, 3, 45, 59)
    with torch.no_grad():
        plain = deeplab(images)
        assert torch.equal(segment(deeplab, images, InferenceConfig(scales=(1.0,), flip=False)), plain)
        big_window = InferenceConfig(window=(64, 64))  # larger than the image: one window, the whole image
        assert torch.equal(segment(deeplab, images, big_window), plain)
        assert torch.equal(sliding_window(deeplab, images, (45, 59)), plain)
        repeated = segment(deeplab, images, InferenceConfig(scales=(1.0, 1.0)))
        torch.testing.assert_close(repeated, plain, atol=1e-6, rtol=0)


def test_multi_scale_flip_gives_logits_at_the_image_size_and_differs_from_plain(deeplab):
    images = torch.randn(1, 3, 41, 53)
    config = InferenceConfig(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
    with torch.no_grad():
        logits = segment(deeplab, images, config)
        assert logits.shape == (1, 4, 41, 53)
        assert not torch.allclose(logits, deeplab(images))


def test_small_sliding_windows_and_flips_leave_a_pixelwise_model_unchanged():
    model, images = PixelwiseModel(), torch.randn(2, 3, 37, 83)
    with torch.no_grad():
        plain = model(images)
        windows = sliding_window(model, images, (16, 20), overlap=1 / 3)
        assert windows.shape == plain.shape
        torch.testing.assert_close(windows, plain, atol=1e-6, rtol=0)
        flipped = segment(model, images, InferenceConfig(flip=True, window=(16, 20)))
        torch.testing.assert_close(flipped, plain, atol=1e-6, rtol=0)
