"""DeepLab v1, v2, v3 and v3+ as LightningModules: each names its builder and the paper's defaults.

Everything else (building the network from the hyper-parameters the builder accepts, step, loss,
optimiser, schedule, metrics) is inherited from :class:`~deeplab_lit.modules.base.SegmentationModule`.
Arguments not listed here (``lr``, ``weight_decay``, ``freeze_bn``, ``inference``, ...) are the base
class's. A new variant is a builder in :mod:`deeplab_lit.models.deeplab` plus a class like these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus
from deeplab_lit.modules.base import SegmentationModule


class DeepLabV1(SegmentationModule):
    """DeepLab v1 (Chen et al., ICLR 2015): VGG-16 "LargeFOV", or the dilated-ResNet variant.

    Args:
        backbone: ``"vgg16"`` for LargeFOV (output stride 8, fc6 3x3 dilated by ``largefov_rate``), or a
            ResNet name for the dilated ResNet with a 1x1 classifier.
        output_stride: 8 in the paper.
        largefov_rate: Dilation of fc6 (12 = "LargeFOV", Sec. 4.1).
        style: ``"torchvision"`` or ``"caffe"`` ResNet (the ResNet variant only; Caffe checkpoints need it).
        lr: 1e-3 in the paper (batch 20).
        weight_decay: 5e-4 in the paper.
        **kwargs: Shared options of :class:`SegmentationModule`.
    """

    builder = deeplab_v1

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "vgg16",
        output_stride: int = 8,
        largefov_rate: int = 12,
        style: str = "torchvision",
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_classes=num_classes, backbone=backbone, lr=lr, weight_decay=weight_decay, **kwargs
        )


class DeepLabV2(SegmentationModule):
    """DeepLab v2 (Chen et al., TPAMI 2017): dilated ResNet-101 with summed ASPP and optional MSC.

    Args:
        output_stride: 8 in the paper.
        atrous_rates: ASPP branch rates; ``(6, 12, 18, 24)`` is ASPP-L (Sec. 3.3).
        msc_scales: Multi-scale inputs, e.g. ``[1.0, 0.75, 0.5]``: max-fused, loss on each (Sec. 4.1).
        style: ``"torchvision"`` ResNet or the original ``"caffe"`` one (needed for Caffe checkpoints).
        lr: 2.5e-4 in the paper (batch 10), with frozen BatchNorm.
        weight_decay: 5e-4 in the paper.
        **kwargs: Shared options of :class:`SegmentationModule` (``freeze_bn`` among them).
    """

    builder = deeplab_v2

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet101",
        output_stride: int = 8,
        atrous_rates: Sequence[int] = (6, 12, 18, 24),
        msc_scales: Sequence[float] | None = None,
        style: str = "torchvision",
        lr: float = 2.5e-4,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_classes=num_classes, backbone=backbone, lr=lr, weight_decay=weight_decay, **kwargs
        )


class DeepLabV3(SegmentationModule):
    """DeepLab v3 (Chen et al., 2017): multi-grid ResNet and ASPP with image-level pooling.

    Args:
        output_stride: 16 for training, 8 for the best accuracy (Sec. 4.1).
        atrous_rates: ASPP 3x3 branch rates; ``None`` = (6, 12, 18) at OS 16, doubled at OS 8.
        multi_grid: Unit rates of the last stage's blocks, (1, 2, 4) in the paper (Sec. 3.2); truncated to
            the blocks there are ((1, 2) on ResNet-18); backbones without a ResNet last stage (MobileNet,
            Xception, timm's non-ResNet families) are built without it (an info line says so).
        aux_head: Add torchvision's auxiliary FCN head on layer3 (loss weight ``aux_weight``).
        style: ``"torchvision"`` or ``"caffe"`` ResNet.
        lr: 0.007 in the paper (batch 16).
        weight_decay: 1e-4 in the paper.
        **kwargs: Shared options of :class:`SegmentationModule`.
    """

    builder = deeplab_v3

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet101",
        output_stride: int = 16,
        atrous_rates: Sequence[int] | None = None,
        multi_grid: Sequence[int] | None = (1, 2, 4),
        aux_head: bool = False,
        style: str = "torchvision",
        lr: float = 0.007,
        weight_decay: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_classes=num_classes, backbone=backbone, lr=lr, weight_decay=weight_decay, **kwargs
        )


class DeepLabV3Plus(SegmentationModule):
    """DeepLab v3+ (Chen et al., ECCV 2018): the v3 encoder plus a decoder on stride-4 features.

    Args:
        output_stride: 16 (or 8) for the encoder (Sec. 3.1).
        atrous_rates: ASPP rates; ``None`` = (6, 12, 18) at OS 16, doubled at OS 8.
        multi_grid: Multi-grid unit rates for ResNet backbones, ``None`` for plain dilation.
        separable: Atrous depthwise-separable convolutions in ASPP and decoder (Sec. 3.2).
        aux_head: Auxiliary FCN head on layer3 (ResNets).
        style: ``"torchvision"`` or ``"caffe"`` ResNet.
        channels: ASPP and decoder width, 256 in the paper; narrower for cheap CPU runs (quickstart: 64).
        separable_form: ``"xception"`` (depthwise, pointwise, BN, ReLU; learned faster from scratch) or
            ``"deeplab"`` (depthwise, BN, ReLU, pointwise, BN, ReLU: the reference code's, which separable
            checkpoints from before this option hold and restore in); see
            :func:`~deeplab_lit.models.deeplab_v3plus` for the measurement.
        lr: 0.007 in the paper.
        weight_decay: 1e-4 (4e-5 for Xception in the paper).
        **kwargs: Shared options of :class:`SegmentationModule`.
    """

    builder = deeplab_v3plus

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet101",
        output_stride: int = 16,
        atrous_rates: Sequence[int] | None = None,
        multi_grid: Sequence[int] | None = None,
        separable: bool = False,
        aux_head: bool = False,
        style: str = "torchvision",
        channels: int = 256,
        separable_form: str = "xception",
        lr: float = 0.007,
        weight_decay: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_classes=num_classes, backbone=backbone, lr=lr, weight_decay=weight_decay, **kwargs
        )
