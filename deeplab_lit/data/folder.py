"""A researcher's own data set: a folder of images and a folder of index-PNG masks.

Layout::

    root/images/<stem>.jpg|.png|...   # RGB images (any suffix in IMAGE_SUFFIXES)
    root/masks/<stem>.png             # one class index per pixel (palette or grayscale PNG), 255 = ignore,
                                      # or colours with the datamodule's palette option
    root/train.txt, root/val.txt      # optional: one stem per line (a file name with suffix also works)

Splits come from list files when given (``train_list`` and ``val_list`` together, optional
``test_list``); otherwise every image is split deterministically: the sorted stems are shuffled with
``split_seed`` and the first ``val_fraction`` of them (at least one) form the validation split.
Every image must have a mask: an unpaired image is an error, never skipped.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from deeplab_lit.data.images import IMAGE_SUFFIXES, SegmentationDataset
from deeplab_lit.data.labels import LabelMap
from deeplab_lit.data.transforms import SegmentationTransform


def index_images(image_dir: Path) -> dict[str, Path]:
    """Map stem -> image file for every image in ``image_dir``.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no images, or two images share a stem (``a.jpg`` and ``a.png``).
    """
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Image folder not found: {image_dir}")
    index: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in index:
            raise ValueError(f"Two images share the stem {path.stem!r}: {index[path.stem]} and {path}")
        index[path.stem] = path
    if not index:
        raise ValueError(f"Image folder {image_dir} holds no images (expected {', '.join(IMAGE_SUFFIXES)})")
    return index


def folder_pairs(
    image_dir: Path, mask_dir: Path, layout: str, image_suffix: str = ".jpg", mask_suffix: str = ".png"
) -> tuple[list[Path], list[Path]]:
    """Every ``image_dir/<stem><image_suffix>``, sorted, with its ``mask_dir/<stem><mask_suffix>``.

    The layout of the public data sets whose split is a folder (ADE20K, COCO-Stuff). Missing masks are
    left to :class:`SegmentationDataset`, which names them all.

    Args:
        image_dir: The split's image folder.
        mask_dir: The split's mask folder.
        layout: The data set's expected layout and where to get it, appended to the errors.
        image_suffix: Suffix of the images.
        mask_suffix: Suffix of the masks.

    Raises:
        FileNotFoundError: ``image_dir`` is missing.
        ValueError: it holds no ``*<image_suffix>``.
    """
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Image folder not found: {image_dir}\n{layout}")
    images = sorted(image_dir.glob(f"*{image_suffix}"))
    if not images:
        raise ValueError(f"Image folder {image_dir} holds no *{image_suffix} images\n{layout}")
    return images, [mask_dir / f"{p.stem}{mask_suffix}" for p in images]


def read_stem_list(path: Path) -> list[str]:
    """Stems listed in a split file, one per line; a known image suffix on a line is dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it lists nothing.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Split list file not found: {path}")
    stems = []
    for line in path.read_text().splitlines():
        name = line.strip()
        if name:
            stems.append(Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name)
    if not stems:
        raise ValueError(f"Split list file {path} is empty: it must list one image stem per line")
    return stems


def split_stems(stems: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/val split of ``stems`` (independent of listing order).

    Returns:
        ``(train, val)``, each sorted; ``val`` has ``ceil(val_fraction * n)`` stems, at least one.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    shuffled = sorted(stems)
    random.Random(seed).shuffle(shuffled)
    num_val = max(1, math.ceil(val_fraction * len(shuffled)))
    if num_val >= len(shuffled):
        raise ValueError(
            f"Cannot split {len(shuffled)} image(s) into train and val with val_fraction={val_fraction}: "
            "need at least 2 images, and at least one left for training"
        )
    return sorted(shuffled[num_val:]), sorted(shuffled[:num_val])


class FolderDataset(SegmentationDataset):
    """The images of ``stems`` with their ``<mask_dir>/<stem>.png`` masks.

    Args:
        images: Stem -> image file (from :func:`index_images`).
        stems: The split's stems.
        mask_dir: Folder of index-PNG masks.
        num_classes: Number of classes.
        transform: Pipeline from :mod:`deeplab_lit.data.transforms`.
        source: Where ``stems`` came from (a list file or the folder), named in errors.
        label_map: Mapping of the stored values or colours (:func:`deeplab_lit.data.labels.combined`).
    """

    def __init__(
        self,
        images: dict[str, Path],
        stems: list[str],
        mask_dir: Path,
        num_classes: int,
        transform: SegmentationTransform | None = None,
        source: str | Path = "the folder",
        label_map: LabelMap | None = None,
    ):
        unknown = [s for s in stems if s not in images]
        if unknown:
            folder = next(iter(images.values())).parent
            raise FileNotFoundError(
                f"{source} lists {len(unknown)} stem(s) with no image in {folder}: {', '.join(unknown[:5])}"
            )
        super().__init__(
            [images[s] for s in stems],
            [mask_dir / f"{s}.png" for s in stems],
            num_classes,
            transform,
            names=stems,
            source=source,
            label_map=label_map,
        )
