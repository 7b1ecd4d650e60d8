import math

import pytest
import torch
import torchvision
from torch import nn

from deeplab_lit.models.backbone_base import resolve_multi_grid
from deeplab_lit.models.backbones import BACKBONES, build_backbone, layer4_blocks


def _structure(backbone: nn.Module) -> list[tuple]:
    return [
        (n, m.stride, m.dilation, m.padding) for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)
    ]


def _sizes(feats: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in feats.items()}


@torch.no_grad()
def _check_strides(backbone, output_stride: int, n: int = 2, h: int = 33, w: int = 47) -> None:
    feats = backbone.eval()(torch.randn(n, 3, h, w))
    assert feats["low"].shape == (n, backbone.low_channels, math.ceil(h / 4), math.ceil(w / 4)), _sizes(feats)
    expected = (n, backbone.out_channels, math.ceil(h / output_stride), math.ceil(w / output_stride))
    assert feats["out"].shape == expected, _sizes(feats)
    assert backbone.output_stride == output_stride
    if backbone.aux_channels is None:
        assert "aux" not in feats
    else:
        aux_stride = min(output_stride, 16)
        assert feats["aux"].shape == (
            n,
            backbone.aux_channels,
            math.ceil(h / aux_stride),
            math.ceil(w / aux_stride),
        )


@pytest.mark.parametrize(
    ("name", "output_stride"),
    [
        ("resnet18", 8),
        ("resnet18", 16),
        ("resnet18", 32),
        ("resnet34", 8),
        ("resnet34", 16),
        ("mobilenet_v2", 8),
        ("mobilenet_v2", 16),
        ("mobilenet_v2", 32),
        ("vgg16", 8),
    ],
)
def test_feature_strides_small_backbones(name, output_stride):
    _check_strides(build_backbone(name, output_stride=output_stride), output_stride)


@pytest.mark.parametrize("name", ["resnet101", "xception65"])
def test_feature_strides_large_backbones(name):
    for output_stride in (8, 16):
        _check_strides(build_backbone(name, output_stride=output_stride), output_stride, n=1, h=17, w=19)


def test_channels():
    expected = {"resnet18": (64, 512, 256), "mobilenet_v2": (24, 320, None)}
    for name, channels in expected.items():
        b = build_backbone(name)
        assert (b.low_channels, b.out_channels, b.aux_channels) == channels
        assert b.name == name


@pytest.mark.parametrize(("output_stride", "dilate"), [(8, [False, True, True]), (16, [False, False, True])])
def test_torchvision_style_equals_torchvision(output_stride, dilate):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(replace_stride_with_dilation=dilate).eval()
    ours = build_backbone("resnet50", output_stride=output_stride).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(state, strict=True)
    # identical module configuration (strides, dilations, paddings), block by block
    ref_modules = dict(reference.named_modules())
    for name, module in ours.named_modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            assert repr(module) == repr(ref_modules[name]), name
    x = torch.randn(1, 3, 35, 29)
    with torch.no_grad():
        feats = ours(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        low = reference.layer1(y)
        aux = reference.layer3(reference.layer2(low))
        out = reference.layer4(aux)
    torch.testing.assert_close(feats["low"], low, rtol=0, atol=0)
    torch.testing.assert_close(feats["aux"], aux, rtol=0, atol=0)
    torch.testing.assert_close(feats["out"], out, rtol=0, atol=0)
    assert (ours.low_channels, ours.out_channels, ours.aux_channels) == (256, 2048, 1024)
    assert feats["low"].shape[-2:] == (9, 8)
    assert feats["out"].shape == (1, 2048, math.ceil(35 / output_stride), math.ceil(29 / output_stride))


def test_resnet18_output_stride_32_equals_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    ours = build_backbone("resnet18", output_stride=32).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 45, 45)
    with torch.no_grad():
        expected = reference.avgpool(ours(x)["out"]).flatten(1)
        assert torch.equal(reference.fc(expected), reference(x))


def test_basic_block_dilation_rule():
    b = build_backbone("resnet18", output_stride=8)
    # torchvision rule: the formerly strided conv of a dilated layer keeps the previous rate
    assert b.layer3[0].conv1.dilation == (1, 1) and b.layer3[0].conv1.stride == (1, 1)
    assert b.layer3[0].conv2.dilation == (2, 2) and b.layer3[1].conv1.dilation == (2, 2)
    assert b.layer4[0].conv1.dilation == (2, 2) and b.layer4[0].conv2.dilation == (4, 4)
    assert b.layer4[1].conv2.padding == (4, 4)
    caffe = build_backbone("resnet18", output_stride=8, style="caffe")
    assert caffe.layer3[0].conv1.dilation == (2, 2) and caffe.layer4[0].conv1.dilation == (4, 4)


@pytest.fixture(scope="module")
def resnet50_pair():
    torch.manual_seed(0)
    tv = build_backbone("resnet50", output_stride=8).eval()
    caffe = build_backbone("resnet50", output_stride=8, style="caffe").eval()
    caffe.load_state_dict(tv.state_dict())
    return tv, caffe


def test_caffe_style_stride_position(resnet50_pair):
    tv, caffe = resnet50_pair
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    assert caffe.layer2[0].downsample[0].stride == (2, 2)
    assert caffe.maxpool.ceil_mode and not tv.maxpool.ceil_mode


def test_caffe_style_dilation_every_block(resnet50_pair):
    tv, caffe = resnet50_pair
    assert [blk.conv2.dilation[0] for blk in caffe.layer3] == [2] * len(caffe.layer3)
    assert [blk.conv2.dilation[0] for blk in caffe.layer4] == [4, 4, 4]
    assert [blk.conv2.dilation[0] for blk in tv.layer3][:2] == [1, 2]
    assert [blk.conv2.dilation[0] for blk in tv.layer4] == [2, 4, 4]


def test_caffe_style_ceil_pooling_and_outputs_differ(resnet50_pair):
    tv, caffe = resnet50_pair
    x = torch.randn(1, 3, 32, 32)  # conv1 gives 16x16: floor pooling -> 8, ceil pooling -> 9
    with torch.no_grad():
        assert tv(x)["low"].shape[-2:] == (8, 8)
        assert caffe(x)["low"].shape[-2:] == (9, 9)
        x = torch.randn(1, 3, 33, 33)  # odd: both pool to 9, same weights, different networks
        a, b = tv(x)["out"], caffe(x)["out"]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_multi_grid_rates():
    b16 = build_backbone("resnet50", output_stride=16, multi_grid=(1, 2, 4))
    assert [blk.conv2.dilation[0] for blk in b16.layer4] == [2, 4, 8]
    assert [blk.conv2.padding[0] for blk in b16.layer4] == [2, 4, 8]
    assert [blk.conv2.dilation[0] for blk in b16.layer3] == [1] * len(b16.layer3)
    b8 = build_backbone("resnet18", output_stride=8, multi_grid=(1, 2))  # resnet18's layer4 has 2 blocks
    assert [(blk.conv1.dilation[0], blk.conv2.dilation[0]) for blk in b8.layer4] == [(4, 4), (8, 8)]
    with torch.no_grad():
        assert b8.eval()(torch.randn(1, 3, 33, 33))["out"].shape[-2:] == (5, 5)


def test_paper_multi_grid_is_truncated_to_resnet18s_two_blocks():
    """The default (1, 2, 4) builds on ResNet-18 as (1, 2); ResNet-34 has three blocks and keeps all three."""
    paper, two = (
        build_backbone("resnet18", multi_grid=(1, 2, 4)),
        build_backbone("resnet18", multi_grid=(1, 2)),
    )
    assert [blk.conv2.dilation[0] for blk in paper.layer4] == [2, 4]  # OS 16: layer4 rate 2 times (1, 2)
    assert _structure(paper) == _structure(two)
    r34 = build_backbone("resnet34", multi_grid=(1, 2, 4))
    assert [blk.conv2.dilation[0] for blk in r34.layer4] == [2, 4, 8]
    assert (
        resolve_multi_grid("resnet18", [1, 2, 4], layer4_blocks("resnet18")) == (1, 2)
        and resolve_multi_grid("resnet50", None, layer4_blocks("resnet50")) is None
    )


def test_multi_grid_errors():
    with pytest.raises(ValueError, match=r"one rate per layer4 block \(3 for resnet34\).*\(1, 2, 4\)"):
        build_backbone("resnet34", multi_grid=(1, 2))
    with pytest.raises(ValueError, match=r"\(2 for resnet18\).*multi_grid=\(1, 2\) \(the paper's, truncated"):
        build_backbone("resnet18", multi_grid=(1, 3, 5))  # only the paper's grid is truncated
    with pytest.raises(ValueError, match=r"\(3 for resnet50\), got \(1, 2, 4, 8\)"):
        build_backbone("resnet50", multi_grid=(1, 2, 4, 8))
    with pytest.raises(ValueError, match="mobilenet_v2 has none"):  # the paper's grid builds without it
        build_backbone("mobilenet_v2", multi_grid=(1, 1))
    with pytest.raises(ValueError, match="positive integers"):
        build_backbone("resnet18", multi_grid=(1, 0, 2))


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match=r"'resnet9'.*resnet18"):
        build_backbone("resnet9")
    with pytest.raises(ValueError, match=r"output_stride=4.*\(8, 16, 32\)"):
        build_backbone("resnet18", output_stride=4)
    with pytest.raises(ValueError, match=r"output_stride=16.*vgg16.*\(8,\)"):
        build_backbone("vgg16", output_stride=16)
    with pytest.raises(ValueError, match=r"'pytorch'.*torchvision.*caffe"):
        build_backbone("resnet18", style="pytorch")
    with pytest.raises(ValueError, match="ResNet option"):
        build_backbone("mobilenet_v2", style="caffe")
    assert len(BACKBONES) == 8


def test_vgg16_largefov_layout():
    b = build_backbone("vgg16", output_stride=8)
    f = b.features
    assert [f[i].stride for i in (4, 9, 16, 23, 30)] == [2, 2, 2, 1, 1]
    assert all(f[i].kernel_size == 3 and f[i].padding == 1 for i in (4, 9, 16, 23, 30))
    assert [f[i].dilation for i in (24, 26, 28)] == [(2, 2)] * 3
    assert [f[i].dilation for i in (17, 19, 21)] == [(1, 1)] * 3
    assert isinstance(f[31], nn.AvgPool2d) and f[31].stride == 1
    reference = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    b.features.load_state_dict(reference.state_dict(), strict=True)  # torchvision's features.* keys


def test_mobilenet_v2_dilation_rule():
    b = build_backbone("mobilenet_v2", output_stride=8)

    def depthwise(i):
        return next(m for m in b.features[i].modules() if isinstance(m, nn.Conv2d) and m.groups > 1)

    # stride removed at block 7 (stride 8 -> 16): it keeps rate 1, later blocks use 2; again at block 14
    assert [depthwise(i).stride[0] for i in (2, 4, 7, 14)] == [2, 2, 1, 1]
    assert [depthwise(i).dilation[0] for i in (6, 7, 8, 13, 14, 15, 17)] == [1, 1, 2, 2, 2, 4, 4]
    assert depthwise(15).padding == (4, 4)
    assert len(b.features) == 18  # the 1280-channel conv is dropped
