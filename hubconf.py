"""torch.hub entry points: DeepLab networks with published weights, by their registered names.

    import torch
    model = torch.hub.load("<owner>/deeplab-lit", "deeplab", weights="deeplabv3_resnet101.coco_voc")
    model = torch.hub.load("<owner>/deeplab-lit", "deeplabv3_resnet101")  # the same weights
    model = torch.hub.load("path/to/deeplab-lit", "deeplab", source="local", weights="...")

Each returns the plain network (``deeplab_lit.models``' ``Segmenter``, or ``MultiScaleSegmenter`` for MSC
weights; no Lightning), in eval mode with its weights loaded through the registry (downloaded once,
checksum checked), or freshly initialised with ``pretrained=False``. ``model(x)`` takes images normalised
as the weights need (``deeplab_lit.weights.registry.get_weights(name).normalization.normalize(uint8)``)
and gives logits (N, C, H, W) at the input's size. ``deeplab`` takes any registered name
(``deeplab_lit.weights.registry.list_weights()``, including ones added with ``register_weights``); the
other entry points are the published weights' own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

dependencies = ["torch", "torchvision"]


def deeplab(weights: str, pretrained: bool = True) -> nn.Module:
    """DeepLab network of a registered weights name, e.g. ``"deeplabv3_resnet101.coco_voc"``.

    Args:
        weights: The registered name (``deeplab_lit.weights.registry.list_weights()``).
        pretrained: Load the weights; False builds the same network freshly initialised.
    """
    from deeplab_lit.weights.load import build_published  # on call: listing entry points stays light

    return build_published(weights, pretrained=pretrained)


def deeplabv3_resnet50(pretrained: bool = True) -> nn.Module:
    """DeepLab v3 ResNet-50, torchvision's COCO weights with the 21 VOC labels (66.4 mIoU, COCO val)."""
    return deeplab("deeplabv3_resnet50.coco_voc", pretrained)


def deeplabv3_resnet101(pretrained: bool = True) -> nn.Module:
    """DeepLab v3 ResNet-101, torchvision's COCO weights with the 21 VOC labels (67.4 mIoU, COCO val)."""
    return deeplab("deeplabv3_resnet101.coco_voc", pretrained)


def deeplabv2_resnet101_msc(pretrained: bool = True) -> nn.Module:
    """DeepLab v2 ResNet-101 MSC, kazuto1011's VOC train_aug weights (76.65 mIoU VOC val, Caffe BGR input)."""
    return deeplab("deeplabv2_resnet101_msc.voc_trainaug", pretrained)
