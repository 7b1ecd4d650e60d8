"""PASCAL VOC 2012 segmentation and the SBD augmentation ("train_aug", 10,582 images).

Layout under a data root (what torchvision's downloaders produce, see :func:`download_voc_sbd`)::

    root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    root/VOCdevkit/VOC2012/SegmentationClass/<id>.png          # palette PNGs, 255 = void border
    root/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    root/benchmark_RELEASE/dataset/cls/<id>.mat                # SBD: struct GTcls, field Segmentation
    root/benchmark_RELEASE/dataset/{train,val}.txt

``train_aug`` = (SBD train ∪ SBD val ∪ VOC train) − VOC val. Its images all lie in VOC's JPEGImages
(SBD annotates VOC 2011 images). Where an id has a VOC ``SegmentationClass`` PNG that mask is used
(it carries VOC's void borders); only ids without one take their mask from the SBD ``.mat``. This
is the convention of the DeepLab releases' ``SegmentationClassAug``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from deeplab_lit.data.images import SegmentationDataset
from deeplab_lit.data.transforms import SegmentationTransform

VOC_CLASSES: list[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip
VOC_SUBDIR = Path("VOCdevkit", "VOC2012")
SBD_SUBDIR = Path("benchmark_RELEASE", "dataset")
TRAIN_SPLITS = ("train_aug", "train", "trainval")
VOC_URL = "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = (
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
)


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """Return the PASCAL VOC colour map: colour bits of the label index interleaved over R, G and B.

    Returns:
        ``uint8`` array ``(num_colors, 3)``; entry 255 (void) is (224, 224, 192) as in VOC's PNGs.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        label, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (label & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        palette[index] = (r, g, b)
    return palette


def read_split(path: Path) -> list[str]:
    """Read an id list (one id per line, as ``ImageSets/Segmentation/*.txt``).

    Raises:
        FileNotFoundError: the split file does not exist.
        ValueError: it lists no ids.
    """
    if not path.is_file():
        raise FileNotFoundError(f"Split file not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"Split file {path} is empty: it must list one image id per line")
    return ids


def read_sbd_mask(path: Path) -> np.ndarray:
    """Class indices ``(H, W)`` from an SBD ``cls/<id>.mat`` (``GTcls.Segmentation``)."""
    if not path.is_file():
        raise FileNotFoundError(f"SBD mask file not found: {path}")
    try:
        mat = loadmat(path)
        return np.asarray(mat["GTcls"][0]["Segmentation"][0])
    except (MatReadError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"Could not read SBD mask {path}: {err}. Expected a MATLAB file holding struct GTcls with "
            "field Segmentation, as in benchmark_RELEASE/dataset/cls"
        ) from err


def layout_help(root: Path) -> str:
    """Describe the expected VOC/SBD layout under ``root`` and how to get it, for error messages."""
    return (
        f"Expected layout under {root}:\n"
        f"  {VOC_SUBDIR}/JPEGImages/*.jpg\n"
        f"  {VOC_SUBDIR}/SegmentationClass/*.png\n"
        f"  {VOC_SUBDIR}/ImageSets/Segmentation/{{train,val,trainval}}.txt\n"
        f"  {SBD_SUBDIR}/cls/*.mat and {SBD_SUBDIR}/{{train,val}}.txt   (SBD, for train_aug)\n"
        f"Download with VOCDataModule(..., download=True) (YAML: data.init_args.download: true), or fetch\n"
        f"  {VOC_URL}\n  {SBD_URL}\nand extract both into {root}."
    )


def check_voc_root(root: Path) -> None:
    """Raise FileNotFoundError with the expected layout if ``root`` lacks VOC 2012."""
    voc = root / VOC_SUBDIR
    if (voc / "JPEGImages").is_dir() and (voc / "ImageSets" / "Segmentation").is_dir():
        return
    hint = ""
    if (root / "JPEGImages").is_dir():
        hint = f"\n{root} looks like the VOC2012 folder itself: pass the folder that holds VOCdevkit."
    raise FileNotFoundError(f"PASCAL VOC 2012 not found under {root}.{hint}\n{layout_help(root)}")


def train_aug_ids(root: Path) -> list[str]:
    """Return the ``train_aug`` ids: (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted."""
    sbd = root / SBD_SUBDIR
    if not (sbd / "cls").is_dir():
        raise FileNotFoundError(
            f"train_split='train_aug' needs the SBD annotations, not found at {sbd / 'cls'}. Put SBD's "
            f"benchmark_RELEASE/dataset (cls/*.mat, train.txt, val.txt) under {root}, use download=True, "
            "or choose train_split='train' (VOC's 1,464 images only).\n" + layout_help(root)
        )
    splits = root / VOC_SUBDIR / "ImageSets" / "Segmentation"
    ids = (
        set(read_split(sbd / "train.txt"))
        | set(read_split(sbd / "val.txt"))
        | set(read_split(splits / "train.txt"))
    )
    return sorted(ids - set(read_split(splits / "val.txt")))


class VOCSegmentationDataset(SegmentationDataset):
    """A split of a data set in the VOC layout (VOC 2012, SBD-augmented VOC, or the synthetic set).

    Args:
        voc_root: The folder holding ``JPEGImages`` and ``SegmentationClass`` (e.g. ``VOCdevkit/VOC2012``).
        ids: Image ids of the split.
        num_classes: Number of classes (21 for VOC); mask values must be below it or 255.
        transform: Pipeline from :mod:`deeplab_lit.data.transforms` (default: whole image, ImageNet).
        sbd_root: SBD's ``benchmark_RELEASE/dataset``; ids without a VOC PNG take ``cls/<id>.mat`` from it.
        source: Where ``ids`` came from (named in errors).
    """

    def __init__(
        self,
        voc_root: str | Path,
        ids: Sequence[str],
        num_classes: int = len(VOC_CLASSES),
        transform: SegmentationTransform | None = None,
        sbd_root: str | Path | None = None,
        source: str | Path = "the id list",
    ):
        voc_root = Path(voc_root)
        images = [voc_root / "JPEGImages" / f"{i}.jpg" for i in ids]
        masks = []
        for i in ids:
            png = voc_root / "SegmentationClass" / f"{i}.png"
            if sbd_root is not None and not png.exists():
                png = Path(sbd_root) / "cls" / f"{i}.mat"
            masks.append(png)
        super().__init__(images, masks, num_classes, transform, names=list(ids), source=source)

    def load_mask(self, path: Path) -> np.ndarray:
        """VOC palette PNG (indices) or SBD ``.mat``."""
        return read_sbd_mask(path) if path.suffix == ".mat" else super().load_mask(path)


def voc_split(
    root: str | Path,
    split: str,
    transform: SegmentationTransform | None = None,
) -> VOCSegmentationDataset:
    """Dataset for a VOC 2012 split: ``train_aug`` or any ``ImageSets/Segmentation/<split>.txt``."""
    root = Path(root)
    check_voc_root(root)
    voc = root / VOC_SUBDIR
    if split == "train_aug":
        ids, sbd, source = (
            train_aug_ids(root),
            root / SBD_SUBDIR,
            f"train_aug (SBD train+val + VOC train - val) in {root}",
        )
        return VOCSegmentationDataset(voc, ids, len(VOC_CLASSES), transform, sbd_root=sbd, source=source)
    split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    return VOCSegmentationDataset(voc, read_split(split_file), len(VOC_CLASSES), transform, source=split_file)


def download_voc_sbd(root: str | Path, sbd: bool = True) -> None:
    """Fetch VOC 2012 (and SBD) with torchvision's downloaders into the layout above; skips what exists."""
    from torchvision.datasets import SBDataset, VOCSegmentation

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not (root / VOC_SUBDIR / "JPEGImages").is_dir():
            VOCSegmentation(str(root), year="2012", image_set="train", download=True)
        if sbd and not (root / SBD_SUBDIR / "cls").is_dir():
            # SBDataset extracts benchmark.tgz into its root, then moves benchmark_RELEASE/dataset/* up into
            # that root; giving it root/benchmark_RELEASE/dataset leaves the files where we expect them.
            SBDataset(str(root / SBD_SUBDIR), image_set="train", mode="segmentation", download=True)
    except Exception as err:  # network errors come in many types (URLError, HTTPError, socket, md5 mismatch)
        raise RuntimeError(f"Downloading VOC/SBD into {root} failed: {err}\n{layout_help(root)}") from err
