"""PASCAL-Context: VOC 2010 images labelled whole-scene; the 59 most frequent classes (+ background).

The DeepLab v2 paper (Sec. 4.2) evaluates the 59 most frequent classes and background, 60 in all. Layout
(the widely used conversion: VOC 2010 images with masks made from the Detail API's ``trainval_merged.json``,
e.g. by mmsegmentation's ``tools/dataset_converters/pascal_context.py``)::

    root/VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    root/VOCdevkit/VOC2010/SegmentationClassContext/<id>.png   # 0 = background, 1..59 the classes
    root/VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt   # 4,998 / 5,105 ids

``num_classes=60`` keeps background as class 0; ``num_classes=59`` makes it void (0 -> 255,
``v`` -> ``v - 1``, :func:`~deeplab_lit.data.labels.reduce_zero_label`). Any other mask value than
0..59 and 255 is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path

from deeplab_lit.data.images import SegmentationDataset
from deeplab_lit.data.labels import LabelMap, identity, reduce_zero_label
from deeplab_lit.data.transforms import SegmentationTransform
from deeplab_lit.data.voc import read_split

#: The 59 classes in the standard order (mask values 1..59).
PASCAL_CONTEXT_59_CLASSES: list[str] = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard",
    "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock",
    "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree",
    "truck", "tvmonitor", "wall", "water", "window", "wood",
]  # fmt: skip
PASCAL_CONTEXT_SUBDIR = Path("VOCdevkit", "VOC2010")
VOC2010_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar"
DETAIL_URL = "https://cs.stanford.edu/~roozbeh/pascal-context/"
NUM_CLASSES_CHOICES = (59, 60)


def pascal_context_classes(num_classes: int = 60) -> list[str]:
    """Class names: ``"background"`` then the 59 classes (60), or the 59 alone (background void)."""
    check_num_classes(num_classes)
    return (["background"] if num_classes == 60 else []) + PASCAL_CONTEXT_59_CLASSES


def check_num_classes(num_classes: int) -> None:
    """Raise ValueError unless ``num_classes`` is 59 or 60."""
    if num_classes not in NUM_CLASSES_CHOICES:
        raise ValueError(
            f"PASCAL-Context num_classes must be 60 (59 classes + background) or 59 (background void); "
            f"got {num_classes}"
        )


def pascal_context_label_map(num_classes: int = 60) -> LabelMap:
    """60: values 0..59 and 255 as stored; 59: 0 -> 255, ``v`` -> ``v - 1``. Other values are errors."""
    check_num_classes(num_classes)
    return identity(60) if num_classes == 60 else reduce_zero_label(max_value=59)


def layout_help(root: Path) -> str:
    """Describe the expected PASCAL-Context layout under ``root`` and how to get it, for error messages."""
    base = PASCAL_CONTEXT_SUBDIR
    return (
        f"Expected layout under {root}:\n"
        f"  {base}/JPEGImages/*.jpg\n"
        f"  {base}/SegmentationClassContext/*.png   (0 = background, 1..59)\n"
        f"  {base}/ImageSets/SegmentationContext/{{train,val}}.txt\n"
        f"Get the VOC 2010 images ({VOC2010_URL}) and the annotations (trainval_merged.json, {DETAIL_URL}),\n"
        "and convert them, e.g. with mmsegmentation's tools/dataset_converters/pascal_context.py."
    )


class PascalContextDataset(SegmentationDataset):
    """One PASCAL-Context split with 60 (background = 0) or 59 classes (background void).

    Args:
        root: Folder holding ``VOCdevkit/VOC2010``.
        split: A file name under ``ImageSets/SegmentationContext`` (``"train"``, ``"val"``).
        num_classes: 60 or 59.
        transform: Pipeline from :mod:`deeplab_lit.data.transforms` (default: whole image, ImageNet).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int = 60,
        transform: SegmentationTransform | None = None,
    ):
        root = Path(root)
        base = root / PASCAL_CONTEXT_SUBDIR
        split_file = base / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"PASCAL-Context split file not found: {split_file}\n{layout_help(root)}")
        ids = read_split(split_file)
        super().__init__(
            [base / "JPEGImages" / f"{i}.jpg" for i in ids],
            [base / "SegmentationClassContext" / f"{i}.png" for i in ids],
            num_classes,
            transform,
            names=ids,
            source=split_file,
            label_map=pascal_context_label_map(num_classes),
        )
