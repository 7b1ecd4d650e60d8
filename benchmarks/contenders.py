"""The models the speed suite times: ours, torchvision's and smp's DeepLab in pairs, every version of ours.

Every contender gets the same work: 21 classes, random weights, the same input sizes within a table and
the same loss (:func:`segmentation_loss`). smp refuses sizes not divisible by 16, so its pair runs at the
nearest multiple (a :class:`Pair`'s ``multiple``). smp's DeepLabV3+ uses depthwise-separable ASPP and
decoder convolutions by default, so that pair also has a row for ours with ``separable=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation import deeplabv3_resnet50

from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus

NUM_CLASSES = 21


@dataclass(frozen=True)
class Model:
    """A model to time: how to build it and how to read its outputs.

    Attributes:
        build: makes the network with random weights. A ``functools.partial`` of a module-level function
            (not a lambda), so that the CPU memory probe can rebuild it in a fresh process.
        library: "ours" (``forward_train`` gives every output), "torchvision" (a dict of outputs) or
            "smp" (the logits).
    """

    build: Callable[[], nn.Module]
    library: str = "ours"

    def outputs(self, network: nn.Module, images: Tensor) -> dict[str, Tensor]:
        """The training outputs by name: ``"out"`` and, where the model has one, the auxiliary head's."""
        if self.library == "ours":
            return network.forward_train(images)
        if self.library == "torchvision":
            return dict(network(images))
        return {"out": network(images)}

    def logits(self, network: nn.Module, images: Tensor) -> Tensor:
        """The main output of an inference pass, (N, C, H, W)."""
        out = network(images)
        return out["out"] if self.library == "torchvision" else out


@dataclass(frozen=True)
class Pair:
    """Ours against another library's model of the same design, side by side in one table.

    Attributes:
        name: short name ("v3"), used in targets and step rates.
        title: what is compared, in the table's title.
        ours: our model.
        other: the other library's model.
        other_name: the other library, prefixed to its rows ("torchvision plain").
        multiple: the other model accepts only sizes divisible by this; the whole pair runs at such sizes.
        extra: more rows of ours (name, model) with our recipe, after the first row.
        ablations: whether this table gets the "ours, no X" rows when ablations are on.
    """

    name: str
    title: str
    ours: Model
    other: Model
    other_name: str
    multiple: int = 1
    extra: tuple[tuple[str, Model], ...] = ()
    ablations: bool = False

    def crop(self, size: int) -> int:
        """A square training crop the pair accepts: ``size`` rounded down to the multiple (321 -> 320)."""
        return max(self.multiple, size // self.multiple * self.multiple)

    def image(self, hw: tuple[int, int]) -> tuple[int, int]:
        """A whole image's (height, width), rounded up to the multiple as a user pads (375 -> 384)."""
        height, width = (-(-side // self.multiple) * self.multiple for side in hw)
        return height, width


def smp_deeplabv3plus() -> nn.Module:
    """smp's DeepLabV3+ with a ResNet-50 encoder at output stride 16, random weights."""
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus(
        encoder_name="resnet50", encoder_weights=None, encoder_output_stride=16, classes=NUM_CLASSES
    )


def ours(builder: Callable[..., nn.Module], **options: object) -> Model:
    """Our model from one of ``deeplab_lit.models``' builders, with 21 classes and ``options``."""
    return Model(partial(builder, num_classes=NUM_CLASSES, **options))


PAIRS: tuple[Pair, ...] = (
    Pair(
        "v3",
        "our DeepLabV3 (ResNet-50, OS 8, aux head) vs torchvision deeplabv3_resnet50 (aux_loss=True)",
        ours(deeplab_v3, backbone="resnet50", output_stride=8, atrous_rates=(12, 24, 36), multi_grid=None,
             aux_head=True),
        Model(partial(deeplabv3_resnet50, weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                      aux_loss=True), "torchvision"),
        "torchvision",
        ablations=True,
    ),
    Pair(
        "v3plus",
        "our DeepLabV3+ (ResNet-50, OS 16) vs smp DeepLabV3Plus (resnet50, output stride 16)",
        ours(deeplab_v3plus, backbone="resnet50", output_stride=16),
        Model(smp_deeplabv3plus, "smp"),
        "smp",
        multiple=16,
        extra=(("ours separable",
                ours(deeplab_v3plus, backbone="resnet50", output_stride=16, separable=True)),),
    ),
)  # fmt: skip

#: Every DeepLab version of ours: (label, model), for the versions table.
VERSIONS: tuple[tuple[str, Model], ...] = (
    ("v1 VGG-16 LargeFOV", ours(deeplab_v1)),
    ("v1 ResNet-101", ours(deeplab_v1, backbone="resnet101")),
    ("v2 ResNet-101 ASPP-L", ours(deeplab_v2)),
    ("v2 ResNet-101 ASPP-L + MSC", ours(deeplab_v2, msc_scales=(1.0, 0.75, 0.5))),
    ("v3 ResNet-101 MG OS16", ours(deeplab_v3, output_stride=16)),
    ("v3 ResNet-101 MG OS8", ours(deeplab_v3, output_stride=8)),
    ("v3+ ResNet-101 OS16", ours(deeplab_v3plus)),
    ("v3+ Xception-65 OS16 sep.", ours(deeplab_v3plus, backbone="xception65", separable=True)),
    ("v3+ MobileNetV2 OS16", ours(deeplab_v3plus, backbone="mobilenet_v2")),
)


def segmentation_loss(outputs: dict[str, Tensor], masks: Tensor) -> Tensor:
    """Cross-entropy ignoring 255 on every output, auxiliary outputs at weight 0.5 (torchvision's recipe)."""
    total = masks.new_zeros((), dtype=torch.float32)
    for name, logits in outputs.items():
        weight = 0.5 if name.startswith("aux") else 1.0
        total = total + weight * F.cross_entropy(logits.float(), masks, ignore_index=255)
    return total
