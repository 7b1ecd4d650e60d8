import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deeplab_lit.models import (
    ASPPSum,
    LargeFOVHead,
    MultiScaleSegmenter,
    Segmenter,
    build_backbone,
    deeplab_v1,
    deeplab_v2,
    deeplab_v3,
    deeplab_v3plus,
)
from deeplab_lit.weights import build_network

ODD_SIZES = [(2, 33, 47), (1, 65, 41)]


def _check_output(model: nn.Module, num_classes: int) -> None:
    model.eval()
    with torch.no_grad():
        for n, h, w in ODD_SIZES:
            assert model(torch.randn(n, 3, h, w)).shape == (n, num_classes, h, w)


@pytest.mark.parametrize(
    ("builder", "kwargs"),
    [
        (deeplab_v1, {"backbone": "resnet18"}),
        (deeplab_v2, {"backbone": "resnet18"}),
        (deeplab_v2, {"backbone": "mobilenet_v2", "output_stride": 16, "msc_scales": (1.0, 0.75)}),
        (deeplab_v3, {"backbone": "resnet18", "multi_grid": (1, 2), "aux_head": True}),
        (deeplab_v3, {"backbone": "resnet18"}),  # the paper's default multi-grid, truncated to 2 blocks
        (deeplab_v3, {"backbone": "mobilenet_v2", "output_stride": 8, "multi_grid": None}),
        (deeplab_v3plus, {"backbone": "resnet18", "output_stride": 8}),
        (deeplab_v3plus, {"backbone": "mobilenet_v2", "separable": True}),
        (deeplab_v3plus, {"backbone": "resnet18", "channels": 32}),
    ],
)
def test_builders_give_logits_at_input_size(builder, kwargs):
    torch.manual_seed(0)
    _check_output(builder(num_classes=3, **kwargs), 3)


def test_deeplab_v1_vgg16_largefov():
    model = deeplab_v1(num_classes=4)
    assert isinstance(model.head, LargeFOVHead) and model.head.fc6.dilation == (12, 12)
    assert model.backbone.output_stride == 8
    model.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 41, 35)
        assert model.forward_logits(x).shape == (1, 4, 6, 5)  # stride 8, ceil
        assert model(x).shape == (1, 4, 41, 35)


def test_xception65_v3plus():
    model = deeplab_v3plus(num_classes=2, backbone="xception65").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 35, 33)).shape == (1, 2, 35, 33)


def test_v3plus_logits_at_stride_four_and_forward_consistency():
    torch.manual_seed(0)
    model = deeplab_v3plus(num_classes=3, backbone="resnet18").eval()
    x = torch.randn(1, 3, 45, 51)
    with torch.no_grad():
        logits = model.forward_logits(x)
        assert logits.shape == (1, 3, 12, 13)
        expected = F.interpolate(logits, size=(45, 51), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.forward_train(x)["out"], expected)


@pytest.mark.parametrize("builder", [deeplab_v3, deeplab_v3plus])
def test_batch_size_one_trains(builder):
    torch.manual_seed(0)
    model = builder(num_classes=3, backbone="resnet18", multi_grid=None, aux_head=True).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, target = torch.randn(1, 3, 33, 35), torch.randint(0, 3, (1, 33, 35))
    target[0, :4] = 255
    outputs = model.forward_train(x)
    assert set(outputs) == {"out", "aux"}
    assert outputs["out"].shape == outputs["aux"].shape == (1, 3, 33, 35)
    loss = sum(F.cross_entropy(v, target, ignore_index=255) for v in outputs.values())
    pooling_conv = model.head[0].convs[-1][1] if builder is deeplab_v3 else model.head.convs[-1][1]
    before = pooling_conv.weight.detach().clone()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(pooling_conv.weight, before)  # the image-pooling branch trained too


def test_msc_fuses_by_max_and_returns_every_scale():
    torch.manual_seed(0)
    model = deeplab_v2(num_classes=3, backbone="resnet18", output_stride=16, msc_scales=(1.0, 0.75, 0.5))
    assert isinstance(model, MultiScaleSegmenter) and model.backbone is model.segmenter.backbone
    model.eval()
    x = torch.randn(1, 3, 41, 37)
    with torch.no_grad():
        base = model.segmenter
        logits = {
            s: base.forward_logits(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
            for s in (0.75, 0.5)
        }
        logits[1.0] = base.forward_logits(x)
        size = logits[1.0].shape[-2:]
        resized = [F.interpolate(v, size=size, mode="bilinear", align_corners=False) for v in logits.values()]
        expected = torch.maximum(torch.maximum(resized[0], resized[1]), resized[2])
        torch.testing.assert_close(model.forward_logits(x), expected)
        out = model.forward_train(x)
    assert list(out) == ["out", "scale_1.0", "scale_0.75", "scale_0.5"]
    assert all(v.shape == (1, 3, 41, 37) for v in out.values())
    upsampled = F.interpolate(expected, size=(41, 37), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["out"], upsampled)
    torch.testing.assert_close(model(x), upsampled)
    torch.testing.assert_close(
        out["scale_0.5"], F.interpolate(logits[0.5], size=(41, 37), mode="bilinear", align_corners=False)
    )
    assert not torch.allclose(out["out"], out["scale_1.0"])  # the fusion changed something


def test_msc_trains_and_validates_scales():
    model = MultiScaleSegmenter(
        Segmenter(build_backbone("resnet18", output_stride=8), ASPPSum(512, 2, (1, 2))), (1.0, 0.5)
    )
    outputs = model.train().forward_train(torch.randn(1, 3, 33, 33))
    sum(v.mean() for v in outputs.values()).backward()
    with pytest.raises(ValueError, match="including 1.0"):
        MultiScaleSegmenter(model.segmenter, (0.5, 0.75))
    with pytest.raises(ValueError, match="including 1.0"):
        deeplab_v2(num_classes=2, backbone="resnet18", msc_scales=(1.0, -0.5))
    with pytest.raises(ValueError, match="too small"):
        MultiScaleSegmenter(model.segmenter, (1.0, 0.1)).eval()(torch.randn(1, 3, 5, 5))


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="num_classes"):
        deeplab_v3(num_classes=0, backbone="resnet18")
    with pytest.raises(ValueError, match="atrous_rates"):
        deeplab_v3plus(num_classes=2, backbone="resnet18", atrous_rates=(6, -12, 18))
    with pytest.raises(ValueError, match="atrous_rates"):
        deeplab_v2(num_classes=2, backbone="resnet18", atrous_rates=())
    with pytest.raises(ValueError, match="output_stride=4"):
        deeplab_v3(num_classes=2, backbone="resnet18", output_stride=4)
    with pytest.raises(ValueError, match="'resnet200'"):
        deeplab_v2(num_classes=2, backbone="resnet200")
    with pytest.raises(ValueError, match="vgg16 is the DeepLab v1/v2 backbone"):
        deeplab_v3(num_classes=2, backbone="vgg16")
    with pytest.raises(
        ValueError, match=r"multi_grid=\(1, 2\) .*mobilenet_v2 has none: pass multi_grid=None"
    ):
        deeplab_v3(num_classes=2, backbone="mobilenet_v2", multi_grid=(1, 2))
    with pytest.raises(ValueError, match="aux_head=True needs .*'aux' output.*mobilenet_v2 has none"):
        deeplab_v3plus(num_classes=2, backbone="mobilenet_v2", aux_head=True)
    with pytest.raises(ValueError, match="output_stride=16.*vgg16"):
        deeplab_v1(num_classes=2, output_stride=16)
    with pytest.raises(ValueError, match="largefov_rate"):
        deeplab_v1(num_classes=2, largefov_rate=0)
    with pytest.raises(ValueError, match="'aux' output; mobilenet_v2 has none"):
        Segmenter(build_backbone("mobilenet_v2"), ASPPSum(320, 2, (1,)), aux_classifier=nn.Conv2d(8, 2, 1))


def test_option_errors_come_before_the_imagenet_weights_are_read(tmp_path):
    missing = str(tmp_path / "missing.pth")  # reading it would raise FileNotFoundError
    with pytest.raises(ValueError, match="atrous_rates"):
        build_network(
            deeplab_v3,
            dict(num_classes=2, backbone="resnet18", atrous_rates=(0,), pretrained_backbone=missing),
        )
    with pytest.raises(ValueError, match="including 1.0"):
        build_network(
            deeplab_v2,
            dict(num_classes=2, backbone="resnet18", msc_scales=(0.5,), pretrained_backbone=missing),
        )
    with pytest.raises(ValueError, match="aux_head=True needs .*'aux' output.*mobilenet_v2 has none"):
        build_network(
            deeplab_v3plus,
            dict(num_classes=2, backbone="mobilenet_v2", aux_head=True, pretrained_backbone=missing),
        )
    with pytest.raises(FileNotFoundError, match="missing.pth"):  # good options: the file is read last
        build_network(
            deeplab_v2,
            dict(num_classes=2, backbone="resnet18", msc_scales=(1.0, 0.5), pretrained_backbone=missing),
        )


def test_v3plus_channels_sets_aspp_and_decoder_width():
    narrow = deeplab_v3plus(num_classes=3, backbone="resnet18", channels=32)
    heads = [narrow.head, narrow.decoder]
    widths = {m.out_channels for h in heads for m in h.modules() if isinstance(m, nn.Conv2d)} - {3}
    assert widths == {32, 48}  # ASPP and decoder at 32; the 48-channel low-level projection stays
    paper = deeplab_v3plus(num_classes=3, backbone="resnet18")

    def head_params(m):
        return sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in m.backbone.parameters())

    assert head_params(narrow) < head_params(paper) / 10
    with pytest.raises(ValueError, match=r"channels must be a positive int .* got 0"):
        deeplab_v3plus(num_classes=3, backbone="resnet18", channels=0)


def test_default_aspp_rates_follow_output_stride():
    rates = [
        [
            b[0].dilation[0]
            for b in deeplab_v3(num_classes=2, backbone="resnet18", multi_grid=None, output_stride=s)
            .head[0]
            .convs[1:4]
        ]
        for s in (16, 8)
    ]
    assert rates == [[6, 12, 18], [12, 24, 36]]


def test_v3_matches_torchvision_deeplabv3_resnet50():
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=5, aux_loss=True
    ).eval()
    ours = deeplab_v3(
        num_classes=5,
        backbone="resnet50",
        output_stride=8,
        atrous_rates=(12, 24, 36),
        multi_grid=None,
        aux_head=True,
    ).eval()
    prefix = {"backbone.": "backbone.", "classifier.": "head.", "aux_classifier.": "aux_classifier."}
    state = {}
    for key, value in reference.state_dict().items():
        old = next(p for p in prefix if key.startswith(p))
        state[prefix[old] + key[len(old) :]] = value
    ours.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 35, 29)
    with torch.no_grad():
        expected = reference(x)
        got = ours.forward_train(x)
    torch.testing.assert_close(got["out"], expected["out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["aux"], expected["aux"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "xception65", "timm:efficientnet_b0", "resnet18"])
def test_v3_default_multi_grid_is_the_papers_adapted_to_the_backbone(backbone, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("deeplab_lit"), "propagate", True)
    caplog.set_level(logging.INFO, logger="deeplab_lit")
    torch.manual_seed(0)
    default = deeplab_v3(num_classes=2, backbone=backbone, output_stride=16).eval()
    expected = (1, 2) if backbone == "resnet18" else None  # ResNet-18's last stage has two blocks
    torch.manual_seed(0)
    built = deeplab_v3(num_classes=2, backbone=backbone, output_stride=16, multi_grid=expected).eval()
    assert default.backbone.multi_grid == built.backbone.multi_grid == expected
    x = torch.randn(1, 3, 33, 33)
    assert torch.equal(default(x), built(x))  # the same network
    said = "built without multi-grid" if expected is None else "has 2 blocks: built with (1, 2)"
    assert [r.getMessage() for r in caplog.records].count(
        "multi_grid=(1, 2, 4) (DeepLab v3 Sec. 3.2) sets the rates of a ResNet last stage's blocks and "
        + (f"{backbone} has no such stage: {said}" if expected is None else f"{backbone}'s {said}")
    ) == 1
