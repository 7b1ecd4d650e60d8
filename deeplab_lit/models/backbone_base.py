"""The base class every backbone derives from, and the atrous (dilation) helpers they share.

Every backbone maps a normalised image ``(N, 3, H, W)`` to a dict of feature maps:

- ``"low"``: stride-4 features (``ceil(H / 4)``), the skip input of the DeepLab v3+ decoder;
- ``"out"``: the last features, at the backbone's ``output_stride`` (``ceil(H / output_stride)``);
- ``"aux"`` (where there is one): the input of torchvision's auxiliary FCN head (stride 8).

The output stride is set by replacing strides with atrous (dilated) convolution (DeepLab v1 Sec. 3.1,
v3 Sec. 3.1); multi-grid (v3 Sec. 3.2) sets the rates of a ResNet last stage's blocks. A file of its own
so that the built-in families (:mod:`.backbones`) and timm's (:mod:`.timm_backbones`) both derive from it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

#: DeepLab v3's multi-grid unit rates (Sec. 3.2, 4.1: "Multi_Grid = (1, 2, 4)").
PAPER_MULTI_GRID: tuple[int, ...] = (1, 2, 4)


class Backbone(nn.Module):
    """Base class of all backbones: ``forward(x) -> {"low": ..., "out": ...[, "aux": ...]}``.

    Attributes:
        name: Backbone name (:data:`~deeplab_lit.models.backbones.BACKBONES` or ``"timm:<model>"``).
        low_channels: Channels of ``"low"`` (stride-4 features).
        out_channels: Channels of ``"out"``.
        aux_channels: Channels of ``"aux"``, or None if the backbone has no auxiliary output.
        output_stride: Ratio of input size to ``"out"`` size (8, 16 or 32).
        multi_grid: The multi-grid unit rates of the last stage's blocks as built (DeepLab v3 Sec. 3.2), or
            None (plain dilation; every backbone without a ResNet last stage).
    """

    def __init__(
        self, name: str, low_channels: int, out_channels: int, aux_channels: int | None, output_stride: int
    ) -> None:
        super().__init__()
        self.name = name
        self.low_channels = low_channels
        self.out_channels = out_channels
        self.aux_channels = aux_channels
        self.multi_grid: tuple[int, ...] | None = None
        self.output_stride = output_stride


def set_conv(conv: nn.Conv2d, *, stride: int | None = None, dilation: int | None = None) -> None:
    """Change a convolution's stride and/or dilation in place, keeping 'same' padding for 3x3 kernels."""
    if stride is not None:
        conv.stride = (stride, stride)
    if dilation is not None:
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation * (conv.kernel_size[0] - 1) // 2,) * 2


def dilate_for_output_stride(
    convs: Sequence[nn.Conv2d], output_stride: int, removed_stride_rate: str
) -> list[int]:
    """Replace the strides that would take features past ``output_stride`` by dilation (v3 Sec. 3.1).

    ``convs`` are the spatial convolutions of a network in order. A strided one beyond ``output_stride``
    gets stride 1, and every later one the rate multiplied by the stride removed. The convolution whose
    stride is removed runs at the ``"previous"`` rate (the TensorFlow DeepLab code's MobileNetV2 rule) or
    already at the ``"new"`` one (torchvision's ``mobilenet_v3_large(dilated=True)``).

    Returns:
        The stride each convolution was left with.
    """
    current_stride, rate, strides = 1, 1, []
    for conv in convs:
        stride, previous = conv.stride[0], rate
        if stride > 1 and current_stride * stride > output_stride:
            rate *= stride
            stride = 1
        else:
            current_stride *= stride
        set_conv(conv, stride=stride, dilation=previous if removed_stride_rate == "previous" else rate)
        strides.append(stride)
    return strides


def resolve_multi_grid(
    name: str, multi_grid: Sequence[int] | None, blocks: int | None, family: str | None = None
) -> tuple[int, ...] | None:
    """Return the layer4 multi-grid that backbone ``name`` is built with (DeepLab v3 Sec. 3.2).

    The paper's (1, 2, 4) is the paper's grid adapted to the backbone: truncated to the blocks a ResNet's
    last stage has ((1, 2) on ResNet-18), and None (plain dilation) on a backbone with no ResNet last
    stage (MobileNet, Xception, timm's non-ResNet families), so that DeepLab v3's default builds on every
    backbone. Any other grid must give one rate per block of a ResNet last stage.

    Args:
        name: The backbone's name.
        multi_grid: The grid asked for, or None.
        blocks: Blocks of the backbone's ResNet last stage (layer4), or None where it has none.
        family: timm's family of ``name``, named in the error.

    Raises:
        ValueError: rates that are not positive integers; a grid other than the paper's whose length is not
            layer4's block count, or on a backbone without a ResNet last stage.
    """
    if multi_grid is None:
        return None
    grid = tuple(multi_grid)
    if any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in grid):
        raise ValueError(f"multi_grid must hold positive integers, got {grid}")
    if blocks is None:
        if grid == PAPER_MULTI_GRID:
            return None
        described = name if family is None else f"{name} (timm's {family} family)"
        raise ValueError(
            f"multi_grid={grid} sets the rates of ResNet layer4 blocks and {described} has none: pass "
            f"multi_grid=None (DeepLab v3's default, the paper's {PAPER_MULTI_GRID}, builds without it)"
        )
    if grid == PAPER_MULTI_GRID and blocks < len(grid):
        return grid[:blocks]
    if len(grid) != blocks:
        paper = "the paper's" + ("" if blocks == len(PAPER_MULTI_GRID) else f", truncated to {blocks} blocks")
        raise ValueError(
            f"multi_grid must give one rate per layer4 block ({blocks} for {name}), got {grid}; e.g. "
            f"multi_grid={PAPER_MULTI_GRID[:blocks]} ({paper}), or None"
        )
    return grid
