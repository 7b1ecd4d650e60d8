import pytest
import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead as TorchvisionFCNHead

from deeplab_lit.models import deeplab_v3, deeplab_v3plus
from deeplab_lit.models.heads import (
    ASPP,
    SEPARABLE_FORMS,
    ASPPSum,
    AtrousDepthwiseConv2d,
    ConvClassifier,
    DeepLabV3Head,
    DeepLabV3PlusDecoder,
    FCNHead,
    LargeFOVHead,
    conv_bn_relu,
    separable_options,
)


def _randomise_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_aspp_matches_torchvision_layout_and_outputs():
    torch.manual_seed(0)
    reference = TorchvisionASPP(32, (12, 24, 36), 16)
    _randomise_bn(reference)
    ours = ASPP(32, 16, (12, 24, 36))
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 32, 7, 9)
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x), reference(x))
    ours.train(), reference.train()
    torch.manual_seed(1)
    a = ours(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a, reference(x))  # same dropout draw, same batch statistics (N=2)


def test_deeplabv3_head_and_fcn_head_match_torchvision():
    torch.manual_seed(0)
    reference = DeepLabHead(64, 5, (6, 12, 18)).eval()
    _randomise_bn(reference)
    ours = DeepLabV3Head(64, 5, (6, 12, 18)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 64, 5, 6)
    torch.testing.assert_close(ours(x), reference(x))
    aux_ref, aux = TorchvisionFCNHead(64, 5).eval(), FCNHead(64, 5).eval()
    aux.load_state_dict(aux_ref.state_dict(), strict=True)
    torch.testing.assert_close(aux(x), aux_ref(x))


def test_aspp_trains_with_batch_size_one():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 5, 5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        TorchvisionASPP(16, (1, 2, 3), 8).train()(x)  # the failure being fixed
    aspp = ASPP(16, 8, (1, 2, 3)).train()
    pooling_bn = aspp.convs[4][2]
    before = pooling_bn.running_mean.clone()
    out = aspp(x)
    assert out.shape == (1, 8, 5, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert aspp.convs[4][1].weight.grad is not None and aspp.convs[4][1].weight.grad.abs().sum() > 0
    assert torch.equal(pooling_bn.running_mean, before)  # single value: running stats untouched
    aspp(torch.randn(2, 16, 5, 5))
    assert not torch.equal(pooling_bn.running_mean, before)  # two values: ordinary BatchNorm


def _depthwise_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


def test_separable_aspp_is_depthwise():
    aspp = ASPP(32, 16, (6, 12, 18), separable=True, separable_form="deeplab")
    for branch, rate in zip(aspp.convs[1:4], (6, 12, 18)):
        depthwise, pointwise = branch[0], branch[3]
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 32
        assert depthwise.dilation == (rate, rate) and depthwise.kernel_size == (3, 3)
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
        assert isinstance(branch[1], nn.BatchNorm2d) and isinstance(branch[4], nn.BatchNorm2d)
    plain = ASPP(32, 16, (6, 12, 18))
    assert _depthwise_convs(plain) == []
    assert sum(p.numel() for p in aspp.parameters()) < sum(p.numel() for p in plain.parameters())
    assert aspp.eval()(torch.randn(1, 32, 9, 11)).shape == (1, 16, 9, 11)


_FORM_LAYERS = {
    "deeplab": [AtrousDepthwiseConv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU],
    "xception": [AtrousDepthwiseConv2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU],
}


@pytest.mark.parametrize("form", SEPARABLE_FORMS)
def test_both_separable_forms_build_and_run_at_odd_sizes(form):
    torch.manual_seed(0)
    aspp = ASPP(32, 16, (2, 3, 5), separable=True, separable_form=form)
    decoder = DeepLabV3PlusDecoder(
        16, 24, 5, low_proj_channels=8, channels=16, separable=True, separable_form=form
    )
    blocks = [*aspp.convs[1:4], *decoder.fuse]
    for block in blocks:
        assert [type(layer) for layer in block] == _FORM_LAYERS[form]
        assert block[0].groups == block[0].in_channels > 1  # depthwise
        pointwise = block[3] if form == "deeplab" else block[1]
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
    x = aspp.train()(torch.randn(2, 32, 9, 11))
    assert x.shape == (2, 16, 9, 11)
    out = decoder.train()(x, torch.randn(2, 24, 17, 21))
    assert out.shape == (2, 5, 17, 21)
    out.square().mean().backward()
    assert all(block[0].weight.grad.abs().sum() > 0 for block in blocks)  # the depthwise weights learn


def test_the_deeplab_form_has_one_batchnorm_more_per_separable_convolution():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    in_channels = 32
    deeplab = ASPP(in_channels, 16, (6, 12, 18), separable=True, separable_form="deeplab")
    xception = ASPP(in_channels, 16, (6, 12, 18), separable=True, separable_form="xception")
    assert count(deeplab) - count(xception) == 3 * 2 * in_channels  # weight and bias of BN(in_channels)
    plain = ASPP(in_channels, 16, (6, 12, 18))
    # a 3x3 conv's 9 * in * out against a depthwise 9 * in and a pointwise in * out
    assert count(plain) - count(xception) == 3 * (9 * in_channels * 16 - 9 * in_channels - in_channels * 16)


@pytest.mark.parametrize(
    "options",
    [
        {"separable": False},
        {"separable": True, "separable_form": "deeplab"},
        {"separable": True, "separable_form": "xception"},
    ],
)
def test_state_dict_keys_tell_the_separable_form(options):
    model = deeplab_v3plus(num_classes=3, backbone="resnet18", channels=8, **options)
    assert separable_options(model.state_dict()) == options
    v3 = deeplab_v3(num_classes=3, backbone="resnet18", multi_grid=None)
    assert separable_options(v3.state_dict()) is None  # no v3+ decoder


def test_an_unknown_separable_form_is_refused_where_it_is_given():
    message = r"separable_form must be 'deeplab' .* or 'xception' .*got 'tf'"
    with pytest.raises(ValueError, match=message):
        deeplab_v3plus(num_classes=3, backbone="resnet18", separable=True, separable_form="tf")
    with pytest.raises(ValueError, match=message):
        deeplab_v3plus(num_classes=3, backbone="resnet18", separable_form="tf")  # a typo shows at once
    with pytest.raises(ValueError, match=message):
        conv_bn_relu(4, 4, separable=True, separable_form="tf")


@pytest.mark.parametrize("dilation", [4, 5, 12])
def test_atrous_depthwise_conv_equals_nn_conv2d_and_leaves_channels_last_on_the_cpu_for_large_rates(dilation):
    torch.manual_seed(0)
    ours = AtrousDepthwiseConv2d(8, 8, 3, padding=dilation, dilation=dilation, groups=8, bias=False)
    plain = nn.Conv2d(8, 8, 3, padding=dilation, dilation=dilation, groups=8, bias=False)
    plain.load_state_dict(ours.state_dict())  # same parameters and keys
    for module in (ours, plain):
        module.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 13, 17).to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(xa), plain(xb)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad)
    # oneDNN's channels-last kernel is fast up to rate 4 and ~4x slower than channels-first above it
    assert out.is_contiguous(memory_format=torch.channels_last) == (dilation <= 4)


def test_decoder_upsamples_to_the_skip_size():
    torch.manual_seed(0)
    decoder = DeepLabV3PlusDecoder(64, 24, 5, low_proj_channels=8, channels=32).eval()
    out = decoder(torch.randn(2, 64, 3, 5), torch.randn(2, 24, 9, 17))
    assert out.shape == (2, 5, 9, 17)
    assert decoder.project_low[0].out_channels == 8
    assert decoder.fuse[0][0].in_channels == 64 + 8
    separable = DeepLabV3PlusDecoder(64, 24, 5, separable=True)
    depthwise = _depthwise_convs(separable)
    assert [(c.groups, c.in_channels) for c in depthwise] == [(64 + 48, 64 + 48), (256, 256)]
    assert separable(torch.randn(1, 64, 2, 2), torch.randn(1, 24, 7, 5)).shape == (1, 5, 7, 5)


def test_aspp_sum_sums_branches():
    torch.manual_seed(0)
    head = ASPPSum(16, 3, (6, 12, 18, 24))
    assert set(head.state_dict()) == {f"convs.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert [c.dilation[0] for c in head.convs] == [6, 12, 18, 24]
    assert all(c.bias is not None and c.kernel_size == (3, 3) for c in head.convs)
    # kazuto1011's aspp.c{i} keys map onto convs.{i}
    kazuto = {
        f"c{i}.{p}": torch.randn_like(v)
        for i in range(4)
        for p, v in (("weight", head.convs[i].weight), ("bias", head.convs[i].bias))
    }
    head.load_state_dict({k.replace("c", "convs.", 1): v for k, v in kazuto.items()}, strict=True)
    x = torch.randn(1, 16, 6, 7)
    torch.testing.assert_close(head(x), sum(conv(x) for conv in head.convs))


def test_vgg_aspp_branches_are_largefov_stacks():
    head = ASPPSum(16, 3, (6, 12), branch_channels=32).eval()
    assert [b.fc6.dilation[0] for b in head.convs] == [6, 12]
    assert head.convs[0].fc7.out_channels == 32
    assert head(torch.randn(1, 16, 5, 5)).shape == (1, 3, 5, 5)


def test_largefov_head_layout():
    head = LargeFOVHead(512, 21)
    assert head.fc6.kernel_size == (3, 3) and head.fc6.dilation == (12, 12) and head.fc6.padding == (12, 12)
    assert head.fc6.out_channels == 1024 and head.fc7.kernel_size == (1, 1) and head.fc7.out_channels == 1024
    assert head.fc8.out_channels == 21
    assert set(head.state_dict()) == {f"fc{i}.{p}" for i in (6, 7, 8) for p in ("weight", "bias")}
    assert head.eval()(torch.randn(1, 512, 5, 7)).shape == (1, 21, 5, 7)
    small = LargeFOVHead(8, 2, rate=3, channels=4)
    assert small.fc6.dilation == (3, 3)
    assert abs(ConvClassifier(2048, 21).weight.std().item() - 0.01) < 0.002
