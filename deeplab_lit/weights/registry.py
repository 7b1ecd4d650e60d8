"""Published DeepLab weights by name: where each file is, what it holds, what it needs, what it scored.

torchvision describes each published checkpoint once (``WeightsEnum`` members holding a ``Weights``:
URL, preprocessing, metadata) so that a name is enough to build, load and use a model. This registry
does the same for every published checkpoint this project loads, with the facts a user needs besides the
tensors: the architecture options to build it, its classes, the input normalisation it was trained with,
the published figures and where they are published, and how much of the file's integrity is known.

Names follow ``<DeepLab version>_<backbone>[_msc].<training data>``, e.g.
``deeplabv3_resnet101.coco_voc``. A published name never changes meaning; a later release of the same
architecture on the same data would get a suffix (``.coco_voc_v2``). A name is accepted wherever a
weights path or URL is (``weights: deeplabv3_resnet101.coco_voc`` in a config,
:func:`~deeplab_lit.weights.load.load_weights`, ``torch.hub.load``); it wins only when it is a registered
name, so paths and URLs behave as before. Where its file is kept: :func:`weights_file`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from deeplab_lit.normalization import CAFFE_BGR, IMAGENET, Normalization
from deeplab_lit.weights.download import checksum_problem, download, is_url

__all__ = [
    "VERSION_CLASSES", "VOC_CLASSES", "UnknownWeightsError", "WeightsEntry", "class_version", "close_names",
    "describe_weights", "find_weights", "get_weights", "list_weights", "register_weights",
    "unregister_weights", "weights_file",
]  # fmt: skip

#: PASCAL VOC's 20 categories and background, in label order (torchvision's names for them).
VOC_CLASSES: tuple[str, ...] = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

_NAME = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")
_HEX = re.compile(r"[0-9a-f]{8,64}")


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy with lists as tuples, so that an entry cannot change once registered."""
    return MappingProxyType({k: (tuple(v) if isinstance(v, list) else v) for k, v in mapping.items()})


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint: its address, what it holds and needs, and its published figures.

    Attributes:
        name: The registered name (``<version>_<backbone>[_msc].<data>``).
        url: Where the file is published (``http(s)://``, ``file://``), a local path (tests, own files), or
            None when no loadable file is published and ``instructions`` say how to make it.
        file_name: The file's name in torch's checkpoint folder (unique among entries).
        sha256: The file's SHA-256, or the prefix of it that is known (torchvision publishes the first 8
            hex digits in its file names), or None when none is published: the file is then checked only
            by the loader's key, shape and structure checks.
        module_class: The LightningModule class that trains/evaluates it (``"deeplab_lit.DeepLabV3"``).
        options: Architecture options to build it, as the modules and YAML files name them (``backbone``,
            ``style``, ``output_stride``, ``atrous_rates``, ``multi_grid``, ``msc_scales``, ``aux_head``...).
        num_classes: Its class count.
        class_names: Its classes in label order; None where the label map is not published.
        normalization: The input normalisation it was trained with (the data pipeline must use it).
        data: What it was trained on, in a few words (the recipe says more).
        metrics: Published figures in percent, by evaluation setting: ``{setting: {metric: value}}``.
        source: Where the figures (and the file) are published.
        recipe: How it was trained and evaluated, in short.
        publisher: Who trained and published it.
        instructions: How to obtain the file when ``url`` is None (or extra advice).
        crf_preset: The dense-CRF preset of its published with-CRF figure, if any.
        data_class: The data module whose label set it predicts (``"deeplab_lit.data.VOCDataModule"``);
            None where no data module has its classes (e.g. the 91 COCO classes of an initialisation).
    """

    name: str
    url: str | None
    file_name: str
    sha256: str | None
    module_class: str
    options: Mapping[str, Any]
    num_classes: int
    class_names: tuple[str, ...] | None
    normalization: Normalization
    data: str
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    source: str = ""
    recipe: str = ""
    publisher: str = ""
    instructions: str = ""
    crf_preset: str | None = None
    data_class: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not _NAME.fullmatch(self.name):
            problems.append(f"name {self.name!r} is not <architecture>.<data> in lower case")
        if self.sha256 is not None and not _HEX.fullmatch(self.sha256):
            problems.append(f"sha256 {self.sha256!r} is not 8 to 64 lower-case hex digits")
        if not self.file_name or "/" in self.file_name or "\\" in self.file_name:
            problems.append(f"file_name {self.file_name!r} is not a plain file name")
        if not self.module_class.startswith("deeplab_lit."):
            problems.append(f"module_class {self.module_class!r} is not a deeplab_lit class path")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            problems.append(f"{len(self.class_names)} class names for num_classes={self.num_classes}")
        if problems:
            raise ValueError(f"Invalid weights entry {self.name!r}: {'; '.join(problems)}")
        object.__setattr__(self, "options", _frozen(self.options))
        object.__setattr__(self, "metrics", _frozen({k: _frozen(v) for k, v in self.metrics.items()}))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    def __hash__(self) -> int:  # the generated one would hash the (unhashable) read-only mappings
        return hash(self.name)

    @property
    def path(self) -> Path:
        """Where the file is kept, or must be put by hand when it cannot be downloaded."""
        if self.url is not None and not is_url(self.url):
            return Path(self.url).expanduser()
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file_name

    def module_options(self) -> dict[str, Any]:
        """The module's ``init_args`` that build this model with these weights, without a config file.

        Use with :attr:`module_class` and :attr:`normalization` (for the data), e.g.
        ``{"class_path": entry.module_class, "init_args": entry.module_options()}``. Sequences are lists,
        as YAML and hyper-parameters hold them.
        """
        options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}
        names = list(self.class_names) if self.class_names is not None else None
        return {**options, "num_classes": self.num_classes, "class_names": names, "weights": self.name}


class UnknownWeightsError(KeyError):
    """No weights are registered under the name asked for (the message lists close and all names)."""

    def __str__(self) -> str:  # KeyError's shows the repr of its argument; this shows the message
        return str(self.args[0])


#: The LightningModule class of each DeepLab version.
VERSION_CLASSES: dict[str, str] = {
    "v1": "DeepLabV1", "v2": "DeepLabV2", "v3": "DeepLabV3", "v3+": "DeepLabV3Plus",
}  # fmt: skip


def class_version(class_path: str | None) -> str | None:
    """Return the DeepLab version of a module class name or path (``"deeplab_lit.DeepLabV2"`` -> ``"v2"``)."""
    name = (class_path or "").rsplit(".", 1)[-1]
    return {cls: version for version, cls in VERSION_CLASSES.items()}.get(name)


_REGISTRY: dict[str, WeightsEntry] = {}


def register_weights(entry: WeightsEntry, *, replace: bool = False) -> WeightsEntry:
    """Add an entry (own or test weights); its name then works wherever a weights path does.

    Raises:
        ValueError: the name, or the file name, is taken by another entry (unless ``replace``).
    """
    if not replace and entry.name in _REGISTRY:
        raise ValueError(f"Weights {entry.name!r} are registered already; pass replace=True to replace them")
    taken = [e.name for e in _REGISTRY.values() if e.file_name == entry.file_name and e.name != entry.name]
    if taken:
        raise ValueError(
            f"Weights {entry.name!r}: file name {entry.file_name!r} is that of {taken[0]!r} already; each "
            "entry's file is kept under its own name in torch's checkpoint folder"
        )
    _REGISTRY[entry.name] = entry
    return entry


def unregister_weights(name: str) -> None:
    """Remove an entry added by :func:`register_weights` (tests clean up after themselves)."""
    get_weights(name)
    del _REGISTRY[name]


def list_weights() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def find_weights(name: str) -> WeightsEntry | None:
    """The entry registered under exactly ``name``, or None (a path or URL)."""
    return _REGISTRY.get(name)


def close_names(name: str) -> list[str]:
    """Registered names that look like ``name`` (for messages about a mistyped name)."""
    return difflib.get_close_matches(name, list_weights(), n=3, cutoff=0.6)


def get_weights(name: str) -> WeightsEntry:
    """Return the entry registered as ``name``.

    Raises:
        UnknownWeightsError: a KeyError: no such name; the message lists close matches and every
            registered name.
    """
    entry = find_weights(name)
    if entry is None:
        close = close_names(name)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownWeightsError(
            f"No weights are registered as {name!r}.{hint} Registered: {', '.join(list_weights())}"
        )
    return entry


def describe_weights() -> str:
    """A text table of the registered weights: name, DeepLab version, backbone, data, mIoU, source."""
    rows = [("name", "version", "backbone", "trained on", "published mIoU (%)", "source")]
    for name in list_weights():
        entry = _REGISTRY[name]
        scores = "; ".join(f"{m['miou']} {setting}" for setting, m in entry.metrics.items() if "miou" in m)
        rows.append((name, str(class_version(entry.module_class)), str(entry.options.get("backbone")),
                     entry.data, scores or "-", entry.source or "-"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def weights_file(entry: WeightsEntry) -> Path:
    """Return the entry's file on this machine, downloading it once, checked against its SHA-256.

    The file is kept in torch's checkpoint folder under its published file name
    (``<torch.hub.get_dir()>/checkpoints/<file_name>``, where torchvision keeps the same files). Tests and
    users add entries with :func:`register_weights` (a local path or ``file://`` URL works as the address).

    Raises:
        RuntimeError: the download failed; the message names the URL and the exact path to put the file at.
        FileNotFoundError: no file is published (or the local one is missing); the message says how to
            make it and where to put it.
        ValueError: the file fails its checksum (the message names the file and both digests).
    """
    if entry.url is not None and is_url(entry.url):
        try:
            return download(entry.url, sha256=entry.sha256, to=entry.path)
        except (RuntimeError, ValueError) as err:
            raise type(err)(f"Weights {entry.name!r}: {err}") from err
    path = entry.path
    if not path.is_file():
        how = f" {entry.instructions}" if entry.instructions else ""
        raise FileNotFoundError(
            f"Weights {entry.name!r}: the file {str(path)!r} does not exist.{how} Put the file at {path}."
        )
    problem = checksum_problem(path, entry.sha256)
    if problem is not None:
        raise ValueError(f"Weights {entry.name!r}: the file {str(path)!r} fails its checksum: {problem}")
    return path


# ---------------------------------------------------------------------------------------- published
_TORCHVISION_SOURCE = "https://pytorch.org/vision/stable/models.html#semantic-segmentation"
_TORCHVISION_RECIPE = (
    "torchvision references/segmentation (https://github.com/pytorch/vision/tree/main/references/"
    "segmentation): {backbone} initialised from ImageNet, trained with an auxiliary FCN head on the COCO "
    "train2017 images that hold the 20 VOC categories, other objects labelled background (8 GPUs x batch "
    "4, SGD lr 0.02, poly schedule); evaluated with images resized to 520 px. Figures from torchvision's "
    "weights metadata (DeepLabV3_{enum}_Weights.COCO_WITH_VOC_LABELS_V1.meta)."
)
_TORCHVISION_OPTIONS = {"style": "torchvision", "output_stride": 8, "atrous_rates": (12, 24, 36),
                        "multi_grid": None, "aux_head": True}  # fmt: skip
_TORCHVISION_CHECKSUM = (
    "sha256 is the 8-hex-digit prefix of the file's SHA-256 that torchvision's file name carries (its "
    "convention, checked by torch.hub too); no full digest is published."
)
_KAZUTO_SOURCE = "https://github.com/kazuto1011/deeplab-pytorch#performance"
_KAZUTO_OPTIONS = {"backbone": "resnet101", "style": "caffe", "output_stride": 8}

for _backbone, _enum, _hash, _miou in (("resnet50", "ResNet50", "cd0a2569", 66.4),
                                       ("resnet101", "ResNet101", "586e9e4e", 67.4)):  # fmt: skip
    register_weights(
        WeightsEntry(
            name=f"deeplabv3_{_backbone}.coco_voc",
            url=f"https://download.pytorch.org/models/deeplabv3_{_backbone}_coco-{_hash}.pth",
            file_name=f"deeplabv3_{_backbone}_coco-{_hash}.pth",
            sha256=_hash,
            module_class="deeplab_lit.DeepLabV3",
            options={"backbone": _backbone, **_TORCHVISION_OPTIONS},
            num_classes=21,
            class_names=VOC_CLASSES,
            normalization=IMAGENET,
            data="COCO train2017, 20 VOC categories",
            metrics={"COCO-val2017-VOC-labels": {"miou": _miou, "pixel_acc": 92.4}},
            source=_TORCHVISION_SOURCE,
            recipe=_TORCHVISION_RECIPE.format(backbone=_backbone, enum=_enum),
            publisher="torchvision",
            data_class="deeplab_lit.data.VOCDataModule",
            instructions=_TORCHVISION_CHECKSUM,
        )
    )

register_weights(
    WeightsEntry(
        name="deeplabv3_mobilenet_v3_large.coco_voc",
        url="https://download.pytorch.org/models/deeplabv3_mobilenet_v3_large-fc3c493d.pth",
        file_name="deeplabv3_mobilenet_v3_large-fc3c493d.pth",
        sha256="fc3c493d",
        module_class="deeplab_lit.DeepLabV3",
        # torchvision's _deeplabv3_mobilenetv3: mobilenet_v3_large(dilated=True), OS 16, DeepLabHead's
        # default rates (12, 24, 36) kept at that stride, FCN aux head on features.4
        options={
            "backbone": "mobilenet_v3_large",
            "output_stride": 16,
            "atrous_rates": (12, 24, 36),
            "multi_grid": None,
            "aux_head": True,
        },
        num_classes=21,
        class_names=VOC_CLASSES,
        normalization=IMAGENET,
        data="COCO train2017, 20 VOC categories",
        metrics={"COCO-val2017-VOC-labels": {"miou": 60.3, "pixel_acc": 91.2}},
        source=_TORCHVISION_SOURCE,
        recipe=(
            "torchvision references/segmentation (https://github.com/pytorch/vision/tree/main/references/"
            "segmentation#deeplabv3_mobilenet_v3_large): MobileNetV3-Large initialised from ImageNet "
            "(MobileNet_V3_Large_Weights.IMAGENET1K_V1), dilated to output stride 16, trained with an "
            "auxiliary FCN head on the COCO train2017 images that hold the 20 VOC categories, other objects "
            "labelled background (8 GPUs x batch 4, SGD at the script's default lr 0.01, weight decay 1e-6, "
            "poly schedule, 30 epochs); evaluated with images resized to 520 px. Figures from torchvision's "
            "weights metadata (DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1.meta)."
        ),
        publisher="torchvision",
        data_class="deeplab_lit.data.VOCDataModule",
        instructions=_TORCHVISION_CHECKSUM,
    )
)

register_weights(
    WeightsEntry(
        name="deeplabv2_resnet101_msc.voc_trainaug",
        url="https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
        "deeplabv2_resnet101_msc-vocaug-20000.pth",
        file_name="deeplabv2_resnet101_msc-vocaug-20000.pth",
        sha256=None,
        module_class="deeplab_lit.DeepLabV2",
        options={**_KAZUTO_OPTIONS, "atrous_rates": (6, 12, 18, 24), "msc_scales": (1.0, 0.75, 0.5)},
        num_classes=21,
        class_names=VOC_CLASSES,
        normalization=CAFFE_BGR,
        data="VOC 2012 train_aug",
        metrics={
            "VOC2012-val": {"miou": 76.65, "pixel_acc": 94.64, "mean_acc": 86.50, "fwiou": 90.41},
            "VOC2012-val-CRF": {"miou": 77.93, "pixel_acc": 95.04, "mean_acc": 86.64, "fwiou": 91.06},
        },
        source=_KAZUTO_SOURCE,
        recipe=(
            "kazuto1011/deeplab-pytorch configs/voc12.yaml and main.py: DeepLab v2 ResNet-101 + MSC "
            "(1, 0.75, 0.5; a loss on each scale and on their max), initialised from "
            "deeplabv1_resnet101.coco_init; 20,000 iterations of batch 10 (5 x 2 accumulated), SGD lr "
            "2.5e-4 (ASPP weights 10x, biases 20x), momentum 0.9, weight decay 5e-4, poly 0.9, frozen "
            "BatchNorm, 321x321 crops of images scaled 0.5-1.5 and flipped; evaluated on VOC 2012 val "
            "(1,449 images) at full size, with and without the dense CRF (preset deeplab_v2)."
        ),
        publisher="kazuto1011/deeplab-pytorch",
        instructions=(
            "No checksum is published: the file is checked only by the loader's key, shape and structure "
            "checks."
        ),
        crf_preset="deeplab_v2",
        data_class="deeplab_lit.data.VOCDataModule",
    )
)

register_weights(
    WeightsEntry(
        name="deeplabv1_resnet101.coco_init",
        url=None,
        file_name="deeplabv1_resnet101-coco.pth",
        sha256=None,
        module_class="deeplab_lit.DeepLabV1",
        options=dict(_KAZUTO_OPTIONS),
        num_classes=91,
        class_names=None,
        normalization=CAFFE_BGR,
        data="MS-COCO, 91 classes",
        source=_KAZUTO_SOURCE,
        recipe=(
            "The DeepLab authors' COCO-trained ResNet-101 (init.caffemodel), converted by kazuto1011's "
            "convert.py; the initialisation of deeplabv2_resnet101_msc.voc_trainaug (load it with "
            "reinit_classifier: true into a DeepLabV2). No figures are published for it."
        ),
        publisher="DeepLab authors (Caffe), converted by kazuto1011/deeplab-pytorch",
        instructions=(
            "No PyTorch file is published, and no checksum: download init.caffemodel in "
            "http://liangchiehchen.com/projects/released/deeplab_aspp_resnet101/prototxt_and_model.zip "
            "(kazuto1011/deeplab-pytorch scripts/setup_caffemodels.sh), convert it with "
            "kazuto1011/deeplab-pytorch's 'python convert.py --dataset coco', which writes "
            "deeplabv1_resnet101-coco.pth; the file is then checked only by the loader's key, shape and "
            "structure checks."
        ),
    )
)
