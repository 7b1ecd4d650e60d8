"""BatchNorm folding for inference: every BatchNorm that directly follows a convolution goes into its weights.

In evaluation mode a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma +
beta``, so a convolution followed by it equals one convolution with rescaled weights and a bias. Folding
removes one memory-bound pass over every feature map (a few percent of inference time on a GPU, more on
a CPU). The arithmetic is torch's own :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`; this module only
finds the pairs, by structure, never guessed from names alone (:func:`fuse_conv_bn`). This covers every
layer of every DeepLab version's model (VGG-16 has no BatchNorm). Use it for predict and export only: the
folded model has no BatchNorm to train.
"""

from __future__ import annotations

import copy
import sys
from typing import TypeGuard

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deeplab_lit.models.backbones import FAMILIES, ConvBNPairs
from deeplab_lit.models.heads import ASPPPooling, AtrousDepthwiseConv2d

#: Module types whose forward applies ``conv`` then ``bn`` directly, as (conv attribute, bn attribute) pairs:
#: each built-in backbone family's (its record's ``fusable``).
FUSABLE_PAIRS: dict[type[nn.Module], ConvBNPairs] = {
    kind: pairs for family in FAMILIES for kind, pairs in family.fusable.items()
}


def _timm_loaded() -> bool:
    """Whether timm is imported: a model holds timm layers only then, and importing it is slow."""
    return "timm" in sys.modules


def _fusable_pairs() -> dict[type[nn.Module], ConvBNPairs]:
    """:data:`FUSABLE_PAIRS`, plus timm's layers once timm is loaded.

    Each pair was read off the timm 1.0.31 ``forward`` of its class (conv, then its BatchNorm, nothing
    between): ``ConvNormAct`` (RegNet and many more), aligned-Xception ``SeparableConv2d``, the ResNet
    blocks of ``timm.models.resnet`` (ResNet-D, ResNeXt, SE-ResNet, ...), the EfficientNet/MobileNetV3
    blocks of ``timm.models._efficientnet_blocks`` and the stems of their feature extractors. Subclasses
    whose convolution is another class (``CondConvResidual``'s ``CondConv2d``, timm's ``Conv2dSame`` of
    the ``tf_`` models) are left alone by :func:`_foldable`, which folds only into :data:`FOLDABLE_CONVS`.
    """
    if not _timm_loaded():
        return FUSABLE_PAIRS
    from timm.layers import ConvNormAct

    # timm exports no public name for its EfficientNet/MobileNetV3 blocks (checked in timm 1.0.31): this
    # private module is their only home; the pairs below were read off 1.0.31's forwards (re-check <2).
    from timm.models import _efficientnet_blocks as blocks
    from timm.models import efficientnet, mobilenetv3, resnet
    from timm.models.xception_aligned import SeparableConv2d

    stem = (("conv_stem", "bn1"),)
    return {
        **FUSABLE_PAIRS,
        ConvNormAct: (("conv", "bn"),),
        SeparableConv2d: (("conv_dw", "bn_dw"), ("conv_pw", "bn_pw")),
        resnet.BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
        resnet.Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
        resnet.ResNet: (("conv1", "bn1"),),  # a Conv2d stem; the ResNet-D deep stem is a Sequential
        blocks.ConvBnAct: (("conv", "bn1"),),
        blocks.DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
        blocks.InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
        blocks.EdgeResidual: (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
        efficientnet.EfficientNet: stem,
        efficientnet.EfficientNetFeatures: stem,
        mobilenetv3.MobileNetV3: stem,
        mobilenetv3.MobileNetV3Features: stem,
    }


def _fold_feature_wrapper(module: nn.Module) -> int:
    """Fold the convolution/BatchNorm children of timm's ``features_only`` wrapper; return how many.

    ``FeatureDictNet`` (and ``FeatureListNet``) run their children in order, so a ``Conv2d`` child, or the
    last ``Conv2d`` of a ``Sequential`` child, followed by a BatchNorm child is a pair: the stem of a timm
    ResNet (``conv1`` then ``bn1``; for ResNet-D a deep-stem ``Sequential`` then ``bn1``). A convolution
    whose output the wrapper returns as a feature is left as it is.
    """
    if not _timm_loaded():
        return 0
    from timm.models import FeatureDictNet

    if not isinstance(module, FeatureDictNet):
        return 0
    folded, names = 0, list(module.keys())
    for name, next_name in zip(names, names[1:]):
        holder: nn.Module = module
        key, child, bn = name, module[name], module[next_name]
        if _runs_in_order(child) and len(child) and isinstance(child[-1], nn.Conv2d):
            holder, key = child, str(len(child) - 1)
        conv = holder.get_submodule(key)
        returned = name in module.return_layers
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, BATCHNORMS_2D)
            and _foldable(conv, bn)
            and not returned
        ):
            holder.register_module(key, fuse_conv_bn_eval(conv, bn))
            module[next_name] = _replacement(bn)
            folded += 1
    return folded


#: ``nn.Sequential`` subclasses with their own ``forward`` that still run their children in order.
SEQUENTIAL_FORWARD: tuple[type[nn.Module], ...] = (ASPPPooling,)
#: Convolution classes a BatchNorm folds into (torch's fuse keeps the class, so its forward too).
FOLDABLE_CONVS: tuple[type[nn.Conv2d], ...] = (nn.Conv2d, AtrousDepthwiseConv2d)
#: Every BatchNorm class of torch (timm's norm + activation layers subclass these): the public classes
#: that torch's private base ``torch.nn.modules.batchnorm._BatchNorm`` stands for.
BATCHNORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)  # fmt: skip
#: The BatchNorms that can follow a ``Conv2d`` (the others want 2-d, 3-d or 5-d input).
BATCHNORMS_2D: tuple[type[nn.BatchNorm2d | nn.SyncBatchNorm], ...] = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _runs_in_order(module: nn.Module) -> TypeGuard[nn.Sequential]:
    """Tell whether ``module`` is an ``nn.Sequential`` whose forward applies its children in order."""
    if not isinstance(module, nn.Sequential):
        return False
    return type(module).forward is nn.Sequential.forward or isinstance(module, SEQUENTIAL_FORWARD)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) in FOLDABLE_CONVS
        and isinstance(bn, BATCHNORMS_2D)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _replacement(bn: nn.Module) -> nn.Module:
    """Return what stays of a folded BatchNorm: nothing, or timm's dropout + activation."""
    if _timm_loaded():
        from timm.layers import BatchNormAct2d

        if isinstance(bn, BatchNormAct2d):
            return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()


def _fold_children(module: nn.Module) -> int:
    """Fold the conv/BN pairs that are direct children of ``module``; return how many."""
    folded = 0
    if _runs_in_order(module):
        for index in range(len(module) - 1):
            conv, bn = module[index], module[index + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, BATCHNORMS_2D) and _foldable(conv, bn):
                module[index] = fuse_conv_bn_eval(conv, bn)
                module[index + 1] = _replacement(bn)
                folded += 1
    folded += _fold_feature_wrapper(module)
    for kind, pairs in _fusable_pairs().items():
        if isinstance(module, kind):
            for conv_name, bn_name in pairs:
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                if _foldable(conv, bn):
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(module, bn_name, _replacement(bn))
                    folded += 1
    return folded


def count_batchnorms(model: nn.Module) -> int:
    """Count the BatchNorm layers in ``model`` (0 once every one is folded)."""
    return sum(isinstance(module, BATCHNORMS) for module in model.modules())


def fuse_conv_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into that convolution, for inference.

    Pairs are found by structure:

    - in an ``nn.Sequential`` (or a subclass that runs its children in order), a ``Conv2d`` immediately
      followed by a ``BatchNorm2d``;
    - in modules whose ``forward`` is known to apply a convolution then its BatchNorm directly:
      torchvision's ResNet blocks (``conv1/bn1``, ...), our
      :class:`~deeplab_lit.models.backbones.ResNetBackbone` stem, timm's ``ConvNormAct`` and
      aligned-Xception ``SeparableConv2d`` (see :func:`_fusable_pairs`).

    A folded BatchNorm becomes ``nn.Identity``; timm's ``BatchNormAct2d`` (BatchNorm + dropout +
    activation) becomes its dropout and activation.

    Outputs equal the eval-mode model's to float rounding (about 1e-6 relative). The memory format of the
    weights (e.g. channels-last) is kept. A compiled (``nn.Module.compile``) model is returned uncompiled:
    compile the result again if wanted.

    Args:
        model: Any model; DeepLab's :class:`~deeplab_lit.models.Segmenter` and
            :class:`~deeplab_lit.models.MultiScaleSegmenter` are fully covered.
        inplace: Fold into ``model`` itself instead of a deep copy.

    Returns:
        The folded model, in eval mode. Its state dict has no BatchNorm keys and the convolutions
        that absorbed one gain a bias, so save the original model's weights, not these.
    """
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    if inplace:  # a deep copy is never compiled: nn.Module.__getstate__ leaves the compiled wrapper out
        for module in folded.modules():
            # nn.Module.compile() keeps torch.compile(self._call_impl) in this private attribute and torch
            # has no public way to undo it (checked in torch 2.14.1, the installed one; the attribute came
            # with nn.Module.compile in torch 2.2): cleared so that the model folded in place runs eagerly.
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
    for module in list(folded.modules()):
        _fold_children(module)
    return folded
