"""Any timm convolutional encoder as a DeepLab backbone: ``backbone="timm:<model name>"``.

``timm.create_model(name, features_only=True, output_stride=8/16/32, out_indices=...)`` gives the
encoder, dilated by timm itself (DeepLab v3 Sec. 3.1: strides replaced by atrous convolution), and its
``feature_info`` gives each level's channels and stride. From it the backbone returns:

- ``"low"``: the deepest stride-4 level, the skip input of the v3+ decoder (v3+ Sec. 3.1);
- ``"aux"``: the level before the last (the role of ResNet's ``layer3``), input of the optional FCN head;
- ``"out"``: the last level, at ``output_stride``.

Not every timm model can be dilated or trained at batch size 1: :func:`check_timm_backbone` refuses
those before anything is built, on the ``meta`` device, with one message naming the reason. timm is
imported only when a timm backbone is checked or built.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from deeplab_lit.models.backbone_base import Backbone, resolve_multi_grid, set_conv

#: Prefix of a timm encoder's backbone name: ``"timm:convnext_tiny"``.
TIMM_PREFIX = "timm:"
#: Output strides a timm encoder is built at (timm's ``output_stride`` option).
TIMM_OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)
#: timm families (the ``timm.models`` module defining the model) whose last stage takes a multi-grid.
MULTI_GRID_FAMILIES: tuple[str, ...] = ("resnet",)
#: The meta-device probe's input: big enough that every level keeps at least 2x2 pixels at stride 32.
_PROBE_SIZE = 64
_ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel"


def is_timm_name(name: str) -> bool:
    """Whether backbone ``name`` names a timm encoder (``"timm:<model name>"``)."""
    return name.startswith(TIMM_PREFIX)


@dataclass(frozen=True)
class TimmLevels:
    """What the meta-device probe found: the timm model, its family and the feature levels DeepLab takes.

    Attributes:
        model_name: timm's model name (``"convnext_tiny"``).
        family: The timm module defining it (``"convnext"``, ``"resnet"``, ``"efficientnet"``, ...).
        out_indices: timm ``out_indices`` of ``"low"``[, ``"aux"``], ``"out"``, increasing.
        keys: The feature names, in the order of ``out_indices``.
        channels: Channels of each level, in the same order.
        last_stage_blocks: Blocks of ``layer4`` for a multi-grid family, else None.
    """

    model_name: str
    family: str
    out_indices: tuple[int, ...]
    keys: tuple[str, ...]
    channels: tuple[int, ...]
    last_stage_blocks: int | None


def timm_model_name(name: str) -> str:
    """Return timm's model name of backbone ``name`` (``"timm:convnext_tiny"`` -> ``"convnext_tiny"``).

    Raises:
        ValueError: no ``timm:`` prefix, a pretrained tag in the name, or a model timm does not know (the
            message lists close names).
    """
    if not is_timm_name(name):
        raise ValueError(f"A timm backbone is named {TIMM_PREFIX}<timm model name>, got {name!r}")
    import timm

    model_name = name[len(TIMM_PREFIX) :]
    if "." in model_name:
        arch, tag = model_name.split(".", 1)
        raise ValueError(
            f"Backbone {name!r} names timm weights ({tag!r}) in the model name; name the architecture "
            f"({TIMM_PREFIX}{arch}) and the weights with pretrained_backbone={tag!r}"
        )
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        pattern = f"*{model_name.split('_')[0]}*"
        raise ValueError(
            f"Unknown timm model {model_name!r} (backbone {name!r}); close names: {close or 'none'}. "
            f"timm.list_models({pattern!r}) lists that family"
        )
    return model_name


def _family(model_name: str) -> str:
    from timm.models import model_entrypoint

    return str(model_entrypoint(model_name).__module__).rsplit(".", 1)[-1]


def _refusal(model_name: str, family: str, output_stride: int, why: str) -> ValueError:
    return ValueError(
        f"timm model {model_name!r} ({family} family) cannot be a DeepLab backbone at "
        f"output_stride={output_stride}: {why}"
    )


def _builds_at_stride_32(model_name: str) -> bool:
    """Whether timm builds ``model_name``'s feature extractor at output stride 32 (on the meta device)."""
    import timm

    try:
        with torch.device("meta"):
            timm.create_model(model_name, features_only=True, output_stride=32)
    except Exception:  # any failure: the model is refused with timm's own error either way
        return False
    return True


@functools.lru_cache(maxsize=64)
def _probe(model_name: str, output_stride: int) -> TimmLevels:
    """Build ``model_name`` on the meta device, read its levels and run one batch-1 training forward."""
    import timm

    family = _family(model_name)
    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, features_only=True, output_stride=output_stride)
    except Exception as err:  # never timm's own error: a TypeError, a bare assert (hrnet, dla, dpn), ...
        error = f"{type(err).__name__}: {str(err) or 'assert'}"
        why = f"timm cannot build it with features_only=True ({error})"
        if isinstance(err, TypeError) and "output_stride" in str(err):
            why = (
                f"the family has no output_stride option (no dilated variant; timm says: {err}), so its "
                "features cannot be kept at stride 8 or 16. Use a convolutional family timm can dilate, "
                "e.g. timm:convnext_tiny, timm:resnet50d, timm:efficientnet_b0, timm:regnety_016"
            )
        elif output_stride != 32 and _builds_at_stride_32(model_name):
            why = f"timm builds it only at output_stride=32: no dilated variant ({error})"
        raise _refusal(model_name, family, output_stride, why) from None
    from timm.models import FeatureInfo

    reductions = list(cast(FeatureInfo, model.feature_info).reduction())
    if reductions[-1] != output_stride:
        why = f"its last features are at stride {reductions[-1]} (levels at strides {reductions})"
        raise _refusal(model_name, family, output_stride, why)
    if 4 not in reductions:
        why = f"it has no stride-4 level for the v3+ decoder (levels at strides {reductions})"
        raise _refusal(model_name, family, output_stride, why)
    model.train()
    try:
        model(torch.empty(1, 3, _PROBE_SIZE, _PROBE_SIZE, device="meta"))
    except Exception as err:
        if _ONE_VALUE_PER_CHANNEL not in str(err):
            # An operation the meta device cannot run (none among the families measured) leaves the
            # probe without a verdict on batch size 1; the real model is built and runs as timm made it.
            return _levels(model_name, family, model)
        why = (
            f"it fails in training at batch size 1 ({err}): a BatchNorm after global pooling sees one "
            "value per channel. DeepLab trains with small batches per device; choose another family"
        )
        raise _refusal(model_name, family, output_stride, why) from None
    return _levels(model_name, family, model)


def _levels(model_name: str, family: str, model: nn.Module) -> TimmLevels:
    """The levels DeepLab takes from a probed timm feature extractor (see :class:`TimmLevels`)."""
    from timm.models import FeatureInfo

    info = cast(FeatureInfo, model.feature_info)
    reductions, channels = list(info.reduction()), list(info.channels())
    low = max(i for i, r in enumerate(reductions) if r == 4)
    last = len(reductions) - 1
    indices, keys = [low], ["low"]
    if last - 1 > low:
        indices, keys = [*indices, last - 1], [*keys, "aux"]
    indices, keys = [*indices, last], [*keys, "out"]
    layer4 = cast(nn.Sequential, model.get_submodule("layer4")) if family in MULTI_GRID_FAMILIES else None
    blocks = None if layer4 is None else len(layer4)
    return TimmLevels(
        model_name=model_name,
        family=family,
        out_indices=tuple(info.out_indices[i] for i in indices),
        keys=tuple(keys),
        channels=tuple(channels[i] for i in indices),
        last_stage_blocks=blocks,
    )


def check_timm_backbone(
    name: str, output_stride: int, multi_grid: Sequence[int] | None = None, style: str = "torchvision"
) -> TimmLevels:
    """Check the options of timm backbone ``name`` without building it.

    The check runs once per (model, output stride) on the ``meta`` device, where no memory is allocated
    and no arithmetic is done: the model is built there and run once in training mode on a
    ``(1, 3, 64, 64)`` meta tensor. That refuses, with one ValueError naming the model's timm family and
    the reason, the families DeepLab cannot use (measured with timm 1.0.31):

    - no ``output_stride`` option (no dilated variant): ``swin_*``, ``vit_*``, ``efficientvit_*``, ...;
    - a BatchNorm that sees one value per channel at batch size 1 in training (BatchNorm after global
      pooling: ``resnest*``'s split attention, ``rexnet_*``'s squeeze-excitation): BatchNorm's "Expected
      more than 1 value per channel when training" check looks only at shapes, so it runs on meta tensors
      too;
    - a model whose features do not reach the requested stride, or that has no stride-4 level.

    Args:
        name: ``"timm:<model name>"``.
        output_stride: 8, 16 or 32.
        multi_grid: Rates of the last stage's blocks, timm's ResNet family only; None (or the paper's
            (1, 2, 4), which means None there) otherwise.
        style: Only ``"torchvision"`` (the Caffe style is one of the built-in ResNets).

    Returns:
        The levels the backbone will return (cached per model and output stride).

    Raises:
        ValueError: unknown model, unsupported output stride, style or multi-grid, or a refused family;
            one message naming the model, its timm family and the reason.
    """
    if output_stride not in TIMM_OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride={output_stride!r} is not supported by {name}; "
            f"expected one of {TIMM_OUTPUT_STRIDES}"
        )
    if style != "torchvision":
        raise ValueError(
            f"style={style!r} is an option of the built-in ResNets; {name} only has style='torchvision'"
        )
    levels = _probe(timm_model_name(name), output_stride)
    resolve_multi_grid(name, multi_grid, blocks=levels.last_stage_blocks, family=levels.family)
    return levels


class TimmBackbone(Backbone):
    """A timm encoder (``features_only=True``) dilated to ``output_stride`` by timm, as a DeepLab backbone.

    ``body`` is timm's feature extractor; its parameters sit under the segmenter's ``backbone``, so they
    train at the base learning rate and ``freeze_bn`` reaches its BatchNorms (timm's ``BatchNormAct2d``
    subclasses ``nn.BatchNorm2d``). Its state-dict keys are timm's ``features_only`` keys (``stages_0``
    for ``stages.0``); :func:`~deeplab_lit.weights.imagenet.load_imagenet_weights` loads ImageNet weights
    through timm's own pretrained mechanism, which maps them.

    Feature sizes are timm's: ``ceil(H / s)`` for padded strided convolutions (EfficientNet, ResNet-D),
    ``floor(H / 4)`` after ConvNeXt's 4x4 patchify stem. Every consumer resizes to the tensor it is matched
    to, so any input size works.

    Multi-grid (DeepLab v3 Sec. 3.2) is defined on ResNet's last stage; it applies to timm's ResNet family
    (``timm.models.resnet``: ``resnet50d``, ``resnext50_32x4d``, ``seresnet50``, ...), whose ``layer4``
    blocks get 3x3 rates ``base_rate * multi_grid[i]`` as in
    :class:`~deeplab_lit.models.backbones.ResNetBackbone`. Other families have no such stage: the paper's
    grid (DeepLab v3's default) builds them without multi-grid, any other grid is refused.

    Args:
        name: ``"timm:<model name>"``, e.g. ``"timm:convnext_tiny"``.
        output_stride: 8, 16 or 32.
        multi_grid: timm's ResNet family only: per-block rate multipliers of ``layer4`` (DeepLab v3
            Sec. 3.2), as for the built-in ResNets (the paper's (1, 2, 4) is truncated to two-block stages).

    Attributes:
        model_name: timm's model name.
        family: timm's module of the model (``"convnext"``, ``"resnet"``, ...).
        timm_kwargs: The ``timm.create_model`` keyword arguments ``body`` was built with.
    """

    def __init__(
        self, name: str, *, output_stride: int = 16, multi_grid: Sequence[int] | None = None
    ) -> None:
        levels = check_timm_backbone(name, output_stride, multi_grid)
        channels = dict(zip(levels.keys, levels.channels))
        super().__init__(name, channels["low"], channels["out"], channels.get("aux"), output_stride)
        import timm

        self.model_name, self.family, self._keys = levels.model_name, levels.family, levels.keys
        self.timm_kwargs: dict[str, Any] = {
            "features_only": True,
            "output_stride": output_stride,
            "out_indices": levels.out_indices,
        }
        self.body = timm.create_model(self.model_name, **self.timm_kwargs)
        grid = self.multi_grid = resolve_multi_grid(name, multi_grid, blocks=levels.last_stage_blocks)
        if grid is not None:
            self._set_multi_grid(grid, base_rate=32 // output_stride)

    def _set_multi_grid(self, grid: Sequence[int], base_rate: int) -> None:
        """Give every 3x3 convolution of ``layer4`` block ``i`` the rate ``base_rate * grid[i]``."""
        for block, unit_rate in zip(cast(nn.Sequential, self.body.get_submodule("layer4")), grid):
            for conv in (getattr(block, name, None) for name in ("conv1", "conv2")):
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    set_conv(conv, dilation=base_rate * unit_rate)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return ``{"low": stride 4, "aux": penultimate, "out": last}`` features of ``x`` (N, 3, H, W)."""
        return dict(zip(self._keys, self.body(x)))
