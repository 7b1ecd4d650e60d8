"""Data: VOC, Cityscapes, ADE20K, PASCAL-Context, COCO-Stuff, your own folders, a synthetic default.

Each is a LightningDataModule; every mask goes through one label mapping (:mod:`deeplab_lit.data.labels`).
Items are ``{"image", "mask", "name"}`` dicts; see :mod:`deeplab_lit.data.datamodules`.
"""

from deeplab_lit.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from deeplab_lit.data.cityscapes import CITYSCAPES_CLASSES, CityscapesDataset, cityscapes_palette
from deeplab_lit.data.coco_stuff import COCO_STUFF_CLASSES, COCOStuffDataset
from deeplab_lit.data.datamodules import (
    ADE20KDataModule,
    CityscapesDataModule,
    COCOStuffDataModule,
    FolderDataModule,
    PascalContextDataModule,
    SegmentationDataModule,
    SyntheticDataModule,
    VOCDataModule,
)
from deeplab_lit.data.folder import FolderDataset
from deeplab_lit.data.images import ImageFileDataset, SegmentationDataset, list_images, read_image, read_mask
from deeplab_lit.data.labels import LabelMap, LabelMapError
from deeplab_lit.data.pascal_context import PASCAL_CONTEXT_59_CLASSES, PascalContextDataset
from deeplab_lit.data.preflight import PreflightError, check_splits
from deeplab_lit.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from deeplab_lit.data.transforms import IGNORE_INDEX, SegmentationTransform, eval_transform, train_transform
from deeplab_lit.data.voc import VOC_CLASSES, VOCSegmentationDataset, voc_palette

__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "COCO_STUFF_CLASSES",
    "IGNORE_INDEX",
    "PASCAL_CONTEXT_59_CLASSES",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "ADE20KDataModule",
    "ADE20KDataset",
    "COCOStuffDataModule",
    "COCOStuffDataset",
    "CityscapesDataModule",
    "CityscapesDataset",
    "FolderDataModule",
    "FolderDataset",
    "ImageFileDataset",
    "LabelMap",
    "LabelMapError",
    "PascalContextDataModule",
    "PascalContextDataset",
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
