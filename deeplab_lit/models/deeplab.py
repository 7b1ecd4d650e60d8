"""One segmentation model for every DeepLab version, multi-scale input fusion, and per-version builders.

A version is a builder choosing backbone, head and decoder; all share :class:`Segmenter`'s forward:
backbone -> head on ``"out"`` -> [decoder with ``"low"``] -> bilinear upsampling to the input size.
Any input size works: every upsampling targets the actual size of the tensor it is matched to.
:data:`BUILDERS` names each version's builder; :func:`builder_kwargs` turns stored options (hyper-parameters,
a checkpoint's options) into a builder's keyword arguments.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deeplab_lit.models.backbone_base import Backbone
from deeplab_lit.models.backbones import BACKBONES, backbone_family, build_backbone
from deeplab_lit.models.heads import (
    ASPP,
    ASPPSum,
    ConvClassifier,
    DeepLabV3Head,
    DeepLabV3PlusDecoder,
    FCNHead,
    LargeFOVHead,
    check_separable_form,
)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    """Backbone + head (+ v3+ decoder) (+ auxiliary head): the one forward of every DeepLab version.

    Args:
        backbone: Returns ``{"low", "out"[, "aux"]}`` feature maps (see :mod:`.backbones`).
        head: Maps ``"out"`` features to logits, or, with a decoder, to the decoder's input (v3+ ASPP).
        decoder: Optional ``decoder(head_output, low) -> logits`` (the v3+ decoder).
        aux_classifier: Optional head on the backbone's ``"aux"`` features, used by :meth:`forward_train`.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        decoder: nn.Module | None = None,
        aux_classifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if aux_classifier is not None and getattr(backbone, "aux_channels", None) is None:
            name = getattr(backbone, "name", type(backbone).__name__)
            raise ValueError(f"aux_classifier needs a backbone with an 'aux' output; {name} has none")
        self.backbone = backbone
        self.head = head
        self.decoder = decoder
        self.aux_classifier = aux_classifier

    def _logits(self, x: Tensor, with_aux: bool) -> tuple[Tensor, Tensor | None]:
        features = self.backbone(x)
        logits = self.head(features["out"])
        if self.decoder is not None:
            logits = self.decoder(logits, features["low"])
        aux = self.aux_classifier(features["aux"]) if with_aux and self.aux_classifier is not None else None
        return logits, aux

    def forward_logits(self, x: Tensor) -> Tensor:
        """Logits at feature resolution, before the final upsampling: ``(N, 3, H, W) -> (N, C, h, w)``."""
        return self._logits(x, with_aux=False)[0]

    def forward(self, x: Tensor) -> Tensor:
        """Logits at the input's size: ``(N, 3, H, W) -> (N, C, H, W)``, bilinear, ``align_corners=False``."""
        return _resize(self.forward_logits(x), x.shape[-2:])

    def forward_train(self, x: Tensor) -> dict[str, Tensor]:
        """``{"out": logits, "aux": auxiliary logits (if an aux classifier)}``, each ``(N, C, H, W)``."""
        logits, aux = self._logits(x, with_aux=True)
        outputs = {"out": _resize(logits, x.shape[-2:])}
        if aux is not None:
            outputs["aux"] = _resize(aux, x.shape[-2:])
        return outputs


def check_msc_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """Return ``scales`` as floats, or raise ValueError unless they are distinct, positive and include 1.0."""
    scales = tuple(float(s) for s in scales)
    if 1.0 not in scales or any(s <= 0 for s in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"MSC scales must be distinct positive numbers including 1.0, got {scales}")
    return scales


class MultiScaleSegmenter(nn.Module):
    """Multi-scale inputs with max fusion, DeepLab v2 "MSC" (v2 Sec. 4.1; kazuto1011's ``MSC``).

    The input is resized by each scale (bilinear, ``align_corners=False``, ``scale_factor`` as in
    kazuto1011/deeplab-pytorch), each scale's feature-resolution logits are resized to the scale-1.0
    logits' size, and the fused logits are their element-wise maximum.

    Args:
        segmenter: The single-scale model.
        scales: Input scales; must contain 1.0, e.g. (1.0, 0.75, 0.5).
    """

    def __init__(self, segmenter: Segmenter, scales: Sequence[float] = (1.0, 0.75, 0.5)) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.scales = check_msc_scales(scales)

    @property
    def backbone(self) -> Backbone:
        """The wrapped segmenter's backbone (for per-parameter-group learning rates)."""
        return self.segmenter.backbone

    def _scaled(self, x: Tensor, scale: float) -> Tensor:
        if scale == 1.0:
            return x
        height, width = x.shape[-2:]
        if int(height * scale) < 1 or int(width * scale) < 1:
            raise ValueError(f"Input of size {height}x{width} is too small for MSC scale {scale}")
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)

    def _all_logits(self, x: Tensor, with_aux: bool) -> tuple[dict[float, Tensor], Tensor, Tensor | None]:
        per_scale, aux = {}, None
        for scale in self.scales:
            logits, scale_aux = self.segmenter._logits(self._scaled(x, scale), with_aux and scale == 1.0)
            per_scale[scale] = logits
            aux = scale_aux if scale == 1.0 else aux
        size = per_scale[1.0].shape[-2:]
        fused = torch.stack([_resize(logits, size) for logits in per_scale.values()]).amax(dim=0)
        return per_scale, fused, aux

    def forward_logits(self, x: Tensor) -> Tensor:
        """Max-fused logits at the scale-1.0 feature resolution ``(N, C, h, w)``."""
        return self._all_logits(x, with_aux=False)[1]

    def forward(self, x: Tensor) -> Tensor:
        """Max-fused logits at the input's size ``(N, C, H, W)``."""
        return _resize(self.forward_logits(x), x.shape[-2:])

    def forward_train(self, x: Tensor) -> dict[str, Tensor]:
        """``{"out": fused, "scale_1.0": ..., "scale_0.75": ..., ...[, "aux"]}``, all ``(N, C, H, W)``.

        The loss goes on each entry (v2 Sec. 4.1). ``"aux"`` (scale 1.0) appears only with an aux head.
        """
        per_scale, fused, aux = self._all_logits(x, with_aux=True)
        size = x.shape[-2:]
        outputs = {"out": _resize(fused, size)}
        outputs.update({f"scale_{scale}": _resize(logits, size) for scale, logits in per_scale.items()})
        if aux is not None:
            outputs["aux"] = _resize(aux, size)
        return outputs


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def _check_rates(rates: Sequence[int], what: str) -> tuple[int, ...]:
    rates = tuple(rates)
    if not rates or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
        raise ValueError(f"{what} must be a non-empty sequence of positive integers, got {rates}")
    return rates


def _v3_rates(rates: tuple[int, ...] | None, output_stride: int) -> tuple[int, ...]:
    """Return the rates given, else (6, 12, 18) at output stride 16, scaled by 16 / stride (v3 Sec. 3.3)."""
    return rates or {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]


def _aux_head(body: Backbone, num_classes: int, aux_head: bool) -> FCNHead | None:
    if not aux_head:
        return None
    if body.aux_channels is None:
        raise ValueError(
            f"aux_head=True needs a backbone with an 'aux' output for the FCN head (ResNets: layer3; "
            f"mobilenet_v3_large: features.4; timm encoders: the level before the last); {body.name} has none"
        )
    return FCNHead(body.aux_channels, num_classes)


def _largefov(backbone: str) -> bool:
    """Whether DeepLab v1/v2 put the LargeFOV fc6/fc7 head on ``backbone`` (VGG-16, v1 Sec. 3.1)."""
    family = backbone_family(backbone)
    return family is not None and family.largefov_head


def _not_largefov(backbone: str, version: str) -> None:
    if _largefov(backbone):
        raise ValueError(
            f"{backbone} is the DeepLab v1/v2 backbone; {version} takes one of "
            f"{tuple(name for name in BACKBONES if not _largefov(name))} or a timm encoder, "
            "'timm:<model name>'"
        )


def deeplab_v1(
    *,
    num_classes: int,
    backbone: str = "vgg16",
    output_stride: int = 8,
    largefov_rate: int = 12,
    style: str = "torchvision",
) -> Segmenter:
    """DeepLab v1: VGG-16 LargeFOV (v1 Sec. 4.1), or "DeepLab-v1 ResNet" (dilated ResNet + 1x1 classifier).

    Args:
        num_classes: Number of classes (21 for PASCAL VOC).
        backbone: ``"vgg16"`` (LargeFOV head: fc6 rate ``largefov_rate``, fc7, fc8) or another backbone
            (followed by one 1x1 classifier).
        output_stride: 8 (the paper; VGG-16 allows only 8).
        largefov_rate: fc6 dilation of the VGG-16 head (12 = LargeFOV); unused for other backbones.
        style: ResNet style, ``"caffe"`` for kazuto1011's DeepLab-v1 ResNet-101 checkpoints.
    """
    _check_num_classes(num_classes)
    _check_rates([largefov_rate], "largefov_rate")
    body = build_backbone(backbone, output_stride=output_stride, style=style)
    if _largefov(backbone):
        model = Segmenter(body, LargeFOVHead(body.out_channels, num_classes, rate=largefov_rate))
    else:
        model = Segmenter(body, ConvClassifier(body.out_channels, num_classes))
    return model


def deeplab_v2(
    *,
    num_classes: int,
    backbone: str = "resnet101",
    output_stride: int = 8,
    atrous_rates: Sequence[int] = (6, 12, 18, 24),
    msc_scales: Sequence[float] | None = None,
    style: str = "torchvision",
) -> Segmenter | MultiScaleSegmenter:
    """DeepLab v2: dilated backbone + ASPP with summed class scores (v2 Sec. 3.3), optional MSC inputs.

    With ``backbone="vgg16"`` each ASPP branch is a fc6/fc7/fc8 stack with 1024 channels (DeepLab-ASPP
    VGG-16, v2 Fig. 4b); otherwise each branch is a single 3x3 atrous conv (the ResNet-101 model).

    Args:
        num_classes: Number of classes.
        backbone: Backbone name; ResNet-101 in the paper.
        output_stride: 8 in the paper.
        atrous_rates: ASPP rates, (6, 12, 18, 24) = ASPP-L.
        msc_scales: If given, e.g. (1.0, 0.75, 0.5), wrap in :class:`MultiScaleSegmenter`.
        style: ResNet style; ``"caffe"`` matches kazuto1011/deeplab-pytorch's checkpoints.
    """
    _check_num_classes(num_classes)
    rates = _check_rates(atrous_rates, "atrous_rates")
    body = build_backbone(backbone, output_stride=output_stride, style=style)
    branch_channels = 1024 if _largefov(backbone) else None
    model: Segmenter | MultiScaleSegmenter
    model = Segmenter(body, ASPPSum(body.out_channels, num_classes, rates, branch_channels=branch_channels))
    if msc_scales is not None:
        model = MultiScaleSegmenter(model, msc_scales)
    return model


def deeplab_v3(
    *,
    num_classes: int,
    backbone: str = "resnet101",
    output_stride: int = 16,
    atrous_rates: Sequence[int] | None = None,
    multi_grid: Sequence[int] | None = (1, 2, 4),
    aux_head: bool = False,
    style: str = "torchvision",
) -> Segmenter:
    """DeepLab v3: dilated backbone with multi-grid, ASPP with image pooling (v3 Sec. 3.2-3.3).

    Args:
        num_classes: Number of classes.
        backbone: Any backbone but vgg16, e.g. a timm encoder ``"timm:convnext_tiny"``.
        output_stride: 16 (train) or 8 (the paper's best evaluation setting).
        atrous_rates: ASPP rates; None = (6, 12, 18) at output stride 16, (12, 24, 36) at 8.
        multi_grid: ResNet layer4 multi-grid (1, 2, 4) of the paper, truncated to the blocks there are
            ((1, 2) on ResNet-18, whose layer4 has two blocks; any other grid gives one rate per block);
            None for no multi-grid (torchvision's layout, needed to match torchvision's deeplabv3
            weights). Backbones without a ResNet last stage (MobileNet, Xception, most timm families) are
            built without multi-grid under the paper's grid, said in an info line; any other grid raises.
        aux_head: Add torchvision's auxiliary FCN head on layer3 (backbones with an ``"aux"`` output).
        style: ResNet style.
    """
    _check_num_classes(num_classes)
    _not_largefov(backbone, "deeplab_v3")
    rates = None if atrous_rates is None else _check_rates(atrous_rates, "atrous_rates")
    body = build_backbone(backbone, output_stride=output_stride, multi_grid=multi_grid, style=style)
    head = DeepLabV3Head(body.out_channels, num_classes, _v3_rates(rates, output_stride))
    model = Segmenter(body, head, aux_classifier=_aux_head(body, num_classes, aux_head))
    return model


def deeplab_v3plus(
    *,
    num_classes: int,
    backbone: str = "resnet101",
    output_stride: int = 16,
    atrous_rates: Sequence[int] | None = None,
    multi_grid: Sequence[int] | None = None,
    separable: bool = False,
    aux_head: bool = False,
    style: str = "torchvision",
    channels: int = 256,
    separable_form: str = "xception",
) -> Segmenter:
    """DeepLab v3+: the v3 encoder (ASPP, 256 ch, dropout 0.1) + the v3+ decoder (v3+ Sec. 3.1-3.2).

    Args:
        num_classes: Number of classes.
        backbone: Any backbone but vgg16 (xception65 in the paper), e.g. ``"timm:convnext_tiny"``.
        output_stride: 16 or 8.
        atrous_rates: ASPP rates; None = (6, 12, 18) at output stride 16, (12, 24, 36) at 8.
        multi_grid: ResNets only, e.g. (1, 2, 4) (ResNet-18: truncated to (1, 2), see ``deeplab_v3``);
            None = no multi-grid.
        separable: Atrous depthwise-separable convolutions in the ASPP branches and the decoder.
        aux_head: Add an auxiliary FCN head on layer3 (backbones with an ``"aux"`` output).
        style: ResNet style.
        channels: Width of the ASPP and of the decoder's 3x3 convolutions (256 in the paper). At the
            stride-4 resolution the decoder dominates the cost of a small backbone; a narrower one (e.g.
            64) makes a cheap model for CPU experiments.
        separable_form: With ``separable``, the form of each separable convolution
            (:func:`~deeplab_lit.models.heads.conv_bn_relu`): ``"xception"``, depthwise, pointwise, BN,
            ReLU (Xception's and segmentation_models_pytorch's), or ``"deeplab"``, depthwise, BN, ReLU,
            pointwise, BN, ReLU (the DeepLab v3+ reference code's, for weights converted from it; separable
            checkpoints written before this option hold it and restore in it by themselves). Checked even
            when ``separable`` is false. ``"xception"`` is the default because it learned faster from
            random initialisation and as well later (BENCHMARKS.md, "Atrous separable convolution: which
            form learns", has the figures and what was ruled out as the cause).
    """
    _check_num_classes(num_classes)
    _not_largefov(backbone, "deeplab_v3plus")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int (256 in the paper), got {channels!r}")
    check_separable_form(separable_form)
    rates = None if atrous_rates is None else _check_rates(atrous_rates, "atrous_rates")
    body = build_backbone(backbone, output_stride=output_stride, multi_grid=multi_grid, style=style)
    rates = _v3_rates(rates, output_stride)
    head = ASPP(body.out_channels, channels, rates, separable, dropout=0.1, separable_form=separable_form)
    decoder = DeepLabV3PlusDecoder(
        channels, body.low_channels, num_classes, channels=channels, separable=separable,
        separable_form=separable_form,
    )  # fmt: skip
    model = Segmenter(body, head, decoder, aux_classifier=_aux_head(body, num_classes, aux_head))
    return model


#: Each DeepLab version's builder, by the name checkpoints record (``"v1"``, ``"v2"``, ``"v3"``, ``"v3+"``).
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "v1": deeplab_v1,
    "v2": deeplab_v2,
    "v3": deeplab_v3,
    "v3+": deeplab_v3plus,
}


def builder_kwargs(builder: Callable[..., nn.Module], options: Mapping[str, Any]) -> dict[str, Any]:
    """Return the ``options`` that ``builder``'s signature accepts, in the form the builder takes them.

    Options kept elsewhere (hyper-parameters, YAML, a checkpoint's options) hold sequences as lists; the
    builders take tuples. An empty sequence given for an option the builder also accepts as None
    (``msc_scales``, ``multi_grid``, v3's ``atrous_rates``) means None, as it did in the per-version
    ``build_model`` methods this replaces: configs and checkpoints saying ``msc_scales: []`` keep building
    the same network. Options the builder does not take (``lr``, ...) are left out.
    """
    hints = typing.get_type_hints(builder)
    kwargs = {}
    for name in inspect.signature(builder).parameters:
        if name not in options:
            continue
        value = options[name]
        if isinstance(value, list | tuple):
            takes_none = type(None) in typing.get_args(hints.get(name))
            value = None if not value and takes_none else tuple(value)
        kwargs[name] = value
    return kwargs
