"""LightningModules: one shared base, one small subclass per DeepLab version."""

from deeplab_lit.modules.base import SegmentationModule
from deeplab_lit.modules.deeplab import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus

__all__ = ["DeepLabV1", "DeepLabV2", "DeepLabV3", "DeepLabV3Plus", "SegmentationModule"]
