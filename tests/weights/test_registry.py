"""Weights by name: the registry's entries, checksums, offline advice and the published entries' models.

No downloads: tiny checkpoints are written here and registered with a local path or ``file://`` URL; the
published entries are checked against reference-shaped state dicts built on the meta device (keys and
shapes without memory) and against torchvision's own metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.models.segmentation import (
    DeepLabV3_ResNet50_Weights,
    DeepLabV3_ResNet101_Weights,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
)

from deeplab_lit import DeepLabV3
from deeplab_lit.models import MultiScaleSegmenter, Segmenter, deeplab_v3
from deeplab_lit.normalization import CAFFE_BGR, IMAGENET
from deeplab_lit.weights.load import build_published, describe_model, load_weights, read_checkpoint
from deeplab_lit.weights.registry import (
    UnknownWeightsError,
    WeightsEntry,
    describe_weights,
    get_weights,
    list_weights,
    register_weights,
    unregister_weights,
)
from tests.weights.test_load import KazutoDeepLab, KazutoMSC, randomize

PUBLISHED = (
    "deeplabv1_resnet101.coco_init",
    "deeplabv2_resnet101_msc.voc_trainaug",
    "deeplabv3_resnet101.coco_voc",
    "deeplabv3_resnet50.coco_voc",
)
#: A tiny DeepLab v3: options other than DeepLabV3's defaults, so that adopting them from the entry shows.
TINY_OPTIONS = {"backbone": "resnet18", "output_stride": 8, "atrous_rates": (12, 24, 36), "multi_grid": None}
TINY_CLASSES = ("background", "disc", "square")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_model() -> Segmenter:
    torch.manual_seed(0)
    return randomize(deeplab_v3(num_classes=3, **TINY_OPTIONS))


def tiny_checkpoint(folder: Path, file_name: str = "tiny_v3_resnet18.pth") -> tuple[Segmenter, Path]:
    """A tiny model and its plain state dict (which says nothing of options or normalisation)."""
    model = tiny_model()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / file_name)
    return model, folder / file_name


def tiny_entry(
    url: str | None, file_name: str, sha256: str | None, name: str = "tiny_v3.test"
) -> WeightsEntry:
    """An entry for :func:`tiny_checkpoint`'s file; Caffe normalisation, so that taking it from here shows."""
    return WeightsEntry(
        name=name, url=url, file_name=file_name, sha256=sha256, module_class="deeplab_lit.DeepLabV3",
        options=TINY_OPTIONS, num_classes=3, class_names=TINY_CLASSES, normalization=CAFFE_BGR,
        data="written by the test", instructions="Write it with tiny_checkpoint().",
    )  # fmt: skip


@pytest.fixture
def register():
    """Register entries for one test; they are removed after it."""
    names: list[str] = []

    def add(entry: WeightsEntry) -> WeightsEntry:
        register_weights(entry)
        names.append(entry.name)
        return entry

    yield add
    for name in names:
        unregister_weights(name)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's cache in tmp_path; the previous directory is restored after the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


# ------------------------------------------------------------------------------------ published entries
@pytest.mark.parametrize(
    ("name", "weights"),
    [("deeplabv3_resnet50.coco_voc", DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1),
     ("deeplabv3_resnet101.coco_voc", DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1)],
)  # fmt: skip
def test_torchvision_entries_say_what_torchvision_publishes(name, weights):
    entry = get_weights(name)
    assert entry.url == weights.url and entry.file_name == Path(weights.url).name
    assert entry.class_names == tuple(weights.meta["categories"]) and entry.num_classes == 21
    assert {k: dict(v) for k, v in entry.metrics.items()} == weights.meta["_metrics"]
    assert entry.sha256 is not None and weights.url.endswith(f"-{entry.sha256}.pth")  # the known prefix
    preset = weights.transforms()  # torchvision's preprocessing: RGB in 0-1, then mean/std
    assert entry.normalization == IMAGENET and not entry.normalization.bgr
    assert torch.allclose(torch.tensor(entry.normalization.mean) / 255, torch.tensor(preset.mean), atol=1e-3)
    assert torch.allclose(torch.tensor(entry.normalization.std) / 255, torch.tensor(preset.std), atol=1e-3)


def _reference_state(name: str) -> dict[str, torch.Tensor]:
    """The published file's keys and shapes (meta tensors): torchvision's model, kazuto1011's layout."""
    with torch.device("meta"):
        if name.startswith("deeplabv3_"):
            builder = deeplabv3_resnet50 if "resnet50" in name else deeplabv3_resnet101
            return builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).state_dict()
        if name.startswith("deeplabv2_"):  # the release predates BatchNorm's num_batches_tracked
            state = KazutoMSC(KazutoDeepLab(21)).state_dict()
            return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        return KazutoDeepLab(91, rates=None).state_dict()  # convert.py --dataset coco: no MSC wrapper


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_entries_build_the_networks_their_files_load_into(name, tmp_path, register):
    published = get_weights(name)
    path = tmp_path / published.file_name
    torch.save(_reference_state(name), path)
    local = register(dataclasses.replace(
        published, name=f"{name}_local", url=str(path), file_name=f"local_{published.file_name}", sha256=None
    ))  # fmt: skip
    with torch.device("meta"):  # keys, shapes and structure are checked; no memory, no arithmetic
        model = build_published(local.name)
    assert isinstance(model, MultiScaleSegmenter) == bool(published.options.get("msc_scales"))
    built = describe_model(model)
    for option, value in published.options.items():
        if option in built and option != "style":
            assert built[option] == value, option
    assert published.module_options()["weights"] == name and published.path.name == published.file_name


def test_the_published_names_and_their_table():
    assert set(PUBLISHED) <= set(list_weights())
    table = describe_weights()
    for name in PUBLISHED:
        assert name in table
    assert "76.65 VOC2012-val; 77.93 VOC2012-val-CRF" in table and "66.4 COCO-val2017-VOC-labels" in table


# ---------------------------------------------------------------------------------------- tiny entries
def test_a_name_loads_its_file_and_gives_the_entry_s_options_classes_and_normalization(tmp_path, register):
    model, path = tiny_checkpoint(tmp_path)
    entry = register(tiny_entry(str(path), path.name, sha256(path)))
    fresh = deeplab_v3(num_classes=3, **TINY_OPTIONS)
    info = load_weights(fresh, entry.name)
    assert info.source == entry.name and info.normalization == CAFFE_BGR  # the file itself has none
    assert torch.equal(fresh.head[4].weight, model.head[4].weight)
    # the module's weights: option: options left at their defaults come from the entry
    module = DeepLabV3(num_classes=3, weights=entry.name)
    assert module.hparams.output_stride == 8 and module.hparams.atrous_rates == [12, 24, 36]
    assert module.hparams.backbone == "resnet18" and module.normalization == CAFFE_BGR
    assert torch.equal(module.model.backbone.layer4[1].conv2.weight, model.backbone.layer4[1].conv2.weight)
    # what a command line builds without a config: the class path and its init_args
    module_path, class_name = entry.module_class.rsplit(".", 1)
    built = getattr(importlib.import_module(module_path), class_name)(**entry.module_options())
    assert built.class_names == list(TINY_CLASSES) and built.hparams.weights == entry.name
    assert torch.equal(built.model.head[4].bias, model.head[4].bias)


@pytest.mark.parametrize("address", ["path", "file_url"])
def test_a_checksum_mismatch_names_the_file_and_both_digests_and_loads_nothing(
    address, tmp_path, hub, register
):
    model, path = tiny_checkpoint(tmp_path / "published")
    real = sha256(path)
    wrong = ("0" if real[0] != "0" else "1") + real[1:]
    url = str(path) if address == "path" else path.as_uri()
    entry = register(tiny_entry(url, "tiny_v3_resnet18.pth", wrong))
    fresh = deeplab_v3(num_classes=3, **TINY_OPTIONS)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="checksum") as caught:
        load_weights(fresh, entry.name)
    message = str(caught.value)
    for part in (entry.name, url, real, wrong):
        assert part in message
    assert unchanged(fresh, before)
    assert not (hub / entry.file_name).exists()  # a download that fails its checksum is not kept
    register_weights(dataclasses.replace(entry, sha256=real), replace=True)
    assert load_weights(fresh, entry.name).source == entry.name
    assert torch.equal(fresh.head[4].weight, model.head[4].weight)


def test_an_unknown_name_lists_close_names_and_all_names(tmp_path):
    with pytest.raises(UnknownWeightsError) as caught:
        get_weights("deeplabv3_resnet50.coco")
    message = str(caught.value)
    assert "Did you mean 'deeplabv3_resnet50.coco_voc'" in message
    assert all(name in message for name in list_weights())
    # wherever a path is accepted, an unregistered word stays a path, and the error suggests the name
    with pytest.raises(FileNotFoundError, match=r"'deeplabv3_resnet50\.coco' does not exist .*coco_voc"):
        load_weights(deeplab_v3(num_classes=3, **TINY_OPTIONS), "deeplabv3_resnet50.coco")


def test_offline_the_error_names_the_url_and_the_path_where_the_file_then_loads(
    tmp_path, hub, register, monkeypatch
):
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    model, path = tiny_checkpoint(tmp_path / "elsewhere")
    url = "http://127.0.0.1:9/models/tiny_v3_resnet18-0123abcd.pth"  # nothing listens on port 9
    entry = register(tiny_entry(url, "tiny_v3_resnet18-0123abcd.pth", sha256(path)))
    fresh = deeplab_v3(num_classes=3, **TINY_OPTIONS)
    with pytest.raises(RuntimeError) as caught:
        load_weights(fresh, entry.name)
    message = str(caught.value)
    assert entry.name in message and url in message and str(hub / entry.file_name) in message
    shutil.copy(path, hub / entry.file_name)  # what the message says to do
    load_weights(fresh, entry.name)
    assert torch.equal(fresh.head[4].weight, model.head[4].weight)


def test_weights_published_only_as_instructions_say_how_and_where(tmp_path, hub, register):
    model, path = tiny_checkpoint(tmp_path / "converted")
    entry = register(tiny_entry(None, "tiny_converted.pth", None))
    fresh = deeplab_v3(num_classes=3, **TINY_OPTIONS)
    with pytest.raises(FileNotFoundError, match=r"Write it with tiny_checkpoint\(\)") as caught:
        load_weights(fresh, entry.name)
    assert f"Put the file at {hub / 'tiny_converted.pth'}" in str(caught.value)
    hub.mkdir(parents=True)
    shutil.copy(path, hub / "tiny_converted.pth")
    load_weights(fresh, entry.name)
    assert torch.equal(fresh.head[4].weight, model.head[4].weight)


def test_a_file_that_is_not_what_its_entry_says_is_refused(tmp_path, register):
    path = tmp_path / "deeplabv3_resnet50_coco.pth"  # a ResNet-50 file where the entry says ResNet-101
    torch.save(_reference_state("deeplabv3_resnet50.coco_voc"), path)
    published = get_weights("deeplabv3_resnet101.coco_voc")
    entry = register(dataclasses.replace(published, name="deeplabv3_resnet101.wrong_file", url=str(path),
                                         file_name=path.name, sha256=None))  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"resnet101\.wrong_file.*resnet50_coco\.pth.*not what the entry describes: "
        r"backbone='resnet50' \(the entry says 'resnet101'\)\. Replace it with the published file",
    ):
        read_checkpoint(entry.name)


def test_registering_refuses_taken_names_and_file_names_and_bad_entries(tmp_path, register):
    entry = register(tiny_entry(str(tmp_path / "a.pth"), "a.pth", None))
    with pytest.raises(ValueError, match="registered already"):
        register_weights(entry)
    with pytest.raises(ValueError, match="file name 'a.pth' is that of 'tiny_v3.test'"):
        register_weights(dataclasses.replace(entry, name="tiny_v3.other"))
    with pytest.raises(ValueError, match=r"name 'Tiny' .*sha256 'xyz'.*2 class names for num_classes=3"):
        dataclasses.replace(entry, name="Tiny", sha256="xyz", class_names=("a", "b"))
    with pytest.raises(TypeError):
        entry.options["backbone"] = "resnet50"  # type: ignore[index]  # entries are read-only
    typo = register(dataclasses.replace(entry, name="tiny_v3.typo", file_name="b.pth",
                                        options={**TINY_OPTIONS, "outputstride": 8}))  # fmt: skip
    with pytest.raises(ValueError, match=r"tiny_v3\.typo.* unknown architecture options \['outputstride'\]"):
        build_published(typo.name, pretrained=False)
