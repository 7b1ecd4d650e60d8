"""timm encoders as DeepLab backbones (``backbone="timm:<name>"``): every version, both output strides.

Small timm variants stand for the families the README lists (random init, nothing downloaded):
convnext_atto for ConvNeXt(-V2), efficientnet_b0 for EfficientNet, resnet18d for ResNet-D,
regnety_002 for RegNetY and mobilenetv3_small_050 for MobileNetV3.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from deeplab_lit.models import build_backbone, deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus
from deeplab_lit.models.fusion import count_batchnorms
from deeplab_lit.models.timm_backbones import TimmBackbone
from deeplab_lit.weights import build_network
from tests.models.test_fusion import assert_folds_exactly, randomise_batchnorm
from tests.weights import imagenet_backbone

FAMILIES = ("convnext_atto", "efficientnet_b0", "resnet18d", "regnety_002", "mobilenetv3_small_050")
BUILDERS = {
    "v1": lambda **kw: deeplab_v1(**kw),
    "v2": lambda **kw: deeplab_v2(atrous_rates=(6, 12), **kw),
    "v3": lambda **kw: deeplab_v3(multi_grid=None, **kw),
    "v3+": lambda **kw: deeplab_v3plus(channels=32, **kw),
}
HEIGHT, WIDTH = 37, 45  # odd sizes, divisible by no stride


def _between_floor_and_ceil(size: int, full: int, stride: int) -> bool:
    # timm's padded strided convolutions give ceil(H / s), ConvNeXt's 4x4 patchify stem floor(H / 4)
    return math.floor(full / stride) <= size <= math.ceil(full / stride)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("version", BUILDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_version_trains_at_batch_size_one_on_an_odd_size(family, version, output_stride):
    torch.manual_seed(0)
    model = BUILDERS[version](num_classes=3, backbone=f"timm:{family}", output_stride=output_stride)
    assert isinstance(model.backbone, TimmBackbone)
    images, masks = torch.randn(1, 3, HEIGHT, WIDTH), torch.randint(0, 3, (1, HEIGHT, WIDTH))
    features = model.backbone(images)
    assert {"low", "out"} <= set(features)
    assert features["out"].shape[1] == model.backbone.out_channels
    assert features["low"].shape[1] == model.backbone.low_channels
    for key, stride in (("low", 4), ("out", output_stride)):
        height, width = features[key].shape[-2:]
        assert _between_floor_and_ceil(height, HEIGHT, stride), (key, features[key].shape)
        assert _between_floor_and_ceil(width, WIDTH, stride), (key, features[key].shape)
    # one SGD step at batch size 1, in training mode: every BatchNorm sees one image
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = next(model.backbone.parameters())
    before = first.detach().clone()
    model.train()
    loss = F.cross_entropy(model.forward_train(images)["out"], masks)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(first, before)  # gradient reached the first layer of the encoder
    with torch.no_grad():
        logits = model.eval()(images)
    assert logits.shape == (1, 3, HEIGHT, WIDTH)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("model_name", "family", "why"),
    [
        ("swin_tiny_patch4_window7_224", "swin_transformer", "no output_stride option"),
        ("vit_tiny_patch16_224", "vision_transformer", "no output_stride option"),
        ("efficientvit_b0", "efficientvit_mit", "no output_stride option"),
        ("resnest14d", "resnest", "fails in training at batch size 1"),
        ("ghostnet_100", "ghostnet", "only at output_stride=32: .*only output_stride==32 is valid"),
        ("dla34", "dla", r"only at output_stride=32: no dilated variant \(AssertionError"),
    ],
)
def test_families_deeplab_cannot_use_are_refused_at_build_time(model_name, family, why):
    with pytest.raises(ValueError, match=rf"'{model_name}' \({family} family\).*output_stride=16: .*{why}"):
        deeplab_v3plus(num_classes=3, backbone=f"timm:{model_name}")


def test_the_meta_device_probe_finds_the_batch_size_one_failure_the_real_model_has():
    # The probe refuses resnest on meta tensors; the real model fails the same way on real ones.
    import timm

    real = timm.create_model("resnest14d", features_only=True, output_stride=16).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        real(torch.randn(1, 3, 64, 64))


def test_unknown_names_and_wrong_options_get_one_clear_message():
    with pytest.raises(ValueError, match=r"Unknown timm model 'convnext_tin'.*'convnext_tiny'"):
        build_backbone("timm:convnext_tin")
    with pytest.raises(ValueError, match=r"pretrained_backbone='d2_in1k'"):
        build_backbone("timm:convnext_atto.d2_in1k")
    with pytest.raises(ValueError, match=r"output_stride=4 .* expected one of \(8, 16, 32\)"):
        build_backbone("timm:convnext_atto", output_stride=4)
    with pytest.raises(ValueError, match="only has style='torchvision'"):
        build_backbone("timm:resnet18d", style="caffe")
    # a grid other than the paper's (DeepLab v3's default, which builds without it) on a family without
    # a ResNet layer4
    with pytest.raises(ValueError, match=r"timm's convnext family\) has none.*pass multi_grid=None"):
        deeplab_v3(num_classes=3, backbone="timm:convnext_atto", multi_grid=(1, 1, 1))
    assert deeplab_v3(num_classes=3, backbone="timm:convnext_atto").backbone.multi_grid is None


def test_multi_grid_sets_the_rates_of_timm_resnet_layer4():
    plain = build_backbone("timm:resnet18d", output_stride=16)
    grid = build_backbone("timm:resnet18d", output_stride=16, multi_grid=(1, 2, 4))  # 2 blocks: (1, 2)

    def rates(backbone):
        layer4 = backbone.body.layer4
        return [(block.conv1.dilation[0], block.conv2.dilation[0]) for block in layer4]

    assert rates(plain) == [(1, 2), (2, 2)]  # timm's own dilation: the first conv keeps layer3's rate
    assert rates(grid) == [(2, 2), (4, 4)]  # base rate 2 x (1, 2)
    with pytest.raises(ValueError, match=r"one rate per layer4 block \(2 for timm:resnet18d\)"):
        build_backbone("timm:resnet18d", multi_grid=(1, 2, 3))
    randomise_batchnorm(plain)  # timm zero-initialises each block's last BatchNorm: residuals would be 0
    grid.load_state_dict(plain.state_dict())  # same weights, other rates: another function
    images = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(images)["out"], grid.eval()(images)["out"])


@pytest.mark.parametrize("family", FAMILIES)
def test_batchnorm_folding_covers_every_family(family):
    torch.manual_seed(0)
    model = deeplab_v3plus(num_classes=3, backbone=f"timm:{family}", channels=16).eval()
    randomise_batchnorm(model)
    in_backbone = count_batchnorms(model.backbone)
    assert (in_backbone == 0) == (family == "convnext_atto")  # ConvNeXt normalises with LayerNorm
    assert_folds_exactly(model, torch.randn(1, 3, HEIGHT, WIDTH))  # no BatchNorm left, outputs to 1e-5


# ------------------------------------------------------------------------------------------ ImageNet weights
def test_timm_and_own_format_weight_files_load(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    imagenet = timm.create_model("convnext_atto")  # a classification model: timm's checkpoint format
    save_file(imagenet.state_dict(), tmp_path / "model.safetensors")
    backbone = imagenet_backbone(
        "timm:convnext_atto", output_stride=8, source=str(tmp_path / "model.safetensors")
    )
    assert torch.equal(backbone.state_dict()["body.stem_0.weight"], imagenet.stem[0].weight)
    assert torch.equal(
        backbone.state_dict()["body.stages_3.blocks.1.mlp.fc2.weight"],
        imagenet.stages[3].blocks[1].mlp.fc2.weight,
    )
    torch.save(backbone.state_dict(), tmp_path / "own.pth")  # the backbone's own keys load as they are
    again = imagenet_backbone("timm:convnext_atto", source=str(tmp_path / "own.pth"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), backbone.state_dict().values()))
    torch.save(timm.create_model("resnet18d").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth' does not match timm's convnext_atto"):
        imagenet_backbone("timm:convnext_atto", source=str(tmp_path / "resnet.pth"))
    with pytest.raises(ValueError, match=r"Unknown ImageNet weights 'in22k'.*\('d2_in1k',\)"):
        imagenet_backbone("timm:convnext_atto", source="in22k")


def test_offline_pretrained_weights_give_one_clear_message(monkeypatch):
    import timm.models._hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic is disabled")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)  # never download in tests
    with pytest.raises(RuntimeError) as caught:
        build_network(
            deeplab_v3plus, dict(num_classes=3, backbone="timm:convnext_atto", pretrained_backbone=True)
        )
    message = str(caught.value)
    assert "timm:convnext_atto" in message and "outgoing traffic is disabled" in message
    url = "https://huggingface.co/timm/convnext_atto.d2_in1k/resolve/main/model.safetensors"
    assert url in message and "`hf download timm/convnext_atto.d2_in1k model.safetensors" in message
    assert "pretrained_backbone='/path/to/model.safetensors'" in message
    assert "copy it to" not in message  # a file copied into a cache folder is not found there


def test_the_offline_advice_works_a_local_timm_model_safetensors_loads(tmp_path, monkeypatch):
    import timm.models._hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from safetensors.torch import save_file

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic is disabled")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)
    published = timm.create_model("convnext_atto")  # the classifier model as timm's hub file holds it
    save_file(published.state_dict(), tmp_path / "model.safetensors")
    model = build_network(
        deeplab_v3plus,
        dict(
            num_classes=3,
            backbone="timm:convnext_atto",
            pretrained_backbone=str(tmp_path / "model.safetensors"),
        ),
    )
    assert torch.equal(
        model.backbone.body.stages_3.blocks[1].mlp.fc2.weight, published.stages[3].blocks[1].mlp.fc2.weight
    )
