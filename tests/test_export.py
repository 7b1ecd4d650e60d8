"""ONNX export: every version runs in onnxruntime at other sizes than it was exported at, equal to PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab_lit.cli import main
from deeplab_lit.export import export_onnx

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus  # noqa: E402
from deeplab_lit.models.deeplab import MultiScaleSegmenter  # noqa: E402
from deeplab_lit.weights.load import classifier_keys  # noqa: E402

QUICKSTART = Path(__file__).parents[1] / "experiments" / "quickstart.yaml"
SIZES = [(1, 3, 65, 77), (2, 3, 41, 99)]  # odd sizes, neither the export example's (97x113)


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images.numpy()})[0]


def assert_matches_pytorch(model: torch.nn.Module, path: Path) -> None:
    model.eval()
    for size in SIZES:
        images = torch.randn(*size)
        found = run_onnx(path, images)
        with torch.no_grad():
            expected = model(images).numpy()
        assert found.shape == expected.shape == (size[0], expected.shape[1], size[2], size[3])
        assert 0.5 < np.abs(expected).max() < 1e3  # logits of a scale at which 1e-4 means something
        np.testing.assert_allclose(found, expected, atol=1e-4, rtol=0)


def with_unit_logits(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the classifier layers (Gaussian std 0.01 at init) so that the largest logit is about 5.

    They are the last linear layers, so the logits scale by the same factor (MSC's max and the bilinear
    upsampling are positively homogeneous); at that scale an absolute 1e-4 is a real test.
    """
    model.eval()
    with torch.no_grad():
        factor = 5.0 / float(model(torch.randn(1, 3, 65, 77)).abs().max())
        segmenter = model.segmenter if isinstance(model, MultiScaleSegmenter) else model
        parameters = dict(segmenter.named_parameters())
        for key in classifier_keys(segmenter):
            parameters[key].mul_(factor)
    return model


MODELS = {
    "v1_vgg16": lambda: deeplab_v1(num_classes=3, backbone="vgg16"),
    "v2_msc_resnet18": lambda: deeplab_v2(num_classes=3, backbone="resnet18", msc_scales=(1.0, 0.75, 0.5)),
    "v3_mobilenet_v2": lambda: deeplab_v3(num_classes=3, backbone="mobilenet_v2", multi_grid=None),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchscript_export_has_dynamic_batch_height_width(name, tmp_path):
    torch.manual_seed(0)
    model = with_unit_logits(MODELS[name]())
    path = export_onnx(model, tmp_path / f"{name}.onnx", exporter="torchscript")
    dims = [
        d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims == ["batch", 3, "height", "width"]
    assert_matches_pytorch(model, path)


def test_dynamo_export_of_v3plus_matches_pytorch(tmp_path):
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = with_unit_logits(deeplab_v3plus(num_classes=4, backbone="resnet18", output_stride=16))
    path = export_onnx(model, tmp_path / "v3plus.onnx", metadata={"class_names": '["a", "b", "c", "d"]'})
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}[
        "class_names"
    ] == '["a", "b", "c", "d"]'
    assert_matches_pytorch(model, path)


def test_unknown_exporter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown ONNX exporter 'tensorrt'"):
        export_onnx(deeplab_v1(num_classes=2, backbone="resnet18"), tmp_path / "m.onnx", exporter="tensorrt")


def test_export_subcommand_loads_a_plain_state_dict_into_the_configs_model(tmp_path):
    """Published and plain files go through the config's model (its class count and names)."""
    names = ["background", "disc", "square", "triangle", "ring", "cross"]
    model = with_unit_logits(deeplab_v3plus(num_classes=6, backbone="resnet18", channels=64))
    torch.save(model.state_dict(), tmp_path / "trained.pth")
    main(["export", "--config", str(QUICKSTART), "--exporter=torchscript", "--model.init_args.num_classes=6",
          f"--model.init_args.class_names={json.dumps(names)}", f"--ckpt_path={tmp_path / 'trained.pth'}",
          f"--output={tmp_path / 'model.onnx'}"])  # fmt: skip
    assert_matches_pytorch(model, tmp_path / "model.onnx")
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(metadata["class_names"]) == names and metadata["num_classes"] == "6"
    assert json.loads(metadata["normalization"])["std"] == [58.395, 57.12, 57.375]


def test_export_of_a_model_with_a_trained_crf_says_the_file_holds_the_network_alone(tmp_path, capsys):
    model = with_unit_logits(deeplab_v3plus(num_classes=6, backbone="resnet18", channels=64))
    torch.save(model.state_dict(), tmp_path / "trained.pth")
    main(["export", "--config", str(QUICKSTART), "--exporter=torchscript", "--model.init_args.num_classes=6",
          "--model.init_args.crf_rnn={iterations: 5}", f"--ckpt_path={tmp_path / 'trained.pth'}",
          f"--output={tmp_path / 'model.onnx'}"])  # fmt: skip
    assert_matches_pytorch(model, tmp_path / "model.onnx")  # the network's logits
    assert "without its trained CRF (crf_rnn)" in capsys.readouterr().out


def with_calibrated_statistics(model: torch.nn.Module, mean: float = 300.0) -> torch.nn.Module:
    """Give every BatchNorm of ``model`` a large running mean, cancelled by its bias, as trained ones have.

    In exact arithmetic the network computes what it did; in float32 ``x - mean`` loses the low bits of a
    large number, so PyTorch and ONNX Runtime (which folds BatchNorm into the convolution) both round by
    far more than the 1e-4 an absolute tolerance allows: the case a fixed tolerance refused.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                scale = module.weight / torch.sqrt(module.running_var + module.eps)
                module.running_mean.fill_(mean)
                module.bias.add_(scale * mean)
    return model.eval()


def test_a_correct_export_of_a_calibrated_network_passes_and_a_wrong_one_is_refused(tmp_path):
    from deeplab_lit.export import NOISE_FACTOR, float32_noise, verify_onnx

    torch.manual_seed(0)
    model = with_unit_logits(with_calibrated_statistics(deeplab_v3(num_classes=3, backbone="resnet18")))
    images = torch.randn(2, 3, 97, 113)
    expected, noise = float32_noise(model, images)
    path = export_onnx(model, tmp_path / "calibrated.onnx", exporter="torchscript", verify=False)
    difference = float(np.abs(run_onnx(path, images) - expected.numpy()).max())
    fixed = 1e-4 + 1e-5 * float(expected.abs().max())
    assert difference > fixed  # what the fixed tolerance refused
    assert difference <= NOISE_FACTOR * noise  # as close as PyTorch's own float32 rounding allows
    assert verify_onnx(model, path, images) == pytest.approx(difference)
    with torch.no_grad():  # another network: a 1 % change of one layer moves the logits far beyond that
        model.head[-1].weight.mul_(1.01)
    with pytest.raises(RuntimeError, match="differs from PyTorch by .*own float32 error"):
        verify_onnx(model, path, images)
