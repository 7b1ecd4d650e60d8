import os
import urllib.error

import pytest
import torch
import torchvision

from deeplab_lit import DeepLabV1, DeepLabV2
from deeplab_lit.models import build_backbone, deeplab_v1, deeplab_v2, deeplab_v3plus
from deeplab_lit.models.heads import LargeFOVHead
from deeplab_lit.weights import build_network
from deeplab_lit.weights.imagenet import imagenet_state_dict, init_largefov_from_vgg, load_imagenet_weights
from tests.weights import imagenet_backbone


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch cache and a download function that fails as it does without a network."""
    torch.hub.set_dir(str(tmp_path / "hub"))
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    yield calls
    torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))


def _torchvision_resnet18_file(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()  # ImageNet layout, fc included
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    return path, state


def test_local_torchvision_file_loads(tmp_path):
    path, state = _torchvision_resnet18_file(tmp_path)
    backbone = imagenet_backbone("resnet18", output_stride=8, source=str(path))
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert "fc.weight" not in loaded
    # a whole segmenter built with it starts from the same weights
    model = build_network(
        deeplab_v3plus, dict(num_classes=2, backbone="resnet18", pretrained_backbone=str(path))
    )
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_backbone_format_and_wrapped_checkpoint_load(tmp_path):
    source = build_backbone("mobilenet_v2")
    path = tmp_path / "mbv2.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    target = imagenet_backbone("mobilenet_v2", output_stride=8, source=path)
    assert torch.equal(target.features[17].conv[0][0].weight, source.features[17].conv[0][0].weight)


def test_mobilenet_and_vgg_imagenet_layouts_load(tmp_path):
    state = torchvision.models.mobilenet_v2().state_dict()  # has features.18.* and classifier.*
    torch.save(state, tmp_path / "mbv2.pth")
    backbone = imagenet_backbone("mobilenet_v2", source=str(tmp_path / "mbv2.pth"))
    assert torch.equal(backbone.features[0][0].weight, state["features.0.0.weight"])
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).state_dict()
    vgg_state = {f"features.{k}": v for k, v in features.items()}
    vgg_state["classifier.0.weight"] = torch.zeros(8, 8)  # fc layers are not part of the body
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    vgg = imagenet_backbone("vgg16", output_stride=8, source=str(tmp_path / "vgg16.pth"))
    assert torch.equal(vgg.features[28].weight, features["28.weight"])


def test_timm_layout_loads_into_xception(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("xception65")
    timm_state = {k.removeprefix("body."): v for k, v in source.state_dict().items()}
    timm_state["head.fc.weight"], timm_state["head.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    from safetensors.torch import save_file

    save_file(timm_state, str(tmp_path / "model.safetensors"))
    target = imagenet_backbone("xception65", source=str(tmp_path / "model.safetensors"))
    assert torch.equal(target.body.stem[0].conv.weight, source.body.stem[0].conv.weight)


def test_mismatched_file_names_file_and_keys(tmp_path):
    path, _ = _torchvision_resnet18_file(tmp_path)
    with pytest.raises(
        ValueError, match=r"resnet18-imagenet\.pth.*resnet34.*missing keys.*layer1\.2\.conv1\.weight"
    ):
        imagenet_backbone("resnet34", source=str(path))
    torch.save({"conv1.weight": torch.zeros(1), "stray.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth.*unexpected keys \(first: \['stray\.weight'\]\)"):
        imagenet_backbone("resnet18", source=str(tmp_path / "bad.pth"))


def test_wrong_shapes_unreadable_and_missing_files(tmp_path):
    state = build_backbone("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "shapes.pth")
    with pytest.raises(ValueError, match=r"shapes\.pth.*wrong shapes.*conv1\.weight"):
        imagenet_backbone("resnet18", source=str(tmp_path / "shapes.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt\.pth.*could not be read"):
        imagenet_backbone("resnet18", source=str(tmp_path / "corrupt.pth"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/resnet18\.pth"):
        imagenet_backbone("resnet18", source="nowhere/resnet18.pth")


def test_unknown_weights_name():
    with pytest.raises(ValueError, match=r"'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        imagenet_state_dict("resnet18", "IMAGENET1K_V9")
    with pytest.raises(ValueError, match=r"'in22k'.*ra3_in1k"):
        imagenet_state_dict("xception65", "in22k")
    with pytest.raises(TypeError, match="pretrained must be"):
        imagenet_state_dict("resnet18", 3)


def test_offline_error_is_clear(offline, tmp_path):
    with pytest.raises(RuntimeError) as info:
        imagenet_backbone("resnet18", source=True)
    message = str(info.value)
    assert offline and offline[0].endswith("resnet18-f37072fd.pth")  # the real download was attempted
    assert "Could not download" in message and "ResNet18_Weights.IMAGENET1K_V1" in message
    assert os.path.join(str(tmp_path / "hub"), "checkpoints") in message  # where torch caches weights
    assert "pretrained_backbone='/path/to/resnet18-f37072fd.pth'" in message
    assert "name resolution" in message
    # a named enum goes through the same path
    with pytest.raises(RuntimeError, match="ResNet50_Weights.IMAGENET1K_V2"):
        imagenet_state_dict("resnet50", "IMAGENET1K_V2")


def test_cached_weights_load_without_network(offline, tmp_path):
    """With the file in torch's cache, True works offline (no download attempted)."""
    state = torchvision.models.resnet18().state_dict()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")
    backbone = build_backbone("resnet18")
    load_imagenet_weights(backbone, "resnet18", "IMAGENET1K_V1")
    assert offline == []
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])


def test_timm_offline_error_is_clear(monkeypatch):
    import timm.models._hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError(
            "Cannot find the requested files in the disk cache and outgoing traffic is disabled"
        )

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)
    with pytest.raises(
        RuntimeError,
        match=r"Could not download.*xception65.*huggingface.co/timm/xception65.*pretrained_backbone='/path/",
    ):
        imagenet_state_dict("xception65", True)


# ------------------------------------------------------------------------------------ VGG fc6/fc7 -> LargeFOV
def test_largefov_fc6_fc7_are_subsampled_from_vgg_fc_layers():
    head = LargeFOVHead(in_channels=8, num_classes=3, rate=12, channels=4)
    fc6, fc7 = torch.randn(16, 8 * 7 * 7), torch.randn(16, 16)
    state = {"classifier.0.weight": fc6, "classifier.0.bias": torch.randn(16),
             "classifier.3.weight": fc7, "classifier.3.bias": torch.randn(16)}  # fmt: skip
    assert init_largefov_from_vgg(head, state) == 1
    kernel = fc6.view(16, 8, 7, 7)
    # filter 4k keeps the 7x7 taps 0, 3, 6 (rate 12 at stride 8 = every 3rd tap of the stride-32 kernel)
    assert torch.equal(head.fc6.weight[1, :, 2, 0], kernel[4, :, 6, 0])
    assert torch.equal(head.fc6.weight[3, :, 1, 1], kernel[12, :, 3, 3])
    assert torch.equal(head.fc6.bias, state["classifier.0.bias"][::4])
    assert torch.equal(head.fc7.weight[:, :, 0, 0], fc7[::4, ::4])
    state["classifier.0.weight"] = torch.full_like(fc6, float("nan"))  # torchvision's IMAGENET1K_FEATURES
    before = head.fc6.weight.clone()
    assert init_largefov_from_vgg(head, state) == 0 and torch.equal(head.fc6.weight, before)


def _vgg16_imagenet_file(tmp_path):
    """A fake torchvision VGG-16 ImageNet file, fc layers included, in the real shapes at a tiny size.

    Each tensor is a strided view (element ``[i, j, ...]`` = ``base[i + j + ...]``) of a short random
    vector; torch.save keeps such a view as it is, so fc6 (4096 x 25088) takes 116 kB, not 411 MB.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        base = torch.randn(sum(shape), generator=generator)
        state[key] = base.as_strided(shape, (1,) * len(shape))
    path = tmp_path / "vgg16-imagenet.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize(("builder", "module"), [(deeplab_v1, DeepLabV1), (deeplab_v2, DeepLabV2)])
def test_vgg16_builder_and_module_initialise_the_same_network_from_imagenet(tmp_path, builder, module):
    path, vgg = _vgg16_imagenet_file(tmp_path)
    torch.manual_seed(0)
    built = build_network(builder, dict(num_classes=3, backbone="vgg16", pretrained_backbone=str(path)))
    torch.manual_seed(0)
    trained = module(num_classes=3, backbone="vgg16", pretrained_backbone=str(path)).model
    ours, theirs = built.state_dict(), trained.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # ... and both took fc6/fc7 from VGG's fc layers: filter o of fc6 is VGG's filter 4 o at the 7x7 taps
    # that the head's rate samples (see test_largefov_fc6_fc7_are_subsampled_from_vgg_fc_layers)
    heads = [m for m in built.modules() if isinstance(m, LargeFOVHead)]
    assert len(heads) == (1 if builder is deeplab_v1 else 4)
    fc6 = vgg["classifier.0.weight"].reshape(4096, 512, 7, 7)
    assert torch.equal(heads[0].fc6.weight[5, :, 1, 1], fc6[20, :, 3, 3])
    assert torch.equal(heads[-1].fc7.bias, vgg["classifier.3.bias"][::4])
    assert torch.equal(built.backbone.features[28].weight, vgg["features.28.weight"])
