"""Predict precisions: int8 calibrates on the data module's images and runs oneDNN's int8 kernels with nearly
all of fp32's labels; bf16 runs under autocast; each is refused, with one message, where it cannot run or pay.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from deeplab_lit import precision
from deeplab_lit.data import SyntheticDataModule
from deeplab_lit.inference import InferenceConfig, segment
from deeplab_lit.precision import Int8Network, cpu_flags
from tests.callbacks.test_prediction_writer import save_photo
from tests.test_engines import predict, small_module
from tests.tolerances import assert_close_to_scale

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="the int8 extra")
TRAINER = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
#: int8's error against fp32, as a share of the logits' largest magnitude: 5e-2 measured on this network
#: (3e-2 to 5e-2 on the trained quickstart model); a skipped calibration or a wrong scale is far above it.
INT8_REL = 0.15


def photo_folders(tmp_path, calibration_sizes=((40, 56), (48, 48), (40, 56))):
    """Two images of 45x61 to predict, and calibration images of other sizes (different seeds)."""
    for seed in range(2):
        save_photo(tmp_path / "photos" / f"p{seed}.png", size=(45, 61), seed=seed)
    for seed, size in enumerate(calibration_sizes, start=10):
        save_photo(tmp_path / "calibration" / f"c{seed}.png", size=size, seed=seed)
    return tmp_path / "photos", tmp_path / "calibration"


def data(tmp_path, photos, calibration=None) -> SyntheticDataModule:
    return SyntheticDataModule(
        root=str(tmp_path / "synthetic"), num_train=2, num_val=1, image_size=32, batch_size=2, crop_size=32,
        predict_path=str(photos), num_workers=0, val_batch_size=2,
        calibration_path=None if calibration is None else str(calibration),
    )  # fmt: skip


@needs_torchao
def test_int8_predict_calibrates_on_the_calibration_images_and_keeps_fp32s_labels(tmp_path):
    photos, calibration = photo_folders(tmp_path)
    flip = InferenceConfig(flip=True)  # test-time augmentation at one size: one lowering
    module = small_module(predict_precision="int8", inference=flip)
    datamodule = data(tmp_path, photos, calibration)
    seen: list[tuple[int, ...]] = []
    real_init = Int8Network.__init__

    def recording_init(self, network, images):  # records what calibrates, then runs the real thing
        images = list(images)
        seen.extend(tuple(image.shape) for image in images)
        real_init(self, network, images)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Int8Network, "__init__", recording_init)
        module.on_predict_start = _keeping(module)  # keep the int8 network to look inside
        (output,) = Trainer(**TRAINER).predict(module, datamodule=datamodule)
    assert seen == [(1, 3, 40, 56), (1, 3, 48, 48), (1, 3, 40, 56)]  # the calibration folder, in order
    network = module.kept
    lowered_ops = {str(n.target) for g in network.lowered.values() for n in g.graph.nodes}
    assert any("qconv" in op for op in lowered_ops), "no int8 convolution in the lowered graph"
    module.eval()
    with torch.no_grad():
        images = torch.stack([datamodule.predict_dataset[i]["image"] for i in range(2)])
        expected = segment(module.model, images, flip)
    assert_close_to_scale(output["logits"], expected, INT8_REL)
    assert (output["preds"] == expected.argmax(1)).float().mean() > 0.95


def _keeping(module):
    """``on_predict_start`` that also keeps what it built on ``module.kept`` (predict drops it at the end)."""
    original = module.on_predict_start

    def on_predict_start():
        original()
        module.kept = module._folded["model"]

    return on_predict_start


def test_bf16_predict_runs_under_autocast_and_returns_float32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # a CPU that has it
    module = small_module(predict_precision="bf16")
    images = torch.randn(2, 3, 45, 61)
    output = predict(module, images)
    module.eval()
    with torch.no_grad():
        expected = segment(module.model, images)
    assert output["logits"].dtype == torch.float32
    scale = expected.abs().max()
    assert (output["logits"] - expected).abs().max() > 1e-3 * scale  # bf16 ran: folding alone is ~1e-6 off
    assert_close_to_scale(output["logits"], expected, 0.05)  # bf16's 8-bit mantissa: ~1e-2 of the scale


def _must_not_run(*args, **kwargs):
    raise AssertionError("an image was predicted before the refusal")


def test_bf16_is_refused_on_a_cpu_without_bf16_instructions_before_any_image(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    module = small_module(predict_precision="bf16")
    module.predict_step = _must_not_run  # the refusal must come before any image
    with pytest.raises(ValueError, match="needs a CPU with AVX-512 BF16 or AMX"):
        predict(module, torch.randn(1, 3, 45, 61))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"predict_precision": "fp16"}, r"must be one of \('fp32', 'bf16', 'int8'\), got 'fp16'"),
        ({"predict_precision": "int8", "predict_engine": "compile"}, "with predict_engine='eager'"),
        ({"predict_precision": "bf16", "predict_engine": "onnxruntime"}, "runs fp32 only"),
    ],
)
def test_an_impossible_precision_is_refused_when_the_module_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        small_module(**options)


def test_int8_without_torchao_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name)
    )
    with pytest.raises(ImportError, match=r"needs torchao: pip install 'deeplab-lit\[int8\]'"):
        small_module(predict_precision="int8")


@needs_torchao
def test_int8_without_calibration_images_says_where_to_give_them(tmp_path):
    photos, _ = photo_folders(tmp_path)
    module = small_module(predict_precision="int8")
    with pytest.raises(ValueError, match="set the datamodule's calibration_path"):
        Trainer(**TRAINER).predict(module, datamodule=data(tmp_path, photos))
    loader = DataLoader([{"image": torch.randn(1, 3, 45, 61)}], batch_size=None)
    with pytest.raises(ValueError, match="this predict has no deeplab-lit data module"):
        Trainer(**TRAINER).predict(module, dataloaders=loader)


@needs_torchao
def test_an_unreadable_calibration_image_is_named(tmp_path):
    photos, calibration = photo_folders(tmp_path)
    (calibration / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Calibration image .*broken\.png cannot be read"):
        Trainer(**TRAINER).predict(
            small_module(predict_precision="int8"), datamodule=data(tmp_path, photos, calibration)
        )


def test_cpu_flags_show_what_torch_found():
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert "avx2" in cpu_flags()
    else:
        pytest.skip("not an x86 CPU with AVX2")
