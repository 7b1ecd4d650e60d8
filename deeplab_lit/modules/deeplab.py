"""DeepLab v1, v2, v3 and v3+ as LightningModules: each chooses a builder and the paper's defaults.

Everything else (step, loss, optimiser, schedule, metrics) is inherited from
:class:`~deeplab_lit.modules.base.SegmentationModule`. Arguments not listed here (``lr``,
``weight_decay``, ``freeze_bn``, ``inference``, ...) are the base class's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

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

    def build_model(self) -> nn.Module:
        """VGG-16 LargeFOV or dilated ResNet + 1x1 classifier."""
        hp = self.hparams
        return deeplab_v1(
            num_classes=hp.num_classes,
            backbone=hp.backbone,
            output_stride=hp.output_stride,
            largefov_rate=hp.largefov_rate,
            style=hp.style,
            pretrained_backbone=hp.pretrained_backbone,
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

    def build_model(self) -> nn.Module:
        """Dilated ResNet + ASPP (sum of class scores), wrapped for multi-scale input when asked."""
        hp = self.hparams
        return deeplab_v2(
            num_classes=hp.num_classes,
            backbone=hp.backbone,
            output_stride=hp.output_stride,
            atrous_rates=tuple(hp.atrous_rates),
            msc_scales=tuple(hp.msc_scales) if hp.msc_scales else None,
            style=hp.style,
            pretrained_backbone=hp.pretrained_backbone,
        )


class DeepLabV3(SegmentationModule):
    """DeepLab v3 (Chen et al., 2017): multi-grid ResNet and ASPP with image-level pooling.

    Args:
        output_stride: 16 for training, 8 for the best accuracy (Sec. 4.1).
        atrous_rates: ASPP 3x3 branch rates; ``None`` = (6, 12, 18) at OS 16, doubled at OS 8.
        multi_grid: Unit rates of the last stage's blocks, (1, 2, 4) in the paper (Sec. 3.2); truncated to
            the blocks there are ((1, 2) on ResNet-18). ``None`` for MobileNetV2 and Xception-65.
        aux_head: Add torchvision's auxiliary FCN head on layer3 (loss weight ``aux_weight``).
        style: ``"torchvision"`` or ``"caffe"`` ResNet.
        lr: 0.007 in the paper (batch 16).
        weight_decay: 1e-4 in the paper.
        **kwargs: Shared options of :class:`SegmentationModule`.
    """

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

    def build_model(self) -> nn.Module:
        """Multi-grid dilated backbone + ASPP with image pooling."""
        hp = self.hparams
        return deeplab_v3(
            num_classes=hp.num_classes,
            backbone=hp.backbone,
            output_stride=hp.output_stride,
            atrous_rates=tuple(hp.atrous_rates) if hp.atrous_rates else None,
            multi_grid=tuple(hp.multi_grid) if hp.multi_grid else None,
            aux_head=hp.aux_head,
            style=hp.style,
            pretrained_backbone=hp.pretrained_backbone,
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
        lr: 0.007 in the paper.
        weight_decay: 1e-4 (4e-5 for Xception in the paper).
        **kwargs: Shared options of :class:`SegmentationModule`.
    """

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
        lr: float = 0.007,
        weight_decay: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_classes=num_classes, backbone=backbone, lr=lr, weight_decay=weight_decay, **kwargs
        )

    def build_model(self) -> nn.Module:
        """v3 encoder + 48-channel low-level projection decoder."""
        hp = self.hparams
        return deeplab_v3plus(
            num_classes=hp.num_classes,
            backbone=hp.backbone,
            output_stride=hp.output_stride,
            atrous_rates=tuple(hp.atrous_rates) if hp.atrous_rates else None,
            multi_grid=tuple(hp.multi_grid) if hp.multi_grid else None,
            separable=hp.separable,
            aux_head=hp.aux_head,
            style=hp.style,
            pretrained_backbone=hp.pretrained_backbone,
            channels=hp.channels,
        )
