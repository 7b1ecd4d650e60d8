"""deeplab-lit: DeepLab v1, v2, v3 and v3+ for semantic segmentation, in PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

from deeplab_lit.modules import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus, SegmentationModule

try:
    __version__ = version("deeplab-lit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["DeepLabV1", "DeepLabV2", "DeepLabV3", "DeepLabV3Plus", "SegmentationModule", "__version__"]
