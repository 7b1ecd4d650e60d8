"""Segmentation heads of DeepLab v1, v2, v3 and v3+, small modules in torchvision's style.

- :class:`ConvClassifier`: the 1x1 classifier of the v1 ResNet variant.
- :class:`LargeFOVHead`: v1's fc6 (3x3, rate 12, 1024 ch) / fc7 / fc8 (DeepLab v1 Sec. 4.1).
- :class:`ASPPSum`: v2's atrous spatial pyramid pooling, class scores summed (DeepLab v2 Sec. 3.3).
- :class:`ASPP`, :class:`DeepLabV3Head`: v3's ASPP with image pooling (DeepLab v3 Sec. 3.3), laid out
  exactly like torchvision's ``ASPP`` / ``DeepLabHead`` so torchvision state dicts load by a prefix map.
- :class:`DeepLabV3PlusDecoder`: the v3+ decoder (DeepLab v3+ Sec. 3.1).
- :class:`FCNHead`: torchvision's auxiliary head, on ResNet ``layer3``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.fcn import FCNHead as _TorchvisionFCNHead


def _init_classifier(conv: nn.Conv2d) -> nn.Conv2d:
    """Gaussian (std 0.01) weights and zero bias, the init of the DeepLab v1/v2 prototxts' classifiers."""
    nn.init.normal_(conv.weight, std=0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class AtrousDepthwiseConv2d(nn.Conv2d):
    """Depthwise dilated 3x3 convolution that runs channels-first on the CPU.

    oneDNN's channels-last kernel for depthwise convolutions falls off a cliff above rate 4 on the CPU,
    several times slower than channels-first from rate 5 (BENCHMARKS.md, "Models (benchmarks/speed.py)").
    So on the CPU, for rates of 5 and more, the input is made channels-first for this one convolution (the
    following 1x1 convolution returns to the network's format). Same parameters and state-dict keys as
    ``nn.Conv2d``; identical results.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Convolve, channels-first on the CPU when the dilation is large."""
        if x.device.type == "cpu" and max(self.dilation) >= 5:
            # clone, not contiguous(): a (C, 1, 3, 3) channels-last weight already counts as contiguous,
            # and oneDNN would follow its strides back to the channels-last kernel
            weight = self.weight.clone(memory_format=torch.contiguous_format)
            # Conv2d's own call for padding_mode="zeros", the only mode these layers are built with
            x = x.contiguous()
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return super().forward(x)


#: The two forms of the atrous separable convolution (:func:`conv_bn_relu`, ``separable_form``).
SEPARABLE_FORMS: tuple[str, ...] = ("deeplab", "xception")


def check_separable_form(separable_form: str) -> str:
    """Return ``separable_form``, or raise ValueError unless it is one of :data:`SEPARABLE_FORMS`."""
    if separable_form not in SEPARABLE_FORMS:
        raise ValueError(
            f"separable_form must be 'deeplab' (depthwise-BN-ReLU-pointwise-BN-ReLU, the DeepLab v3+ "
            f"reference code's) or 'xception' (depthwise-pointwise-BN-ReLU, Xception's and smp's), "
            f"got {separable_form!r}"
        )
    return separable_form


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    *,
    dilation: int = 1,
    separable: bool = False,
    separable_form: str = "xception",
) -> nn.Sequential:
    """3x3 convolution (no bias) + BatchNorm + ReLU, optionally atrous depthwise-separable.

    ``separable=True`` is the v3+ atrous separable convolution (DeepLab v3+ Sec. 3.2): a depthwise 3x3
    (``groups = in_channels``, dilated) followed by a pointwise 1x1, in one of two forms
    (:data:`SEPARABLE_FORMS`):

    - ``"xception"``: depthwise, pointwise, BN, ReLU (``0``, ``1``, ``2``, ``3``): Xception's separable
      convolution (Chollet, CVPR 2017), segmentation_models_pytorch's DeepLabV3+.
    - ``"deeplab"``: depthwise, BN, ReLU, pointwise, BN, ReLU (``0`` .. ``5``): the DeepLab v3+ reference
      code's ``split_separable_conv2d``; the layout of every separable checkpoint written before
      ``separable_form`` existed. See :func:`deeplab_lit.models.deeplab_v3plus` for which learns better.

    The forms' state-dict keys differ (:func:`separable_options`): index ``1`` is a BatchNorm in the
    ``"deeplab"`` form and the pointwise convolution in the ``"xception"`` one.
    """
    if not separable:
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
    depthwise = AtrousDepthwiseConv2d(
        in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels, bias=False
    )
    pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    if check_separable_form(separable_form) == "xception":
        return nn.Sequential(depthwise, pointwise, nn.BatchNorm2d(out_channels), nn.ReLU())
    return nn.Sequential(
        depthwise, nn.BatchNorm2d(in_channels), nn.ReLU(), pointwise, nn.BatchNorm2d(out_channels), nn.ReLU()
    )


def separable_options(keys: Iterable[str], prefix: str = "decoder.fuse.0.") -> dict[str, Any] | None:
    """Read from state-dict keys whether a v3+ model's convolutions are separable, and in which form.

    Looks at the decoder's first 3x3 convolution (``prefix``, a :func:`conv_bn_relu` block): a BatchNorm
    at index ``1`` (``1.running_mean``) is the ``"deeplab"`` form; a convolution there (``1.weight`` and no
    ``1.running_mean``) with index ``2`` a BatchNorm is the ``"xception"`` form; a BatchNorm at index ``1``
    and nothing at ``3`` is a plain 3x3 convolution.

    Returns:
        The builder options the keys imply: ``{"separable": False}`` (plain) or ``{"separable": True,
        "separable_form": form}``; None when ``keys`` hold no such block.
    """
    names = set(keys)
    if f"{prefix}1.running_mean" in names:
        if f"{prefix}3.weight" in names:
            return {"separable": True, "separable_form": "deeplab"}
        return {"separable": False}
    if f"{prefix}1.weight" in names and f"{prefix}2.running_mean" in names:
        return {"separable": True, "separable_form": "xception"}
    return None


class ConvClassifier(nn.Conv2d):
    """1x1 convolution to class scores, Gaussian-initialised (std 0.01) as in the DeepLab prototxts.

    The head of the "DeepLab-v1 ResNet" (a dilated ResNet followed by one 1x1 classifier; kazuto1011's
    ``fc``). Shapes: ``(N, in_channels, h, w) -> (N, num_classes, h, w)``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, 1)
        _init_classifier(self)


class LargeFOVHead(nn.Sequential):
    """DeepLab-LargeFOV head (v1 Sec. 4.1): fc6 3x3 atrous conv (rate 12, 1024 ch), fc7 1x1, fc8 classifier.

    Shapes: ``(N, in_channels, h, w) -> (N, num_classes, h, w)``.
    """

    fc6: nn.Conv2d
    fc7: nn.Conv2d
    fc8: nn.Conv2d

    def __init__(
        self, in_channels: int, num_classes: int, rate: int = 12, channels: int = 1024, dropout: float = 0.5
    ) -> None:
        super().__init__(
            OrderedDict(
                fc6=nn.Conv2d(in_channels, channels, 3, padding=rate, dilation=rate),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(dropout),
                fc7=nn.Conv2d(channels, channels, 1),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(dropout),
                fc8=_init_classifier(nn.Conv2d(channels, num_classes, 1)),
            )
        )


class ASPPSum(nn.Module):
    """DeepLab v2 ASPP (v2 Sec. 3.3): parallel atrous branches straight to class scores, summed.

    With ``branch_channels=None`` (the ResNet-101 model) each branch is one 3x3 conv with bias at one rate;
    ``convs.{i}`` corresponds to kazuto1011/deeplab-pytorch's ``aspp.c{i}``. With an int (the VGG-16
    DeepLab-ASPP, v2 Fig. 4b) each branch is a :class:`LargeFOVHead` (fc6 at that rate, fc7, fc8) with
    this many channels.

    Shapes: ``(N, in_channels, h, w) -> (N, num_classes, h, w)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18, 24),
        branch_channels: int | None = None,
    ) -> None:
        super().__init__()
        if branch_channels is None:
            branches: list[nn.Module] = [
                _init_classifier(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r)) for r in rates
            ]
        else:
            branches = [LargeFOVHead(in_channels, num_classes, r, branch_channels) for r in rates]
        self.convs = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        """Sum of the branches' class scores."""
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class _PoolingBatchNorm(nn.BatchNorm2d):
    """BatchNorm of the image-pooling branch, usable with batch size 1 in training.

    The pooled map is 1x1, so a training batch of one image gives one value per channel and batch
    statistics are undefined (PyTorch raises). In that case only, this layer normalises with its running
    statistics, as in evaluation, and leaves them unchanged; its affine parameters still train. With two
    or more values per channel it is a plain BatchNorm2d. The state-dict keys are BatchNorm2d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x``; eval-style when training on a single value per channel."""
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


class ASPPPooling(nn.Sequential):
    """Image-level features (v3 Sec. 3.3): global average pool, 1x1 conv, BN, ReLU, upsampled back."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            _PoolingBatchNorm(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, h, w) -> (N, out_channels, h, w)``."""
        size = x.shape[-2:]
        pooled = super().forward(x)  # type: ignore[no-untyped-call]  # torch leaves Sequential.forward unannotated
        return F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLab v3 ASPP (v3 Sec. 3.3): 1x1 branch, atrous 3x3 branches, image pooling; concat, 1x1 projection.

    Module layout equals ``torchvision.models.segmentation.deeplabv3.ASPP`` (``convs.0`` 1x1,
    ``convs.1..k`` atrous, ``convs.{k+1}`` pooling, ``project``), so torchvision weights load as they are
    when ``separable=False``. ``separable=True`` makes the atrous branches depthwise-separable (v3+ Sec. 3.2),
    in the form ``separable_form`` (see :func:`conv_bn_relu`).
    ``dropout`` follows the projection: 0.5 in torchvision, 0.1 in the v3+ reference code.

    Shapes: ``(N, in_channels, h, w) -> (N, out_channels, h, w)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        separable: bool = False,
        dropout: float = 0.5,
        separable_form: str = "xception",
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
            )
        ]
        branches += [
            conv_bn_relu(
                in_channels, out_channels, dilation=r, separable=separable, separable_form=separable_form
            )
            for r in rates
        ]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the branches and project."""
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabV3Head(nn.Sequential):
    """DeepLab v3 head: ASPP, 3x3 conv (256) + BN + ReLU, 1x1 classifier (torchvision's ``DeepLabHead``).

    Plain convolutions and dropout 0.5 after the ASPP projection, as torchvision's (whose weights load into
    it); separable convolutions and dropout 0.1 belong to v3+, whose builder uses :class:`ASPP` directly.

    Shapes: ``(N, in_channels, h, w) -> (N, num_classes, h, w)``.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__(
            ASPP(in_channels, 256, rates),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLab v3+ decoder (v3+ Sec. 3.1, Fig. 2).

    The stride-4 features are reduced to ``low_proj_channels`` (48) by 1x1 conv + BN + ReLU, the encoder
    (ASPP) output is bilinearly upsampled to their size, both are concatenated and refined by two 3x3 convs
    (``channels``, BN, ReLU; atrous-separable in the form ``separable_form`` if ``separable``, see
    :func:`conv_bn_relu`), and a 1x1 conv gives the class scores.

    Shapes: ``forward((N, in_channels, h, w), (N, low_channels, h4, w4)) -> (N, num_classes, h4, w4)``.
    """

    def __init__(
        self,
        in_channels: int,
        low_channels: int,
        num_classes: int,
        low_proj_channels: int = 48,
        channels: int = 256,
        separable: bool = False,
        separable_form: str = "xception",
    ) -> None:
        super().__init__()
        self.project_low = nn.Sequential(
            nn.Conv2d(low_channels, low_proj_channels, 1, bias=False),
            nn.BatchNorm2d(low_proj_channels),
            nn.ReLU(),
        )
        self.fuse = nn.Sequential(
            conv_bn_relu(
                in_channels + low_proj_channels, channels, separable=separable, separable_form=separable_form
            ),
            conv_bn_relu(channels, channels, separable=separable, separable_form=separable_form),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Tensor, low: Tensor) -> Tensor:
        """Decode ASPP ``features`` with the stride-4 ``low`` features into stride-4 logits."""
        features = F.interpolate(features, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([features, self.project_low(low)], dim=1)))


class FCNHead(_TorchvisionFCNHead):
    """torchvision's auxiliary FCN head: 3x3 conv to ``in_channels // 4`` + BN + ReLU + dropout 0.1 + 1x1.

    Shapes: ``(N, in_channels, h, w) -> (N, num_classes, h, w)``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
