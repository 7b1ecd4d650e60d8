"""Pure-PyTorch DeepLab networks: backbones, heads, one segmenter, per-version builders, BatchNorm folding.

No Lightning and no file I/O: weights (ImageNet, published, checkpoints) are :mod:`deeplab_lit.weights`' job.
"""

from deeplab_lit.models.backbone_base import Backbone
from deeplab_lit.models.backbones import BACKBONES, build_backbone
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
]
