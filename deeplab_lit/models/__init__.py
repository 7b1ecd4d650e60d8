"""Pure-PyTorch DeepLab models: backbones, heads, one segmenter and per-version builders (no Lightning)."""

from deeplab_lit.models.backbones import BACKBONES, Backbone, build_backbone
from deeplab_lit.models.deeplab import (
    MultiScaleSegmenter,
    Segmenter,
    deeplab_v1,
    deeplab_v2,
    deeplab_v3,
    deeplab_v3plus,
)
from deeplab_lit.models.heads import (
    ASPP,
    ASPPSum,
    ConvClassifier,
    DeepLabV3Head,
    DeepLabV3PlusDecoder,
    FCNHead,
    LargeFOVHead,
)
from deeplab_lit.models.imagenet import load_imagenet_weights

__all__ = [
    "ASPP",
    "BACKBONES",
    "ASPPSum",
    "Backbone",
    "ConvClassifier",
    "DeepLabV3Head",
    "DeepLabV3PlusDecoder",
    "FCNHead",
    "LargeFOVHead",
    "MultiScaleSegmenter",
    "Segmenter",
    "build_backbone",
    "deeplab_v1",
    "deeplab_v2",
    "deeplab_v3",
    "deeplab_v3plus",
    "load_imagenet_weights",
]
