"""Reference checkpoints load exactly: torchvision's DeepLabV3, kazuto1011's DeepLab v1/v2, our own.

No downloads: reference-shaped state dicts are built here, from torchvision's own model and from an
independent re-implementation of kazuto1011/deeplab-pytorch's network (its module names give its keys).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

from deeplab_lit import DeepLabV2, DeepLabV3, DeepLabV3Plus
from deeplab_lit.cli import main
from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus
from deeplab_lit.normalization import CAFFE_BGR, IMAGENET
from deeplab_lit.weights.download import cache_path
from deeplab_lit.weights.load import load_weights, read_checkpoint, resolve_options
from tests import fakes

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (so that a wrong BN mapping shows), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            elif isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model.eval()


# ---------------------------------------------------------------------------------------------- torchvision
def torchvision_checkpoint(folder, builder=deeplabv3_resnet50):
    torch.manual_seed(0)
    reference = randomize(builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True))
    path = folder / "tv.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.fixture(scope="module")
def torchvision50(tmp_path_factory):
    return torchvision_checkpoint(tmp_path_factory.mktemp("torchvision"))


def test_torchvision_deeplabv3_resnet50_gives_the_same_logits(torchvision50):
    reference, path = torchvision50
    ours = deeplab_v3(num_classes=21, backbone="resnet50", output_stride=8, atrous_rates=(12, 24, 36),
                      multi_grid=None, aux_head=True)  # fmt: skip
    info = load_weights(ours.eval(), str(path), num_classes=21)
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        expected, found = reference(x), ours.forward_train(x)
    assert found["out"].shape == (1, 21, 97, 113)
    torch.testing.assert_close(found["out"], expected["out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(found["aux"], expected["aux"], atol=1e-4, rtol=0)
    assert info.format == "torchvision" and info.normalization == IMAGENET and info.num_classes == 21


def test_torchvision_weights_in_the_lightning_module_take_the_implied_options(torchvision50):
    reference, path = torchvision50
    module = DeepLabV3(num_classes=21, backbone="resnet50", weights=str(path)).eval()  # OS 16, MG by default
    assert module.hparams.output_stride == 8 and module.hparams.multi_grid is None and module.hparams.aux_head
    assert module.normalization == IMAGENET
    x = torch.randn(1, 3, 65, 71)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x)["out"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_torchvision_deeplabv3_resnet101_gives_the_same_logits(tmp_path):
    reference, path = torchvision_checkpoint(tmp_path, deeplabv3_resnet101)
    ours = deeplab_v3(num_classes=21, backbone="resnet101", output_stride=8, multi_grid=None, aux_head=True)
    load_weights(ours.eval(), path)
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x)["out"], atol=1e-4, rtol=0)


def test_torchvision_checkpoint_into_a_differently_built_model_names_the_options(torchvision50):
    _, path = torchvision50
    os16 = deeplab_v3(num_classes=21, backbone="resnet50", output_stride=16, multi_grid=None, aux_head=True)
    with pytest.raises(
        ValueError, match=r"output_stride=8.*output_stride=16.*backbone\.layer3\.0\.conv2 stride"
    ):
        load_weights(os16, path)
    deeper = deeplab_v3(num_classes=21, backbone="resnet101", output_stride=8, multi_grid=None, aux_head=True)
    with pytest.raises(ValueError, match=r"tv\.pth.*backbone='resnet50'.*backbone='resnet101'"):
        load_weights(deeper, path)
    no_aux = deeplab_v3(num_classes=21, backbone="resnet50", output_stride=8, multi_grid=None)
    with pytest.raises(ValueError, match=r"aux_classifier.*aux_head=True.*aux_head=False"):
        load_weights(no_aux, path)
    v2 = deeplab_v2(num_classes=21, backbone="resnet50")
    with pytest.raises(ValueError, match=r"hold DeepLab v3 .* the model is DeepLab v2"):
        load_weights(v2, path)
    with pytest.raises(ValueError, match=r"conflict with the options given: atrous_rates=\[6, 12, 18\]"):
        DeepLabV3(num_classes=21, backbone="resnet50", atrous_rates=[6, 12, 18], weights=str(path))


def test_class_count_mismatch_suggests_reinit_classifier_which_keeps_the_rest(torchvision50):
    reference, path = torchvision50
    model = deeplab_v3(num_classes=5, backbone="resnet50", output_stride=8, multi_grid=None, aux_head=True)
    with pytest.raises(
        ValueError, match=r"tv\.pth.*21 classes but the model has 5; pass reinit_classifier=True"
    ):
        load_weights(model, path)
    fresh = model.head[4].weight.clone()
    info = load_weights(model, path, reinit_classifier=True)
    assert set(info.reinitialised) == {"head.4.weight", "head.4.bias", "aux_classifier.4.weight",
                                       "aux_classifier.4.bias"}  # fmt: skip
    assert torch.equal(model.head[4].weight, fresh)
    assert torch.equal(model.head[0].project[0].weight, reference.classifier[0].project[0].weight)
    assert torch.equal(model.backbone.layer4[2].conv3.weight, reference.backbone.layer4[2].conv3.weight)


# ----------------------------------------------------------------------------------------------- kazuto1011
# An independent re-implementation of kazuto1011/deeplab-pytorch (libs/models/resnet.py, deeplabv1.py,
# deeplabv2.py, msc.py): its module names are the keys of the released checkpoints.
class _ConvBnReLU(nn.Sequential):
    def __init__(self, in_ch, out_ch, kernel_size, stride, padding, dilation, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_ch, eps=1e-5, momentum=1 - 0.999))
        if relu:
            self.add_module("relu", nn.ReLU())


class _Bottleneck(nn.Module):
    def __init__(self, in_ch, out_ch, stride, dilation, downsample):
        super().__init__()
        mid_ch = out_ch // 4
        self.reduce = _ConvBnReLU(in_ch, mid_ch, 1, stride, 0, 1, True)
        self.conv3x3 = _ConvBnReLU(mid_ch, mid_ch, 3, 1, dilation, dilation, True)
        self.increase = _ConvBnReLU(mid_ch, out_ch, 1, 1, 0, 1, False)
        self.shortcut = _ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False) if downsample else nn.Identity()

    def forward(self, x):
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class _ResLayer(nn.Sequential):
    def __init__(self, n_layers, in_ch, out_ch, stride, dilation):
        super().__init__()
        for i in range(n_layers):
            block = _Bottleneck(
                in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dilation, i == 0
            )
            self.add_module(f"block{i + 1}", block)


class _Stem(nn.Sequential):
    def __init__(self, out_ch):
        super().__init__()
        self.add_module("conv1", _ConvBnReLU(3, out_ch, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class _ASPP(nn.Module):
    def __init__(self, in_ch, out_ch, rates):
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(in_ch, out_ch, 3, 1, padding=rate, dilation=rate, bias=True))

    def forward(self, x):
        return sum(stage(x) for stage in self.children())


class KazutoDeepLab(nn.Sequential):
    """kazuto1011's DeepLabV2 (``aspp``) or, with ``rates=None``, DeepLabV1 (``fc``)."""

    def __init__(self, n_classes, n_blocks=(3, 4, 23, 3), rates=(6, 12, 18, 24)):
        super().__init__()
        ch = [64 * 2**p for p in range(6)]
        self.add_module("layer1", _Stem(ch[0]))
        self.add_module("layer2", _ResLayer(n_blocks[0], ch[0], ch[2], 1, 1))
        self.add_module("layer3", _ResLayer(n_blocks[1], ch[2], ch[3], 2, 1))
        self.add_module("layer4", _ResLayer(n_blocks[2], ch[3], ch[4], 1, 2))
        self.add_module("layer5", _ResLayer(n_blocks[3], ch[4], ch[5], 1, 4))
        if rates is None:
            self.add_module("fc", nn.Conv2d(2048, n_classes, 1))
        else:
            self.add_module("aspp", _ASPP(ch[5], n_classes, rates))


class KazutoMSC(nn.Module):
    def __init__(self, base, scales=(0.5, 0.75)):
        super().__init__()
        self.base, self.scales = base, scales

    def forward(self, x):
        logits = self.base(x)
        size = logits.shape[2:]
        pyramid = [
            self.base(F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False))
            for p in self.scales
        ]
        interpolated = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid]
        return torch.max(torch.stack([logits, *interpolated]), dim=0)[0]


def kazuto_v2_keys() -> list[str]:
    """The keys of ``deeplabv2_resnet101_msc-vocaug-20000.pth``, written out from the architecture."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["base.layer1.conv1.conv.weight", *(f"base.layer1.conv1.bn.{p}" for p in bn)]
    for layer, blocks in zip((2, 3, 4, 5), (3, 4, 23, 3)):
        for block in range(1, blocks + 1):
            for part in ("reduce", "conv3x3", "increase", *(("shortcut",) if block == 1 else ())):
                prefix = f"base.layer{layer}.block{block}.{part}"
                keys += [f"{prefix}.conv.weight", *(f"{prefix}.bn.{p}" for p in bn)]
    return keys + [f"base.aspp.c{i}.{p}" for i in range(4) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def kazuto_v2(tmp_path_factory):
    torch.manual_seed(0)
    reference = randomize(KazutoMSC(KazutoDeepLab(21)), seed=3)
    state = reference.state_dict()
    assert sorted(state) == sorted(kazuto_v2_keys())  # the re-implementation has the released key set
    assert len(state) == 632  # 33 bottlenecks (3/4/23/3) + 4 shortcuts + stem, 6 keys per conv+BN; 4x2 ASPP
    # The released file predates BatchNorm's num_batches_tracked: drop it, as there.
    path = tmp_path_factory.mktemp("kazuto") / "deeplabv2_resnet101_msc-vocaug-20000.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return reference, path


@pytest.fixture(scope="module")
def kazuto_v2_small(tmp_path_factory):
    """The same format with ResNet-50 depth (3/4/6/3 blocks), for the tests that only check options."""
    path = tmp_path_factory.mktemp("kazuto") / "deeplabv2_resnet50_msc.pth"
    torch.save(KazutoMSC(KazutoDeepLab(21, n_blocks=(3, 4, 6, 3))).state_dict(), path)
    return path


def test_kazuto_v2_msc_checkpoint_gives_its_predictions(kazuto_v2):
    reference, path = kazuto_v2
    ours = deeplab_v2(num_classes=21, backbone="resnet101", msc_scales=(1.0, 0.75, 0.5), style="caffe").eval()
    info = load_weights(ours, str(path), num_classes=21)
    assert info.format == "kazuto1011" and info.version == "v2" and info.normalization == CAFFE_BGR
    x = torch.randn(1, 3, 41, 53) * 60  # Caffe inputs: BGR, 0-255 minus the mean
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(ours.forward_logits(x), expected, atol=1e-4, rtol=1e-4)
        upsampled = F.interpolate(expected, size=x.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(ours(x), upsampled, atol=1e-4, rtol=1e-4)


def test_kazuto_v2_in_the_lightning_module_takes_style_and_msc_from_the_file(kazuto_v2):
    reference, path = kazuto_v2
    module = DeepLabV2(num_classes=21, backbone="resnet101", weights=str(path)).eval()
    assert module.hparams.style == "caffe" and list(module.hparams.msc_scales) == [1.0, 0.75, 0.5]
    assert module.normalization == CAFFE_BGR
    x = torch.randn(1, 3, 33, 45) * 60
    with torch.no_grad():
        torch.testing.assert_close(module.model.forward_logits(x), reference(x), atol=1e-4, rtol=1e-4)
    explicit = DeepLabV2(num_classes=21, backbone="resnet101", msc_scales=[1, 0.75, 0.5], style="caffe",
                         weights=str(path))  # fmt: skip
    assert torch.equal(explicit.model.segmenter.head.convs[3].bias, reference.base.aspp.c3.bias)


def test_kazuto_checkpoint_into_a_torchvision_style_resnet_is_refused(kazuto_v2_small):
    path = kazuto_v2_small
    torchvision_style = deeplab_v2(num_classes=21, backbone="resnet50", msc_scales=(1.0, 0.75, 0.5))
    with pytest.raises(ValueError, match=r"resnet50_msc\.pth.*style='caffe'.*style='torchvision'.*maxpool"):
        load_weights(torchvision_style, path)
    single_scale = deeplab_v2(num_classes=21, backbone="resnet50", style="caffe")
    with pytest.raises(ValueError, match=r"MSC scales None \(needs \(1\.0, 0\.75, 0\.5\)\)"):
        load_weights(single_scale, path)


def test_kazuto_v1_coco_checkpoint_and_its_use_to_initialise_v2(tmp_path):
    reference = randomize(KazutoDeepLab(91, n_blocks=(3, 4, 6, 3), rates=None), seed=5)
    path = tmp_path / "deeplabv1_resnet50-coco.pth"
    torch.save(reference.state_dict(), path)  # the COCO init file has no MSC wrapper
    v1 = deeplab_v1(num_classes=91, backbone="resnet50", style="caffe").eval()
    assert load_weights(v1, path).version == "v1"
    x = torch.randn(1, 3, 37, 29) * 60
    with torch.no_grad():
        torch.testing.assert_close(v1.forward_logits(x), reference(x), atol=1e-4, rtol=1e-4)
    # kazuto's recipe: the COCO v1 backbone initialises a v2 MSC model for VOC; the ASPP stays fresh
    v2 = deeplab_v2(num_classes=21, backbone="resnet50", msc_scales=(1.0, 0.75, 0.5), style="caffe")
    with pytest.raises(ValueError, match=r"hold DeepLab v1 .*reinit_classifier=True"):
        load_weights(v2, path)
    info = load_weights(v2, path, reinit_classifier=True)
    assert all(k.startswith("head.convs.") for k in info.reinitialised)
    assert torch.equal(v2.backbone.layer3[5].conv2.weight, reference.layer4.block6.conv3x3.conv.weight)


# ------------------------------------------------------------------------------------------ deeplab_lit
def test_own_lightning_checkpoint_and_plain_state_dict_load(tmp_path):
    module = DeepLabV3(num_classes=4, backbone="resnet18", output_stride=16, multi_grid=[1, 2]).eval()
    randomize(module.model)
    lightning_style = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                       "normalization": CAFFE_BGR.to_dict()}  # fmt: skip
    lightning_style["hyper_parameters"]["_class_path"] = "deeplab_lit.DeepLabV3"
    torch.save(lightning_style, tmp_path / "run.ckpt")
    torch.save(module.model.state_dict(), tmp_path / "plain.pth")
    x = torch.randn(2, 3, 35, 47)
    for name in ("run.ckpt", "plain.pth"):
        fresh = deeplab_v3(num_classes=4, backbone="resnet18", output_stride=16, multi_grid=(1, 2)).eval()
        info = load_weights(fresh, tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), module(x), atol=0, rtol=0)
    assert info.normalization is None  # a plain state dict does not say
    checkpoint = read_checkpoint(tmp_path / "run.ckpt")
    assert checkpoint.version == "v3" and checkpoint.normalization == CAFFE_BGR
    os8 = deeplab_v3(num_classes=4, backbone="resnet18", output_stride=8, multi_grid=(1, 2))
    with pytest.raises(ValueError, match=r"run\.ckpt.*output_stride=16"):
        load_weights(os8, tmp_path / "run.ckpt")
    plus = deeplab_v3plus(num_classes=4, backbone="resnet18")
    with pytest.raises(ValueError, match=r"hold DeepLab v3 .*the model is DeepLab v3\+"):
        load_weights(plus, tmp_path / "run.ckpt")


def test_narrow_v3plus_checkpoint_gives_its_width_to_the_module(tmp_path):
    module = DeepLabV3Plus(num_classes=3, backbone="resnet18", channels=32).eval()
    randomize(module.model)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    checkpoint["hyper_parameters"]["_class_path"] = "deeplab_lit.DeepLabV3Plus"
    torch.save(checkpoint, tmp_path / "narrow.ckpt")
    loaded = DeepLabV3Plus(num_classes=3, backbone="resnet18", weights=str(tmp_path / "narrow.ckpt")).eval()
    assert loaded.hparams.channels == 32  # taken from the checkpoint, the default (256) was left alone
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), module.model(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"channels=64 \(the checkpoint needs 32\)"):
        DeepLabV3Plus(num_classes=3, backbone="resnet18", channels=64, weights=str(tmp_path / "narrow.ckpt"))


def test_module_checkpoint_records_normalization_and_drops_the_weights_path(kazuto_v2_small):
    path = kazuto_v2_small
    module = DeepLabV2(num_classes=21, backbone="resnet50", weights=str(path))
    checkpoint = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["normalization"] == CAFFE_BGR.to_dict()
    assert checkpoint["hyper_parameters"]["weights"] is None and checkpoint["weights_source"] == str(path)
    restored = DeepLabV2(**{k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")})
    restored.on_load_checkpoint(checkpoint)
    assert restored.normalization == CAFFE_BGR and restored.hparams.style == "caffe"


def test_data_with_another_normalization_is_refused_with_the_setting_to_use(kazuto_v2_small):
    module = DeepLabV2(num_classes=21, backbone="resnet50", weights=str(kazuto_v2_small))

    class Trainer:
        datamodule = type("Data", (), {"normalization": IMAGENET})()

    module._trainer = Trainer()
    with pytest.raises(ValueError, match=r"data\.init_args\.normalization to .*\"bgr\": true"):
        module.setup("validate")
    Trainer.datamodule.normalization = CAFFE_BGR
    module.setup("validate")  # the right one passes
    assert json.loads(json.dumps(CAFFE_BGR.to_dict()))["bgr"] is True


# ------------------------------------------------------------------------------------------ bad files
def test_missing_corrupt_and_unknown_files_each_give_one_clear_error(tmp_path):
    model = deeplab_v1(num_classes=3, backbone="resnet18")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_weights(model, tmp_path / "nothere.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.pth.*could not be read"):
        load_weights(model, corrupt)
    truncated = tmp_path / "truncated.pth"
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    truncated.write_bytes((tmp_path / "whole.pth").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated\.pth.*could not be read"):
        load_weights(model, truncated)
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*no supported format.*encoder\.weight"):
        load_weights(model, tmp_path / "other.pth")
    torch.save({"fc.weight": torch.zeros(3), "layer1.0.conv1.weight": torch.zeros(3)}, tmp_path / "in.pth")
    with pytest.raises(ValueError, match="pretrained_backbone"):
        load_weights(model, tmp_path / "in.pth")


def test_url_source_is_downloaded_once_into_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_home" / "hub"))  # set_dir wins over env
    model = deeplab_v1(num_classes=3, backbone="resnet18").eval()
    torch.save(randomize(model).state_dict(), tmp_path / "published.pth")
    fresh = deeplab_v1(num_classes=3, backbone="resnet18")
    url = (tmp_path / "published.pth").as_uri()
    load_weights(fresh, url)
    cached = cache_path(url)
    assert cached.is_file() and cached.parent == tmp_path / "torch_home" / "hub" / "checkpoints"
    assert torch.equal(fresh.head.weight, model.head.weight)
    (tmp_path / "published.pth").unlink()  # a second load uses the cache
    load_weights(fresh, (tmp_path / "published.pth").as_uri())


def test_unreachable_url_says_offline_and_where_the_cache_is(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_home" / "hub"))  # set_dir wins over env
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    model = deeplab_v1(num_classes=3, backbone="resnet18")
    with pytest.raises(RuntimeError, match=r"Could not download .*torch_home.*offline.*local path"):
        load_weights(model, "http://127.0.0.1:9/deeplabv3_resnet50_coco-cd0a2569.pth")


# ------------------------------------------------------------------------------ experiments/*.yaml configs
def evaluate_config(name: str, weights: Path, tmp_path: Path, *extra: str):
    fakes.make_voc(tmp_path / "voc")
    args = ["test", "--config", str(EXPERIMENTS / name), f"--model.init_args.weights={weights}",
            f"--data.init_args.root={tmp_path / 'voc'}", "--data.init_args.num_workers=0",
            "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'logs'}"]  # fmt: skip
    return main([*args, *extra])


def test_torchvision_config_evaluates_the_checkpoint(torchvision50, tmp_path):
    reference, path = torchvision50
    cli = evaluate_config("torchvision_deeplabv3_resnet50.yaml", path, tmp_path)
    assert 0.0 <= float(cli.trainer.callback_metrics["test/mIoU"]) <= 1.0
    assert cli.model.normalization == cli.datamodule.normalization == IMAGENET
    assert torch.equal(cli.model.model.head[4].weight, reference.classifier[4].weight)


def test_kazuto_config_evaluates_the_checkpoint_with_caffe_normalization_and_crf(kazuto_v2_small, tmp_path):
    cli = evaluate_config("kazuto_deeplabv2_resnet101.yaml", kazuto_v2_small, tmp_path,
                          "--model.init_args.backbone=resnet50")  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert "test/mIoU" in metrics and "test/mIoU_crf" in metrics
    assert cli.datamodule.normalization == CAFFE_BGR == cli.model.normalization
    with pytest.raises(
        ValueError, match=r"expect inputs normalised as .*bgr=True.*data\.init_args\.normalization"
    ):
        overrides = ("--model.init_args.backbone=resnet50", "--data.init_args.normalization.bgr=false")
        evaluate_config("kazuto_deeplabv2_resnet101.yaml", kazuto_v2_small, tmp_path / "again", *overrides)


# ------------------------------------------------------------------------------ versions and options meet
def module_checkpoint(module, path):
    """Save a LightningModule as a run's checkpoint holds it: state dict and hyper-parameters."""
    hparams = {**dict(module.hparams), "_class_path": f"deeplab_lit.{type(module).__name__}"}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    return path


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Tiny v3 (ResNet-18 with the paper's default multi-grid) and v3+ checkpoints, and a v3 state dict."""
    folder = tmp_path_factory.mktemp("versions")
    torch.manual_seed(0)
    v3 = DeepLabV3(num_classes=3, backbone="resnet18", aux_head=True)
    randomize(v3.model)
    torch.save(v3.model.state_dict(), folder / "v3_plain.pth")
    v3plus = DeepLabV3Plus(num_classes=3, backbone="resnet18", channels=16)
    v3_path, v3plus_path = (
        module_checkpoint(v3, folder / "v3.ckpt"),
        module_checkpoint(v3plus, folder / "v3+.ckpt"),
    )
    return {"v3": v3_path, "v3_module": v3, "v3_plain": folder / "v3_plain.pth", "v3+": v3plus_path}


def test_v3_weights_for_a_v2_module_name_both_versions_and_the_reinit_route(versions):
    for source in (
        versions["v3"],
        versions["v3_plain"],
    ):  # the plain state dict's version is read from its keys
        with pytest.raises(ValueError) as info:
            DeepLabV2(num_classes=3, backbone="resnet18", weights=str(source))
        message = str(info.value)
        assert source.name in message and "hold DeepLab v3 but the model is DeepLab v2 (DeepLabV2)" in message
        assert "deeplab_lit.DeepLabV3)" in message and "reinit_classifier: true" in message
    v2 = DeepLabV2(num_classes=3, backbone="resnet18", weights=str(versions["v3"]), reinit_classifier=True)
    source = versions["v3_module"].model.backbone
    assert torch.equal(v2.model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert v2.hparams.output_stride == 8 and tuple(v2.hparams.atrous_rates) == (
        6,
        12,
        18,
        24,
    )  # v2's own head


def test_v3plus_weights_for_a_v3_module_name_the_versions_not_an_option(versions):
    with pytest.raises(ValueError) as info:
        DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=[1, 2], weights=str(versions["v3+"]))
    message = str(info.value)
    assert "v3+.ckpt" in message and "hold DeepLab v3+ but the model is DeepLab v3 (DeepLabV3)" in message
    assert "deeplab_lit.DeepLabV3Plus" in message and "multi_grid" not in message
    assert "reinit_classifier" not in message  # it would not help: the v3 head is more than classifiers
    with pytest.raises(ValueError, match=r"v3\+\.ckpt.*reinit_classifier cannot bridge"):
        DeepLabV3(num_classes=3, backbone="resnet18", weights=str(versions["v3+"]), reinit_classifier=True)


def test_another_class_count_names_both_counts_and_the_reinit_route(versions):
    with pytest.raises(
        ValueError,
        match=r"num_classes=5 \(the checkpoint has 3 classes\).*weights: .*v3\.ckpt.*reinit_classifier: true",
    ):
        DeepLabV3(num_classes=5, backbone="resnet18", weights=str(versions["v3"]))
    module = DeepLabV3(
        num_classes=5, backbone="resnet18", weights=str(versions["v3"]), reinit_classifier=True
    )
    assert module.model.head[-1].out_channels == 5


def test_resolve_options_reconciles_a_checkpoint_with_the_command_line(versions):
    """What the CLI calls for --ckpt_path: defaults take the checkpoint's values, set options must agree."""
    checkpoint = read_checkpoint(versions["v3"])
    defaults = {"num_classes": 21, "backbone": "resnet101", "output_stride": 16, "multi_grid": (1, 2, 4),
                "aux_head": False, "reinit_classifier": False}  # fmt: skip
    given = {**defaults, "num_classes": 3}
    assert resolve_options(checkpoint, given, defaults, version="deeplab_lit.DeepLabV3") == {
        "backbone": "resnet18",
        "aux_head": True,
    }
    same_on_resnet18 = {**given, "backbone": "resnet18", "multi_grid": [1, 2]}  # (1, 2, 4) builds as (1, 2)
    assert resolve_options(checkpoint, same_on_resnet18, defaults, version=DeepLabV3) == {"aux_head": True}
    conflicting = {**defaults, "backbone": "resnet50", "output_stride": 8, "num_classes": 5}
    with pytest.raises(ValueError) as info:
        resolve_options(checkpoint, conflicting, defaults, version=DeepLabV3)
    message = str(info.value)
    assert "backbone='resnet50' (the checkpoint needs 'resnet18')" in message
    assert "output_stride=8 (the checkpoint needs 16)" in message
    assert "num_classes=5 (the checkpoint has 3 classes)" in message and "reinit_classifier: true" in message
    with pytest.raises(ValueError, match="hold DeepLab v3 but the model is DeepLab v2"):
        resolve_options(checkpoint, given, defaults, version="deeplab_lit.DeepLabV2")
    checkpoint.options["num_classes"] = (
        3  # the CLI lists the class count among the options: a default takes it
    )
    assert resolve_options(checkpoint, defaults, defaults)["num_classes"] == 3


@contextlib.contextmanager
def only_the_readers_safe_globals():
    """Forget what modules/base.py declared safe to unpickle, so the reader's own list is all that counts."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield
    finally:
        torch.serialization.add_safe_globals(saved)


def test_checkpoint_of_a_cli_fit_is_read_safely_and_gives_the_same_logits(tmp_path):
    config = EXPERIMENTS / "quickstart.yaml"
    cli = main(["fit", "--config", str(config), "--trainer.max_steps=1", "--trainer.logger=false",
                "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'logs'}",
                f"--data.init_args.root={tmp_path / 'synthetic'}", "--data.init_args.num_train=2",
                "--data.init_args.num_val=1", "--data.init_args.image_size=40",
                "--data.init_args.crop_size=33", "--data.init_args.batch_size=2",
                "--data.init_args.num_workers=0"])  # fmt: skip
    path = next((tmp_path / "logs").rglob("last.ckpt"))
    with only_the_readers_safe_globals():
        checkpoint = read_checkpoint(path)
    assert (
        checkpoint.version == "v3+" and checkpoint.options["channels"] == 64 and checkpoint.num_classes == 6
    )
    assert checkpoint.normalization == cli.datamodule.normalization
    module = DeepLabV3Plus(num_classes=6, backbone="resnet18", weights=str(path)).eval()
    x = torch.randn(1, 3, 41, 37)
    with torch.no_grad():
        torch.testing.assert_close(module(x), cli.model.eval()(x), atol=0, rtol=0)
