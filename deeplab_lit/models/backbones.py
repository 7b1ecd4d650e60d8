"""The built-in backbone families, one :class:`BackboneFamily` record each, and :func:`build_backbone`.

The families: dilated ResNets, LargeFOV VGG-16, MobileNetV2/V3 and aligned Xception-65;
:func:`build_backbone` picks one by name, or a timm encoder by ``"timm:<model>"``.

A family's record is all the rest of the code knows of it: its builder, output strides, ResNet stage
layout (multi-grid, recognising foreign checkpoints), where its ImageNet weights come from and how their
keys map, whether the v1/v2 LargeFOV head goes on it, and which of its modules fold BatchNorm. Module
names follow torchvision (timm for Xception), so their ImageNet state dicts load with ``strict=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import cfgs, make_layers

from deeplab_lit.models import timm_backbones
from deeplab_lit.models.backbone_base import Backbone, dilate_for_output_stride, resolve_multi_grid, set_conv

_log = logging.getLogger(__name__)

STYLES: tuple[str, ...] = ("torchvision", "caffe")
#: A (conv attribute, BatchNorm attribute) pair that a module's forward applies one after the other.
ConvBNPairs = tuple[tuple[str, str], ...]


class ResNetBackbone(Backbone):
    """A torchvision ResNet body (``conv1, bn1, relu, maxpool, layer1..layer4``) with atrous convolution.

    ``style="torchvision"`` reproduces ``torchvision.models.resnet*(replace_stride_with_dilation=...)``:
    the stride stays on the 3x3 convolution and the first block of a dilated layer keeps the previous
    layer's dilation. ``style="caffe"`` is the original MSRA/Caffe ResNet that DeepLab v2 was trained with
    (as in kazuto1011/deeplab-pytorch): stride on the first 1x1 convolution of a block, max-pool with
    ``ceil_mode=True``, and every block of a dilated layer at the layer's full rate. BasicBlock ResNets
    (18/34) have no 1x1 convolution, so there the two styles differ only in pooling and dilation rule;
    in torchvision style their first dilated block uses the previous dilation on its (formerly strided)
    first 3x3 and the new one on its second, the rule torchvision applies to Bottleneck's strided conv.

    Multi-grid (DeepLab v3 Sec. 3.2): block ``i`` of ``layer4`` gets 3x3 dilation
    ``base_rate * multi_grid[i]``, where ``base_rate`` is layer4's rate (1, 2, 4 at output stride 32, 16, 8).
    The paper's grid (1, 2, 4) is defined for the three blocks of ResNet-50/101 (and 34); on ResNet-18,
    whose layer4 has two blocks, it is truncated to the blocks there are, (1, 2), so that the paper's
    default works on every ResNet. Any other grid must give exactly one rate per block
    (:func:`resolve_multi_grid`).
    """

    def __init__(
        self,
        name: str,
        *,
        output_stride: int = 16,
        multi_grid: Sequence[int] | None = None,
        style: str = "torchvision",
    ) -> None:
        resnet = getattr(torchvision.models, name)(weights=None)
        expansion = 4 if isinstance(resnet.layer1[0], Bottleneck) else 1
        super().__init__(name, 64 * expansion, 512 * expansion, 256 * expansion, output_stride)
        self.style = style
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
            resnet.layer4,
        )
        multi_grid = self.multi_grid = resolve_multi_grid(name, multi_grid, blocks=len(resnet.layer4))
        if style == "caffe":
            self.maxpool.ceil_mode = True
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
        dilation = 1
        for layer, dilated in zip((self.layer2, self.layer3, self.layer4), dilate):
            previous = dilation
            dilation = dilation * 2 if dilated else dilation
            grid = multi_grid if layer is self.layer4 and multi_grid is not None else None
            self._configure_layer(layer, 1 if dilated else 2, previous, dilation, grid)

    def _configure_layer(
        self,
        layer: Iterable[Bottleneck | BasicBlock],
        stride: int,
        previous: int,
        dilation: int,
        grid: Sequence[int] | None,
    ) -> None:
        """Set strides and dilations of one layer (see the class docstring for the rules)."""
        for index, block in enumerate(layer):
            first = index == 0
            block_stride = stride if first else 1
            # 3x3 rate where torchvision puts the block's stride (it keeps the previous rate), and elsewhere
            strided_rate = previous if first and self.style == "torchvision" else dilation
            rate = dilation
            if grid is not None:
                strided_rate = rate = dilation * int(grid[index])
            if isinstance(block, Bottleneck):
                caffe = self.style == "caffe"
                set_conv(block.conv1, stride=block_stride if caffe else 1)
                set_conv(block.conv2, stride=1 if caffe else block_stride, dilation=strided_rate)
            elif isinstance(block, BasicBlock):
                set_conv(block.conv1, stride=block_stride, dilation=strided_rate)
                set_conv(block.conv2, dilation=rate)
            if block.downsample is not None:
                set_conv(block.downsample[0], stride=block_stride)
            block.stride = block_stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return ``{"low": layer1, "aux": layer3, "out": layer4}`` features of ``x`` (N, 3, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        aux = self.layer3(self.layer2(low))
        return {"low": low, "aux": aux, "out": self.layer4(aux)}


class VGG16LargeFOV(Backbone):
    """The DeepLab-LargeFOV VGG-16 body (DeepLab v1 Sec. 3.1 and 4.1), output stride 8.

    ``features`` keeps torchvision's ``vgg16().features`` indices, so ImageNet ``features.*`` weights
    load unchanged. As in the LargeFOV prototxt: pool1-3 are 3x3 stride-2 max-pools with padding 1,
    pool4 and pool5 are 3x3 stride-1 (no subsampling), the conv5 layers are dilated by 2, and a 3x3
    stride-1 average pool (``pool5a``, index 31) follows pool5. PyTorch rounds pooling sizes down, so the
    stride-2 pools give ``ceil(H / 2)`` (identical to Caffe for odd sizes such as 321 or 513).
    fc6/fc7 are not here: they are the v1 head (:class:`~deeplab_lit.models.heads.LargeFOVHead`).
    """

    _POOL2 = 9  # index of pool2 in torchvision's vgg16().features: "low" is taken after it

    def __init__(self) -> None:
        super().__init__("vgg16", low_channels=128, out_channels=512, aux_channels=None, output_stride=8)
        features = make_layers(cfgs["D"])  # torchvision's vgg16().features, without building its fc layers
        for conv in features:
            if isinstance(conv, nn.Conv2d):  # torchvision VGG's own initialisation
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        for index in (4, 9, 16):
            features[index] = nn.MaxPool2d(3, stride=2, padding=1)
        for index in (23, 30):
            features[index] = nn.MaxPool2d(3, stride=1, padding=1)
        for index in (24, 26, 28):
            set_conv(features[index], dilation=2)
        features.append(nn.AvgPool2d(3, stride=1, padding=1))
        self.features = features

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return ``{"low": pool2, "out": pool5a}`` features of ``x`` (N, 3, H, W)."""
        low = self.features[: self._POOL2 + 1](x)
        return {"low": low, "out": self.features[self._POOL2 + 1 :](low)}


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 ``features[0:18]``, with atrous depthwise convolutions for output stride 8/16.

    The final 1x1 conv to 1280 channels (``features.18``) is dropped, as in the DeepLab v3/v3+ reference
    (TensorFlow) code whose MobileNetV2 feature extractor ends at the 320-channel ``layer_18``.
    Dilation follows that code too: a block whose stride is removed keeps the current rate, and every
    later block uses the rate multiplied by the removed stride. ``"low"`` is the output of ``features.3``
    (24 ch, stride 4; the TensorFlow code takes the 144-channel depthwise output inside that block instead).
    """

    _LOW = 3

    def __init__(self, *, output_stride: int = 16) -> None:
        super().__init__("mobilenet_v2", 24, 320, None, output_stride)
        self.features = torchvision.models.mobilenet_v2(weights=None).features[:18]
        convs = [
            next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
            for block in self.features
        ]
        strides = dilate_for_output_stride(convs, output_stride, removed_stride_rate="previous")
        for block, stride in zip(self.features, strides):
            if hasattr(block, "stride"):
                block.stride = stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return ``{"low": features.3, "out": features.17}`` features of ``x`` (N, 3, H, W)."""
        low = self.features[: self._LOW + 1](x)
        return {"low": low, "out": self.features[self._LOW + 1 :](low)}


class MobileNetV3Backbone(Backbone):
    """torchvision's MobileNetV3-Large ``features`` (stem, 15 inverted residual blocks, 1x1 conv), dilated.

    All 17 layers of ``torchvision.models.mobilenet_v3_large().features`` keep their torchvision names, so
    its ImageNet weights load once the ``classifier.*`` keys are dropped; ``"out"`` is the 960-channel
    ``features.16``, as in torchvision's ``deeplabv3_mobilenet_v3_large``. Dilation follows torchvision's
    ``mobilenet_v3_large(dilated=True)``: a block whose stride is removed already uses the new rate (rate x
    removed stride) in its depthwise convolution, and so do the blocks after it (the MobileNetV2 rule of
    :class:`MobileNetV2Backbone` keeps the old rate in that block). At output stride 16 this is exactly
    torchvision's layout (``features.13-15`` at rate 2); at 8, ``features.7-12`` run at rate 2 and
    ``features.13-15`` at 4. There is no multi-grid: it is defined on ResNet's layer4.

    Features: ``"low"`` is ``features.3`` (24 ch, stride 4, the end of the stride-4 stage); ``"aux"`` is
    ``features.4`` (40 ch, stride 8 at every output stride), the *first* block of the stride-8 stage, which
    torchvision's ``_deeplabv3_mobilenetv3`` takes for its FCN head (its ``stage_indices[-4]``).
    """

    _LOW = 3
    _AUX = 4

    def __init__(self, *, output_stride: int = 16) -> None:
        super().__init__("mobilenet_v3_large", 24, 960, 40, output_stride)
        self.features = torchvision.models.mobilenet_v3_large(weights=None).features
        # the stem's 3x3 conv, or a block's depthwise conv (3x3 or 5x5); the last 1x1 conv has none
        spatial = [[m for m in layer.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
                   for layer in self.features]  # fmt: skip
        convs = [found[0] for found in spatial if found]
        dilate_for_output_stride(convs, output_stride, removed_stride_rate="new")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return ``{"low": features.3, "aux": features.4, "out": features.16}`` of ``x`` (N, 3, H, W)."""
        low = self.features[: self._LOW + 1](x)
        aux = self.features[self._LOW + 1 : self._AUX + 1](low)
        return {"low": low, "aux": aux, "out": self.features[self._AUX + 1 :](aux)}


class XceptionBackbone(Backbone):
    """timm's modified aligned Xception-65 (DeepLab v3+ Sec. 3.2), with timm's output-stride support.

    ``body`` is ``timm.create_model("xception65", output_stride=..., num_classes=0, global_pool="")``; its
    state-dict keys are timm's own, so timm ImageNet weights load unchanged. Features come from timm's
    ``forward_intermediates``: index 1 (256 ch, stride 4, inside the second entry-flow block, the v3+
    decoder's skip) and index 4 (2048 ch, exit flow). timm's ``features_only`` wrapper is not used because
    it renames modules (``blocks.0`` -> ``blocks_0``) so timm checkpoints would no longer load as they are.
    """

    _INDICES = (1, 4)

    def __init__(self, *, output_stride: int = 16) -> None:
        super().__init__("xception65", 256, 2048, None, output_stride)
        import timm  # here, not at the top: `import deeplab_lit.models` stays free of timm and its imports

        self.body = timm.create_model(
            "xception65", output_stride=output_stride, num_classes=0, global_pool=""
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return ``{"low": stride-4 entry-flow features, "out": exit-flow features}`` of ``x``."""
        # timm.create_model is typed as returning an nn.Module, whose __getattr__ torch types Tensor | Module
        low, out = self.body.forward_intermediates(  # type: ignore[operator]
            x, indices=self._INDICES, intermediates_only=True
        )
        return {"low": low, "out": out}


class StageLayout(NamedTuple):
    """A ResNet's blocks per stage (layer1..layer4) and whether they are Bottlenecks (have ``conv3``)."""

    blocks: tuple[int, int, int, int]
    bottleneck: bool


@dataclass(frozen=True)
class ImageNetSource:
    """Where a family's ImageNet classification weights come from and how their keys map onto it.

    Attributes:
        library: ``"torchvision"`` (a weights enum of ``torchvision.models``) or ``"timm"`` (a tag).
        default: What ``pretrained_backbone=True`` means: the enum member or timm tag.
        dropped: Key prefixes of the classifier, not part of the backbone.
        prefix: The backbone's own prefix for the library's keys (a timm model sits under ``body.``).
    """

    library: str
    default: str
    dropped: tuple[str, ...]
    prefix: str = ""


@dataclass(frozen=True)
class BackboneFamily:
    """One built-in backbone family: all that the builders, weights and folding code need to know of it.

    Attributes:
        names: The backbone names it builds.
        build: ``build(name, output_stride, multi_grid, style)`` -> the backbone (options already checked).
        output_strides: The output strides it can be built at.
        imagenet: Its ImageNet weights.
        stages: ResNets: each name's :class:`StageLayout` (multi-grid needs layer4's block count; foreign
            checkpoints are recognised by it). Empty for a family without a ResNet last stage.
        styles: ResNet styles it can be built in.
        largefov_head: DeepLab v1/v2 put the LargeFOV fc6/fc7 head on it (initialised from the ImageNet
            fc layers); v3 and v3+ refuse it.
        fusable: Module types of the family whose forward applies a convolution then its BatchNorm, with
            those pairs (:mod:`~deeplab_lit.models.fusion` folds them).
    """

    names: tuple[str, ...]
    build: Callable[[str, int, Sequence[int] | None, str], Backbone]
    output_strides: tuple[int, ...]
    imagenet: ImageNetSource
    stages: Mapping[str, StageLayout] = field(default_factory=dict)
    styles: tuple[str, ...] = ("torchvision",)
    largefov_head: bool = False
    fusable: Mapping[type[nn.Module], ConvBNPairs] = field(default_factory=dict)


FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(
        names=("resnet18", "resnet34", "resnet50", "resnet101"),
        build=lambda name, stride, grid, style: ResNetBackbone(
            name, output_stride=stride, multi_grid=grid, style=style
        ),
        output_strides=(8, 16, 32),
        imagenet=ImageNetSource("torchvision", "IMAGENET1K_V1", ("fc.",)),
        stages={
            "resnet18": StageLayout((2, 2, 2, 2), False),
            "resnet34": StageLayout((3, 4, 6, 3), False),
            "resnet50": StageLayout((3, 4, 6, 3), True),
            "resnet101": StageLayout((3, 4, 23, 3), True),
        },
        styles=STYLES,
        fusable={
            BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
            Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
            ResNet: (("conv1", "bn1"),),
            ResNetBackbone: (("conv1", "bn1"),),
        },
    ),
    BackboneFamily(
        names=("vgg16",),
        build=lambda name, stride, grid, style: VGG16LargeFOV(),
        output_strides=(8,),
        imagenet=ImageNetSource("torchvision", "IMAGENET1K_V1", ("classifier.",)),
        largefov_head=True,
    ),
    BackboneFamily(
        names=("mobilenet_v2",),
        build=lambda name, stride, grid, style: MobileNetV2Backbone(output_stride=stride),
        output_strides=(8, 16, 32),
        imagenet=ImageNetSource("torchvision", "IMAGENET1K_V1", ("classifier.", "features.18.")),
    ),
    BackboneFamily(
        names=("mobilenet_v3_large",),
        build=lambda name, stride, grid, style: MobileNetV3Backbone(output_stride=stride),
        output_strides=(8, 16, 32),
        # what torchvision's deeplabv3_mobilenet_v3_large starts from
        imagenet=ImageNetSource("torchvision", "IMAGENET1K_V1", ("classifier.",)),
    ),
    BackboneFamily(
        names=("xception65",),
        build=lambda name, stride, grid, style: XceptionBackbone(output_stride=stride),
        output_strides=(8, 16, 32),
        imagenet=ImageNetSource("timm", "ra3_in1k", ("head.",), prefix="body."),
    ),
)
_BY_NAME: dict[str, BackboneFamily] = {name: family for family in FAMILIES for name in family.names}
#: The built-in backbones' names; any ``"timm:<model>"`` name is a backbone too.
BACKBONES: tuple[str, ...] = tuple(_BY_NAME)
#: Each built-in ResNet's stage layout, by name.
RESNET_STAGES: dict[str, StageLayout] = {name: s for family in FAMILIES for name, s in family.stages.items()}


def backbone_family(name: str) -> BackboneFamily | None:
    """The record of built-in backbone ``name``; None for a timm encoder or an unknown name."""
    return _BY_NAME.get(name)


def layer4_blocks(name: str) -> int | None:
    """Blocks in the last stage of built-in ResNet ``name`` (where multi-grid applies); None otherwise."""
    layout = RESNET_STAGES.get(name)
    return None if layout is None else layout.blocks[-1]


def check_backbone_options(
    name: str, output_stride: int, multi_grid: Sequence[int] | None = None, style: str = "torchvision"
) -> None:
    """Raise one clear ValueError for a bad backbone option (see :func:`build_backbone`)."""
    if timm_backbones.is_timm_name(name):
        timm_backbones.check_timm_backbone(name, output_stride, multi_grid, style)
        return
    family = backbone_family(name)
    if family is None:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {BACKBONES}")
    if output_stride not in family.output_strides:
        raise ValueError(
            f"output_stride={output_stride!r} is not supported by {name}; "
            f"expected one of {family.output_strides}"
        )
    if style not in STYLES:
        raise ValueError(f"Unknown ResNet style {style!r}; expected one of {STYLES}")
    if style not in family.styles:
        raise ValueError(f"style={style!r} is a ResNet option; {name} only has style='torchvision'")
    resolve_multi_grid(name, multi_grid, layer4_blocks(name))


def build_backbone(
    name: str,
    *,
    output_stride: int = 16,
    multi_grid: Sequence[int] | None = None,
    style: str = "torchvision",
) -> Backbone:
    """Build a backbone by name, randomly initialised (ImageNet weights: :mod:`deeplab_lit.weights.imagenet`).

    Args:
        name: One of :data:`BACKBONES`, or ``"timm:<model name>"`` for a timm encoder
            (:class:`~deeplab_lit.models.timm_backbones.TimmBackbone`, e.g. ``"timm:convnext_tiny"``).
        output_stride: Input size / ``"out"`` size: 8, 16 or 32 (32 = no dilation); VGG-16 allows only 8.
        multi_grid: ResNets only: per-block rate multipliers of layer4 (DeepLab v3 Sec. 3.2), e.g. (1, 2, 4),
            the paper's, which ResNet-18 (two blocks) takes as (1, 2), and a backbone without a ResNet last
            stage as None (:func:`~.backbone_base.resolve_multi_grid`). timm's ResNets take it too.
        style: ResNets only: ``"torchvision"`` or ``"caffe"`` (see :class:`ResNetBackbone`).

    Returns:
        The backbone; ``forward(x)`` returns ``{"low", "out"}`` (plus ``"aux"`` where it has one).

    Raises:
        ValueError: unknown name, unsupported output stride, style or multi-grid.
    """
    check_backbone_options(name, output_stride, multi_grid, style)
    backbone: Backbone
    if timm_backbones.is_timm_name(name):
        backbone = timm_backbones.TimmBackbone(name, output_stride=output_stride, multi_grid=multi_grid)
    else:
        family = backbone_family(name)
        assert family is not None  # checked above
        backbone = family.build(name, output_stride, multi_grid, style)
    built = backbone.multi_grid
    if multi_grid is not None and built != tuple(multi_grid):  # the paper's grid, adapted: say so
        _log.info(
            "multi_grid=%s (DeepLab v3 Sec. 3.2) sets the rates of a ResNet last stage's blocks and %s: "
            "built %s",
            tuple(multi_grid),
            f"{name} has no such stage" if built is None else f"{name}'s has {len(built)} blocks",
            "without multi-grid" if built is None else f"with {built}",
        )
    return backbone
