"""Data: VOC 2012 (+SBD), Cityscapes, your own folders and the synthetic default, as LightningDataModules.

Items are ``{"image", "mask", "name"}`` dicts; see :mod:`deeplab_lit.data.datamodules`.
"""

from deeplab_lit.data.cityscapes import CITYSCAPES_CLASSES, CityscapesDataset, cityscapes_palette
from deeplab_lit.data.datamodules import (
    CityscapesDataModule,
    FolderDataModule,
    SegmentationDataModule,
    SyntheticDataModule,
    VOCDataModule,
)
from deeplab_lit.data.folder import FolderDataset
from deeplab_lit.data.images import ImageFileDataset, SegmentationDataset, list_images, read_image, read_mask
from deeplab_lit.data.preflight import PreflightError, check_splits
from deeplab_lit.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from deeplab_lit.data.transforms import IGNORE_INDEX, SegmentationTransform, eval_transform, train_transform
from deeplab_lit.data.voc import VOC_CLASSES, VOCSegmentationDataset, voc_palette

__all__ = [
    "CITYSCAPES_CLASSES",
    "IGNORE_INDEX",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "CityscapesDataModule",
    "CityscapesDataset",
    "FolderDataModule",
    "FolderDataset",
    "ImageFileDataset",
    "PreflightError",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SegmentationTransform",
    "SyntheticDataModule",
    "VOCDataModule",
    "VOCSegmentationDataset",
    "check_splits",
    "cityscapes_palette",
    "eval_transform",
    "generate_synthetic",
    "list_images",
    "read_image",
    "read_mask",
    "train_transform",
    "voc_palette",
]
