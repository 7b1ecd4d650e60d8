import os
import urllib.error

import pytest
import torch
import torchvision

from deeplab_lit.models import build_backbone, deeplab_v3plus
from deeplab_lit.models.imagenet import imagenet_state_dict, load_imagenet_weights


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
    backbone = build_backbone("resnet18", output_stride=8, pretrained=str(path))
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert "fc.weight" not in loaded
    # a whole segmenter built with it starts from the same weights
    model = deeplab_v3plus(num_classes=2, backbone="resnet18", pretrained_backbone=str(path))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_backbone_format_and_wrapped_checkpoint_load(tmp_path):
    source = build_backbone("mobilenet_v2")
    path = tmp_path / "mbv2.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    target = build_backbone("mobilenet_v2", output_stride=8, pretrained=path)
    assert torch.equal(target.features[17].conv[0][0].weight, source.features[17].conv[0][0].weight)


def test_mobilenet_and_vgg_imagenet_layouts_load(tmp_path):
    state = torchvision.models.mobilenet_v2().state_dict()  # has features.18.* and classifier.*
    torch.save(state, tmp_path / "mbv2.pth")
    backbone = build_backbone("mobilenet_v2", pretrained=str(tmp_path / "mbv2.pth"))
    assert torch.equal(backbone.features[0][0].weight, state["features.0.0.weight"])
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).state_dict()
    vgg_state = {f"features.{k}": v for k, v in features.items()}
    vgg_state["classifier.0.weight"] = torch.zeros(8, 8)  # fc layers are not part of the body
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    vgg = build_backbone("vgg16", output_stride=8, pretrained=str(tmp_path / "vgg16.pth"))
    assert torch.equal(vgg.features[28].weight, features["28.weight"])


def test_timm_layout_loads_into_xception(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("xception65")
    timm_state = {k.removeprefix("body."): v for k, v in source.state_dict().items()}
    timm_state["head.fc.weight"], timm_state["head.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    from safetensors.torch import save_file

    save_file(timm_state, str(tmp_path / "model.safetensors"))
    target = build_backbone("xception65", pretrained=str(tmp_path / "model.safetensors"))
    assert torch.equal(target.body.stem[0].conv.weight, source.body.stem[0].conv.weight)


def test_mismatched_file_names_file_and_keys(tmp_path):
    path, _ = _torchvision_resnet18_file(tmp_path)
    with pytest.raises(
        ValueError, match=r"resnet18-imagenet\.pth.*resnet34.*missing keys.*layer1\.2\.conv1\.weight"
    ):
        build_backbone("resnet34", pretrained=str(path))
    torch.save({"conv1.weight": torch.zeros(1), "stray.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth.*unexpected keys \(first: \['stray\.weight'\]\)"):
        build_backbone("resnet18", pretrained=str(tmp_path / "bad.pth"))


def test_wrong_shapes_unreadable_and_missing_files(tmp_path):
    state = build_backbone("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "shapes.pth")
    with pytest.raises(ValueError, match=r"shapes\.pth.*wrong shapes.*conv1\.weight"):
        build_backbone("resnet18", pretrained=str(tmp_path / "shapes.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt\.pth.*could not be read"):
        build_backbone("resnet18", pretrained=str(tmp_path / "corrupt.pth"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/resnet18\.pth"):
        build_backbone("resnet18", pretrained="nowhere/resnet18.pth")


def test_unknown_weights_name():
    with pytest.raises(ValueError, match=r"'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        imagenet_state_dict("resnet18", "IMAGENET1K_V9")
    with pytest.raises(ValueError, match=r"'in22k'.*ra3_in1k"):
        imagenet_state_dict("xception65", "in22k")
    with pytest.raises(TypeError, match="pretrained must be"):
        imagenet_state_dict("resnet18", 3)


def test_offline_error_is_clear(offline, tmp_path):
    with pytest.raises(RuntimeError) as info:
        build_backbone("resnet18", pretrained=True)
    message = str(info.value)
    assert offline and offline[0].endswith("resnet18-f37072fd.pth")  # the real download was attempted
    assert "Could not download" in message and "ResNet18_Weights.IMAGENET1K_V1" in message
    assert os.path.join(str(tmp_path / "hub"), "checkpoints") in message  # where torch caches weights
    assert "pretrained='/path/to/resnet18-f37072fd.pth'" in message
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
        RuntimeError, match=r"Could not download.*xception65.*Hugging Face.*pretrained='/path/to/"
    ):
        imagenet_state_dict("xception65", True)
