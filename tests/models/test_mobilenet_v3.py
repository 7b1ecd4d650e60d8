"""MobileNetV3-Large under every DeepLab version; torchvision's deeplabv3_mobilenet_v3_large loaded exactly.

No downloads: torchvision's own models with random weights give the reference state dicts and logits; the
named entry loads a file planted in torch's checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation import (
    DeepLabV3_MobileNet_V3_Large_Weights,
    deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
)

from deeplab_lit import DeepLabV3
from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus
from deeplab_lit.models.backbones import backbone_family, build_backbone
from deeplab_lit.normalization import IMAGENET
from deeplab_lit.weights.load import build_published, load_weights, read_checkpoint
from deeplab_lit.weights.registry import describe_weights, get_weights, register_weights, unregister_weights
from tests.models.test_fusion import assert_folds_exactly, randomise_batchnorm
from tests.weights import imagenet_backbone

NAME = "deeplabv3_mobilenet_v3_large.coco_voc"
TORCHVISION_OPTIONS = {"backbone": "mobilenet_v3_large", "output_stride": 16, "atrous_rates": (12, 24, 36),
                       "multi_grid": None}  # fmt: skip


def with_batch_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics measured on random images; eval mode.

    The statistics a network would have: each BatchNorm's output keeps unit scale, so every layer shows in
    the logits. With made-up statistics (``tests.weights.test_load.randomize``) the signal fades through
    MobileNetV3's 17 layers: the logits vary by 0.01 over the image, and running the stride-removed block
    at the wrong rate (the MobileNetV2 rule) moves them by 8e-5, inside the 1e-4 tolerance; here by 6.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches below
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        model.train()
        for _ in range(2):
            model(torch.randn(2, 3, 97, 131, generator=generator))
    return model.eval()


def conv_layout(module: nn.Module) -> list[tuple]:
    """Every convolution's name, stride, dilation, padding and groups."""
    return [(n, m.stride, m.dilation, m.padding, m.groups) for n, m in module.named_modules()
            if isinstance(m, nn.Conv2d)]  # fmt: skip


def depthwise_rates(backbone: nn.Module) -> list[int]:
    """The dilation of each inverted residual block's depthwise convolution (features.1 to features.15)."""
    return [m.dilation[0] for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory):
    """torchvision's deeplabv3_mobilenet_v3_large with and without aux head, random, saved as published."""
    folder = tmp_path_factory.mktemp("tv_mobilenet_v3")
    files = {}
    for seed, aux in enumerate((True, False)):
        torch.manual_seed(seed)
        reference = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=aux)
        with_batch_statistics(reference, seed)
        path = folder / f"tv_aux_{aux}.pth"
        torch.save(reference.state_dict(), path)  # torchvision publishes the plain state dict
        files[aux] = (reference, path)
    return files


# ------------------------------------------------------------------------------------------------- backbone
def test_layout_is_torchvisions_dilated_network_at_os16_and_its_plain_one_at_os32():
    os16, os32 = build_backbone("mobilenet_v3_large"), build_backbone("mobilenet_v3_large", output_stride=32)
    assert conv_layout(os16.features) == conv_layout(
        torchvision.models.mobilenet_v3_large(weights=None, dilated=True).features
    )
    assert conv_layout(os32.features) == conv_layout(
        torchvision.models.mobilenet_v3_large(weights=None).features
    )
    # torchvision's rule: the block whose stride is removed already runs at the new rate
    assert depthwise_rates(os16) == [1] * 12 + [2] * 3
    os8 = build_backbone("mobilenet_v3_large", output_stride=8)
    assert depthwise_rates(os8) == [1] * 6 + [2] * 6 + [4] * 3


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_strides_and_channels_at_an_odd_size(output_stride):
    backbone = build_backbone("mobilenet_v3_large", output_stride=output_stride).eval()
    n, h, w = 2, 33, 47
    with torch.no_grad():
        features = backbone(torch.randn(n, 3, h, w))
    assert (backbone.low_channels, backbone.aux_channels, backbone.out_channels) == (24, 40, 960)
    assert features["low"].shape == (n, 24, math.ceil(h / 4), math.ceil(w / 4))
    assert features["aux"].shape == (n, 40, math.ceil(h / 8), math.ceil(w / 8))  # features.4 at every stride
    assert features["out"].shape == (n, 960, math.ceil(h / output_stride), math.ceil(w / output_stride))


def test_imagenet_weights_load_strictly_and_give_torchvisions_features(tmp_path):
    torch.manual_seed(0)
    classifier = with_batch_statistics(torchvision.models.mobilenet_v3_large(weights=None))
    path = tmp_path / "mobilenet_v3_large-imagenet.pth"
    torch.save(classifier.state_dict(), path)  # torchvision's layout: features.* and classifier.*
    backbone = imagenet_backbone("mobilenet_v3_large", output_stride=32, source=str(path)).eval()
    x = torch.randn(1, 3, 61, 77)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)["out"], classifier.features(x), atol=0, rtol=0)
    assert (
        backbone_family("mobilenet_v3_large").imagenet.default
        in torchvision.models.MobileNet_V3_Large_Weights.__members__
    )


# ---------------------------------------------------------------------------------------- torchvision's file
@pytest.mark.parametrize("aux", [True, False])
def test_torchvision_checkpoint_gives_torchvisions_logits(torchvision_files, aux):
    reference, path = torchvision_files[aux]
    ours = deeplab_v3(num_classes=21, aux_head=aux, **TORCHVISION_OPTIONS).eval()
    info = load_weights(ours, str(path), num_classes=21)
    assert info.format == "torchvision" and info.normalization == IMAGENET and info.num_classes == 21
    assert info.options == {**TORCHVISION_OPTIONS, "aux_head": aux}
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        expected, found = reference(x), ours.forward_train(x)
    assert found["out"].shape == (2, 21, 97, 131)
    torch.testing.assert_close(found["out"], expected["out"], atol=1e-4, rtol=0)
    assert set(found) == set(expected)
    if aux:
        torch.testing.assert_close(found["aux"], expected["aux"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("aux", [True, False])
def test_lightning_module_takes_the_options_from_torchvisions_file(torchvision_files, aux):
    reference, path = torchvision_files[aux]
    module = DeepLabV3(num_classes=21, weights=str(path)).eval()  # ResNet-101, multi-grid by default
    hparams = module.hparams
    assert (hparams.backbone, hparams.output_stride, hparams.multi_grid) == ("mobilenet_v3_large", 16, None)
    assert hparams.atrous_rates == [12, 24, 36] and hparams.aux_head == aux
    assert module.normalization == IMAGENET
    x = torch.randn(1, 3, 65, 71)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x)["out"], atol=1e-4, rtol=0)


def test_torchvision_file_into_another_build_and_other_torchvision_models_are_refused(
    torchvision_files, tmp_path
):
    _, path = torchvision_files[True]
    os8 = deeplab_v3(num_classes=21, **{**TORCHVISION_OPTIONS, "output_stride": 8}, aux_head=True)
    with pytest.raises(ValueError, match=r"output_stride=16.*output_stride=8.*backbone\.features\.7"):
        load_weights(os8, path)
    with pytest.raises(ValueError, match=r"conflict with the options given: output_stride=8"):
        DeepLabV3(num_classes=21, output_stride=8, weights=str(path))
    small = tmp_path / "small.pth"
    torch.save(torchvision.models.segmentation.deeplabv3.DeepLabV3(
        torchvision.models._utils.IntermediateLayerGetter(
            torchvision.models.mobilenet_v3_small(weights=None).features, {"12": "out"}
        ),
        torchvision.models.segmentation.deeplabv3.DeepLabHead(576, 21),
    ).state_dict(), small)  # fmt: skip
    with pytest.raises(ValueError, match=r"small\.pth.*not MobileNetV3-Large \(13 feature layers"):
        read_checkpoint(small)
    lraspp = tmp_path / "lraspp.pth"
    torch.save(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).state_dict(), lraspp)
    with pytest.raises(ValueError, match=r"lraspp\.pth.*not DeepLabV3 .*deeplabv3_mobilenet_v3_large"):
        read_checkpoint(lraspp)


# ------------------------------------------------------------------------------------------- named entry
def test_entry_says_what_torchvision_publishes():
    entry, weights = get_weights(NAME), DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    assert entry.url == weights.url and entry.file_name == Path(weights.url).name
    assert entry.sha256 is not None and weights.url.endswith(f"-{entry.sha256}.pth")  # the known prefix
    assert entry.class_names == tuple(weights.meta["categories"]) and entry.num_classes == 21
    assert {k: dict(v) for k, v in entry.metrics.items()} == weights.meta["_metrics"]
    assert entry.module_class == "deeplab_lit.DeepLabV3" and entry.normalization == IMAGENET
    assert dict(entry.options) == {**TORCHVISION_OPTIONS, "aux_head": True}
    assert "60.3 COCO-val2017-VOC-labels" in describe_weights()


@pytest.fixture
def planted(torchvision_files, tmp_path, monkeypatch):
    """The entry's copy, its file planted in torch's checkpoint folder (in tmp_path); removed after the test.

    The published file cannot be made here (its checksum is torchvision's): the copy has no URL and no
    checksum, so its file is looked for in torch's checkpoint folder, where the real one is kept.
    """
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    entry = dataclasses.replace(get_weights(NAME), name="deeplabv3_mobilenet_v3_large.planted", url=None,
                                file_name="planted.pth", sha256=None)  # fmt: skip
    entry.path.parent.mkdir(parents=True)
    entry.path.write_bytes(torchvision_files[True][1].read_bytes())
    register_weights(entry)
    yield entry
    unregister_weights(entry.name)


def test_the_name_loads_a_file_planted_in_torchs_checkpoint_folder(torchvision_files, planted):
    reference, _ = torchvision_files[True]
    assert planted.path == Path(torch.hub.get_dir()) / "checkpoints" / "planted.pth"
    net = build_published(planted.name)  # built from the entry's options alone
    module = DeepLabV3(num_classes=21, weights=planted.name).eval()
    assert module.hparams.backbone == "mobilenet_v3_large" and module.hparams.aux_head
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        expected = reference(x)["out"]
        torch.testing.assert_close(net(x), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(module(x), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- every version trains, folds
VERSIONS = {
    "v1": lambda: deeplab_v1(num_classes=3, backbone="mobilenet_v3_large"),
    "v2": lambda: deeplab_v2(num_classes=3, backbone="mobilenet_v3_large", atrous_rates=(2, 4)),
    "v3": lambda: deeplab_v3(num_classes=3, backbone="mobilenet_v3_large", multi_grid=None, aux_head=True),
    "v3+": lambda: deeplab_v3plus(num_classes=3, backbone="mobilenet_v3_large", output_stride=8, channels=32),
}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_trains_one_step_at_batch_size_2(version):
    torch.manual_seed(0)
    model = VERSIONS[version]().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, masks = torch.randn(2, 3, 41, 53), torch.randint(0, 3, (2, 41, 53))
    outputs = model.forward_train(images)
    assert outputs["out"].shape == (2, 3, 41, 53) and ("aux" in outputs) == (version == "v3")
    loss = sum(F.cross_entropy(logits, masks) for logits in outputs.values())
    stem = model.backbone.features[0][0].weight.detach().clone()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert not torch.equal(model.backbone.features[0][0].weight, stem)  # the gradient reached the stem


@pytest.mark.parametrize("version", ["v3", "v3+"])
def test_batchnorm_folding_keeps_the_outputs(version):
    torch.manual_seed(0)
    model = VERSIONS[version]().eval()
    randomise_batchnorm(model)
    assert_folds_exactly(model, torch.randn(2, 3, 37, 45))  # Hardswish and SE blocks fold as Sequentials
