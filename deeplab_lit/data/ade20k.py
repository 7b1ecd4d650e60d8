"""ADE20K, the MIT Scene Parsing benchmark (SceneParsing / ADEChallengeData2016): 150 classes.

Layout (``ADEChallengeData2016.zip`` extracted into ``root``)::

    root/ADEChallengeData2016/images/{training,validation}/ADE_<split>_<n>.jpg
    root/ADEChallengeData2016/annotations/{training,validation}/ADE_<split>_<n>.png

Annotations store 0 for "other objects" (not evaluated) and ``1..150`` for the classes of the
benchmark's ``objectInfo150`` list; they are read with :func:`~deeplab_lit.data.labels.reduce_zero_label`:
0 -> 255 (void), ``v`` -> ``v - 1``. The 2,000 ``release_test`` images have no annotations, so ``test``
runs on ``validation``.
"""

from __future__ import annotations

from pathlib import Path

from deeplab_lit.data.folder import folder_pairs
from deeplab_lit.data.images import SegmentationDataset
from deeplab_lit.data.labels import LabelMap, reduce_zero_label
from deeplab_lit.data.transforms import SegmentationTransform

#: The benchmark's objectInfo150 names (the first name of each entry), index = class id after the map.
ADE20K_CLASSES: list[str] = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip
ADE20K_SUBDIR = "ADEChallengeData2016"
ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"


def ade20k_label_map() -> LabelMap:
    """0 ("other") -> 255, ``1..150`` -> ``0..149``; any other value is an error."""
    return reduce_zero_label(max_value=len(ADE20K_CLASSES))


def layout_help(root: Path) -> str:
    """Describe the expected ADE20K layout under ``root`` and where to get it, for error messages."""
    hint = ""
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        hint = f"{root} looks like the {ADE20K_SUBDIR} folder itself: pass the folder that holds it.\n"
    return (
        f"{hint}Expected layout under {root}:\n"
        f"  {ADE20K_SUBDIR}/images/{{training,validation}}/*.jpg\n"
        f"  {ADE20K_SUBDIR}/annotations/{{training,validation}}/*.png\n"
        f"Download {ADE20K_URL} and extract it into {root}."
    )


class ADE20KDataset(SegmentationDataset):
    """One ADE20K split, masks mapped to the 150 classes (0 "other" -> 255).

    Args:
        root: Folder holding ``ADEChallengeData2016``.
        split: ``"training"`` (20,210 images) or ``"validation"`` (2,000).
        transform: Pipeline from :mod:`deeplab_lit.data.transforms` (default: whole image, ImageNet).
    """

    def __init__(self, root: str | Path, split: str, transform: SegmentationTransform | None = None):
        root = Path(root)
        base = root / ADE20K_SUBDIR
        images, masks = folder_pairs(base / "images" / split, base / "annotations" / split, layout_help(root))
        super().__init__(
            images,
            masks,
            len(ADE20K_CLASSES),
            transform,
            source=base / "images" / split,
            label_map=ade20k_label_map(),
        )
