"""COCO-Stuff 164k: the COCO 2017 images with 80 thing and 91 stuff classes, 171 in all.

Layout (COCO's ``train2017.zip``/``val2017.zip`` and COCO-Stuff's ``stuffthingmaps_trainval2017.zip``)::

    root/images/{train2017,val2017}/<id>.jpg
    root/annotations/{train2017,val2017}/<id>.png   # the official stuffthingmaps

A stuffthingmaps PNG stores the COCO category id - 1 (0..181) and 255 for unlabelled pixels. Eleven of those
182 values name no category (COCO left those ids out; :data:`COCO_STUFF_UNUSED_IDS`); they are void, and the
other 171 are numbered in order 0..170 (:func:`coco_stuff_label_map`). The test-dev images have no
annotations, so ``test`` runs on ``val2017``.
"""

from __future__ import annotations

from pathlib import Path

from deeplab_lit.data.folder import folder_pairs
from deeplab_lit.data.images import SegmentationDataset
from deeplab_lit.data.labels import LabelMap, lookup
from deeplab_lit.data.transforms import IGNORE_INDEX, SegmentationTransform

#: The 80 thing and 91 stuff names in category id order (COCO-Stuff's labels.txt without the unused ids).
COCO_STUFF_CLASSES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
    "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
]  # fmt: skip
#: Stored values (category id - 1) of the 11 COCO ids without a category: void.
COCO_STUFF_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
#: Stored values 0..181 (category id - 1).
NUM_STORED_IDS = 182
COCO_IMAGES_URL = "http://images.cocodataset.org/zips/{split}.zip"
STUFFTHINGMAPS_URL = (
    "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip"
)


def coco_stuff_label_map() -> LabelMap:
    """Stored 0..181 -> 0..170 in order, the 11 unused ids and 255 -> 255; values 182..254 are errors."""
    used = [v for v in range(NUM_STORED_IDS) if v not in COCO_STUFF_UNUSED_IDS]
    return lookup(
        {v: IGNORE_INDEX for v in (*COCO_STUFF_UNUSED_IDS, IGNORE_INDEX)} | {v: i for i, v in enumerate(used)}
    )


def layout_help(root: Path) -> str:
    """Describe the expected COCO-Stuff layout under ``root`` and where to get it, for error messages."""
    return (
        f"Expected layout under {root}:\n"
        "  images/{train2017,val2017}/*.jpg\n"
        "  annotations/{train2017,val2017}/*.png   (stuffthingmaps: category id - 1, 255 unlabelled)\n"
        f"Download {COCO_IMAGES_URL.format(split='train2017')} and\n"
        f"{COCO_IMAGES_URL.format(split='val2017')} into {root}/images, and\n"
        f"{STUFFTHINGMAPS_URL} into {root}/annotations."
    )


class COCOStuffDataset(SegmentationDataset):
    """One COCO-Stuff 164k split, masks mapped to the 171 classes.

    Args:
        root: Folder holding ``images`` and ``annotations``.
        split: ``"train2017"`` (118k images) or ``"val2017"`` (5k).
        transform: Pipeline from :mod:`deeplab_lit.data.transforms` (default: whole image, ImageNet).
    """

    def __init__(self, root: str | Path, split: str, transform: SegmentationTransform | None = None):
        root = Path(root)
        images, masks = folder_pairs(root / "images" / split, root / "annotations" / split, layout_help(root))
        super().__init__(
            images,
            masks,
            len(COCO_STUFF_CLASSES),
            transform,
            source=root / "images" / split,
            label_map=coco_stuff_label_map(),
        )
