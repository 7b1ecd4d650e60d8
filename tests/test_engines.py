"""Predict engines: each gives the eager network's labels, with TTA and sliding windows, at odd sizes."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.engines import predict_network
from deeplab_lit.inference import InferenceConfig, segment
from tests.models.test_fusion import FOLDING_REL, randomise_batchnorm
from tests.tolerances import assert_close_to_scale

INFERENCE = {
    "plain": InferenceConfig(),
    "tta": InferenceConfig(scales=(0.75, 1.0), flip=True),
    "sliding window": InferenceConfig(window=(33, 41)),
}
HAS_ONNXRUNTIME = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))


def small_module(**options) -> DeepLabV3Plus:
    """A narrow v3+ whose BatchNorm statistics are real (not the identity a fresh one has)."""
    torch.manual_seed(0)
    module = DeepLabV3Plus(
        num_classes=3, backbone="resnet18", channels=16, pretrained_backbone=False, **options
    )
    randomise_batchnorm(module.model)
    return module


def predict(module: DeepLabV3Plus, images: torch.Tensor) -> dict:
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    (output,) = Trainer(accelerator="cpu", **options).predict(
        module, dataloaders=DataLoader([{"image": images}], batch_size=None)
    )
    return output


def assert_eager_labels(
    module: DeepLabV3Plus, images: torch.Tensor, config: InferenceConfig, output: dict
) -> None:
    module.eval()
    with torch.no_grad():
        expected = segment(module.model, images, config)  # the unfolded network, channels-first
    assert_close_to_scale(output["logits"], expected, FOLDING_REL)
    assert torch.equal(output["preds"], expected.argmax(1))


@pytest.mark.parametrize("inference", INFERENCE.values(), ids=INFERENCE.keys())
@pytest.mark.parametrize(
    "engine",
    [
        "eager",
        pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="export extra")),
    ],
)
def test_an_engine_gives_the_eager_networks_labels(engine, inference):
    module = small_module(predict_engine=engine, inference=inference)
    images = torch.randn(2, 3, 45, 61)
    output = predict(module, images)
    assert_eager_labels(module, images, inference, output)
    assert module._folded == {}  # predict leaves no engine behind


def test_the_compile_engine_gives_the_eager_networks_labels():
    # Sliding windows and flips: every call at the window's size, so one compilation for all of them
    windows = InferenceConfig(window=(33, 41), flip=True)
    module = small_module(predict_engine="compile", inference=windows)
    images = torch.randn(1, 3, 45, 61)
    assert_eager_labels(module, images, windows, predict(module, images))


def test_an_unknown_or_unavailable_engine_is_refused_before_any_work(monkeypatch):
    with pytest.raises(
        ValueError, match=r"predict_engine must be one of \('eager', 'compile', 'onnxruntime'\)"
    ):
        small_module(predict_engine="tensorrt")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(ImportError, match=r"needs onnxruntime: pip install 'deeplab-lit\[export\]'"):
        small_module(predict_engine="onnxruntime")


def test_onnxruntime_is_refused_on_another_device_than_the_cpu():
    network = small_module().model
    with pytest.raises(ValueError, match="runs on the CPU; this predict runs on cuda"):
        predict_network(network, "onnxruntime", torch.device("cuda"))
