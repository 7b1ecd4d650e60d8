"""BatchNorm folding into the preceding convolution keeps every version's outputs, in either memory format."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus
from deeplab_lit.models.fusion import count_batchnorms, fuse_conv_bn
from tests.tolerances import assert_close_to_scale

CL = torch.channels_last

VERSIONS = {
    "v1-vgg16": lambda: deeplab_v1(num_classes=3),
    "v1-resnet18": lambda: deeplab_v1(num_classes=3, backbone="resnet18"),
    "v2-resnet18-msc": lambda: deeplab_v2(num_classes=3, backbone="resnet18", msc_scales=(1.0, 0.5)),
    "v2-resnet18-caffe": lambda: deeplab_v2(num_classes=3, backbone="resnet18", style="caffe"),
    "v3-resnet50-os8-aux": lambda: deeplab_v3(
        num_classes=3, backbone="resnet50", output_stride=8, multi_grid=None, aux_head=True
    ),
    "v3plus-resnet18": lambda: deeplab_v3plus(num_classes=3, backbone="resnet18"),
    "v3plus-mobilenet_v2-separable": lambda: deeplab_v3plus(
        num_classes=3, backbone="mobilenet_v2", separable=True
    ),
    "v3plus-xception65-separable": lambda: deeplab_v3plus(
        num_classes=3, backbone="xception65", separable=True
    ),
}


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones are the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)


# Folding rounds each conv's weights once more (w * gamma / sigma): the outputs of the eight networks below,
# and of the channels-last one predict folds, moved by at most 1.6e-6 of their largest logit on a 2-core
# CPU VM. Folding without BatchNorm's eps (a plausible slip) moves them by 1.7e-5 to 1.6e-4 in six of the
# seven networks with BatchNorm (8e-6 in MobileNetV2's).
FOLDING_REL = 1e-5


def assert_folds_exactly(model: nn.Module, images: torch.Tensor) -> None:
    """Fold a copy of ``model``: no BatchNorm left, the same outputs to float rounding."""
    with torch.no_grad():
        expected = model(images)
        folded = fuse_conv_bn(model)
        actual = folded(images)
    assert count_batchnorms(folded) == 0
    assert_close_to_scale(actual, expected, FOLDING_REL)


@pytest.mark.parametrize("name", VERSIONS)
def test_folding_batchnorm_keeps_outputs_of_every_version(name):
    torch.manual_seed(0)
    model = VERSIONS[name]().eval()
    randomise_batchnorm(model)
    before = count_batchnorms(model)
    assert_folds_exactly(model, torch.randn(2, 3, 37, 45))
    assert count_batchnorms(model) == before  # the original is untouched (a copy was folded)
    assert (before == 0) == name.startswith("v1-vgg16")


def test_folding_covers_torchvision_style_bottlenecks_in_channels_last():
    model = deeplab_v3(num_classes=3, backbone="resnet50", multi_grid=(1, 2, 4)).eval()
    randomise_batchnorm(model)
    model.to(memory_format=CL)
    images = torch.randn(1, 3, 41, 33).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = model(images)
        folded = fuse_conv_bn(model)
        actual = folded(images)
    conv = folded.backbone.layer1[0].conv1
    assert conv.bias is not None and conv.weight.is_contiguous(memory_format=CL)
    assert_close_to_scale(actual, expected, FOLDING_REL)


def _conv_bn_relu() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    randomise_batchnorm(model)
    return model


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="nn.Module.compile needs dynamo")
def test_a_compiled_model_is_folded_into_an_uncompiled_copy():
    """Had the copy kept the compiled wrapper, it would run the original: changing the original after
    folding must not change the folded copy's output (torch's deep copy leaves the wrapper out)."""
    model, images = _conv_bn_relu(), torch.randn(1, 3, 9, 9)
    model.compile(backend="eager")  # dynamo without a C compiler
    with torch.no_grad():
        expected = model(images)
        folded = fuse_conv_bn(model)
        model[1].running_mean.add_(10.0)  # the original's output changes; the folded copy's must not
        actual = folded(images)
    assert count_batchnorms(folded) == 0
    assert_close_to_scale(actual, expected, FOLDING_REL)


def test_a_compiled_model_folded_in_place_is_returned_uncompiled():
    model = _conv_bn_relu()
    model.compile(backend="eager")  # lazy: nothing is traced here
    assert fuse_conv_bn(model, inplace=True) is model
    assert model._compiled_call_impl is None and count_batchnorms(model) == 0


def test_count_batchnorms_counts_every_kind_as_torchs_base_class_does():
    model = nn.Sequential(
        nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2), nn.LazyBatchNorm2d(),
        nn.InstanceNorm2d(2), nn.GroupNorm(1, 2), nn.LayerNorm(2),
    )  # fmt: skip
    assert count_batchnorms(model) == sum(isinstance(m, _BatchNorm) for m in model.modules()) == 5


def test_a_module_shared_twice_in_a_sequential_is_folded_at_both_places():
    conv, bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
    model = nn.Sequential(conv, bn, conv, bn).eval()
    randomise_batchnorm(model)
    assert_folds_exactly(model, torch.randn(1, 3, 5, 5))
