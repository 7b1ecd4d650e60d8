"""Cityscapes fine annotations: 19 evaluation classes ("trainIds"), everything else void (255).

Layout (the official ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` extracted
into one folder)::

    root/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Masks store the 34 raw ``labelIds``; they are mapped to ``trainIds`` with the table of
:class:`torchvision.datasets.Cityscapes` (which copies cityscapesScripts' ``labels.py``), through the
generic :func:`deeplab_lit.data.labels.lookup`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import Cityscapes

from deeplab_lit.data.images import SegmentationDataset
from deeplab_lit.data.labels import LabelMap, lookup
from deeplab_lit.data.transforms import IGNORE_INDEX, SegmentationTransform

_EVAL_CLASSES = sorted(
    (c for c in Cityscapes.classes if 0 <= c.train_id < IGNORE_INDEX), key=lambda c: c.train_id
)
CITYSCAPES_CLASSES: list[str] = [c.name for c in _EVAL_CLASSES]
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
DOWNLOAD_URL = "https://www.cityscapes-dataset.com/downloads/"


def cityscapes_label_map() -> LabelMap:
    """Map Cityscapes labelIds to trainIds (void classes -> 255); a value that is no labelId is an error."""
    return lookup(
        {
            c.id: c.train_id if 0 <= c.train_id < IGNORE_INDEX else IGNORE_INDEX
            for c in Cityscapes.classes
            if c.id >= 0
        }
    )


def label_id_to_train_id() -> np.ndarray:
    """The same table as ``(256,)`` int16: labelId -> trainId (void classes -> 255, unknown ids -> -1)."""
    return cityscapes_label_map().signed_table()


def cityscapes_palette() -> np.ndarray:
    """Colours ``(256, 3)`` uint8 indexed by trainId (the official colours); other entries black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for c in _EVAL_CLASSES:
        palette[c.train_id] = c.color
    return palette


def layout_help(root: Path) -> str:
    """Describe the expected Cityscapes layout under ``root`` and where to get it, for error messages."""
    return (
        f"Expected layout under {root}:\n"
        f"  leftImg8bit/{{train,val,test}}/<city>/*{IMAGE_SUFFIX}\n"
        f"  gtFine/{{train,val,test}}/<city>/*{MASK_SUFFIX}\n"
        f"Cityscapes needs a (free) login: download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip "
        f"from {DOWNLOAD_URL} and extract both into {root}."
    )


def cityscapes_pairs(root: str | Path, split: str) -> tuple[list[Path], list[Path]]:
    """Image and labelIds-mask paths of one split, sorted by city then file name.

    Raises:
        FileNotFoundError: ``root/leftImg8bit/<split>`` is missing (message shows the layout).
        ValueError: the split folder holds no ``*_leftImg8bit.png``.
    """
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Cityscapes split folder not found: {image_dir}\n{layout_help(root)}")
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise ValueError(f"Cityscapes split folder {image_dir} holds no <city>/*{IMAGE_SUFFIX} images")
    masks = [
        root / "gtFine" / split / p.parent.name / (p.name[: -len(IMAGE_SUFFIX)] + MASK_SUFFIX) for p in images
    ]
    return images, masks


class CityscapesDataset(SegmentationDataset):
    """One Cityscapes split with fine annotations, masks mapped to the 19 trainIds (void = 255).

    Args:
        root: Folder holding ``leftImg8bit`` and ``gtFine``.
        split: ``"train"``, ``"val"`` or ``"test"`` (the public test masks are all void).
        transform: Pipeline from :mod:`deeplab_lit.data.transforms` (default: whole image, ImageNet).
    """

    def __init__(self, root: str | Path, split: str, transform: SegmentationTransform | None = None):
        images, masks = cityscapes_pairs(root, split)
        names = [p.name[: -len(IMAGE_SUFFIX)] for p in images]
        source = Path(root) / "leftImg8bit" / split
        super().__init__(
            images, masks, len(CITYSCAPES_CLASSES), transform, names, source, label_map=cityscapes_label_map()
        )
