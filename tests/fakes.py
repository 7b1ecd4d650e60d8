"""Tiny data sets written in the exact on-disk layouts of VOC 2012, SBD, Cityscapes and a plain folder.

Every image has its own random size (24-48 px by default), masks hold several classes and some 255
(void) pixels. All functions are deterministic given ``seed`` and return the folder a reader takes.

    make_voc(root, train=..., val=..., extra=...)   -> root/VOCdevkit/VOC2012
    make_sbd(root, train=..., val=...)              -> root/benchmark_RELEASE/dataset
    make_voc_sbd(root)                              -> dict with the ids and the expected train_aug
    make_cityscapes(root, counts={"train": 3, ...}) -> root
    make_folder_dataset(root, n=8, num_classes=3)   -> root
    make_ade20k(root), make_pascal_context(root), make_coco_stuff(root) -> root
    FAKE_DATA[<DataModule class name>](root)        -> root, for the config tests
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from deeplab_lit.data.voc import voc_palette

VOC_TRAIN = ("2007_000032", "2007_000039", "2008_000002", "2008_000008")
VOC_VAL = ("2007_000033", "2009_000001", "2010_000002")


def random_size(rng: np.random.Generator, size_range: tuple[int, int] = (24, 48)) -> tuple[int, int]:
    """``(height, width)`` drawn independently in ``size_range``."""
    h, w = rng.integers(size_range[0], size_range[1] + 1, 2)
    return int(h), int(w)


def random_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` noise."""
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def random_mask(
    rng: np.random.Generator, size: tuple[int, int], values: Sequence[int], void: int | None = 255
) -> np.ndarray:
    """uint8 ``(H, W)`` of rectangles of ``values`` on ``values[0]``, with a void outline row/column."""
    mask = np.full(size, values[0], dtype=np.uint8)
    h, w = size
    for value in values[1:]:
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y : y + h // 3, x : x + w // 3] = value
    if void is not None:
        mask[h // 2, :] = void
        mask[:, w // 2] = void
    return mask


def save_palette_png(path: Path, mask: np.ndarray) -> None:
    """Save ``mask`` as a palette ("P") PNG with the VOC colours, as VOC's SegmentationClass does."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90)


def _voc_values(rng: np.random.Generator, num_classes: int) -> list[int]:
    return [0, *rng.choice(np.arange(1, num_classes), size=2, replace=False).tolist()]


def make_voc(
    root: str | Path,
    train: Sequence[str] = VOC_TRAIN,
    val: Sequence[str] = VOC_VAL,
    extra: Sequence[str] = (),
    num_classes: int = 21,
    seed: int = 0,
) -> Path:
    """Write ``root/VOCdevkit/VOC2012``: JPEGs for ``train + val + extra``, palette masks for ``train + val``.

    ``extra`` ids get an image only (as the VOC images that SBD annotates but VOC does not).
    Writes ``ImageSets/Segmentation/{train,val,trainval}.txt``. Returns the VOC2012 folder.
    """
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for image_id in [*train, *val, *extra]:
        size = random_size(rng)
        save_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", random_image(rng, size))
        if image_id not in extra:
            save_palette_png(
                voc / "SegmentationClass" / f"{image_id}.png",
                random_mask(rng, size, _voc_values(rng, num_classes)),
            )
    splits = voc / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", val), ("trainval", [*train, *val])):
        (splits / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc


def save_sbd_mat(path: Path, segmentation: np.ndarray, num_classes: int = 21) -> None:
    """Write an SBD ``cls`` file: struct ``GTcls`` with Boundaries, Segmentation and CategoriesPresent."""
    boundaries = np.empty((num_classes - 1, 1), dtype=object)
    for k in range(num_classes - 1):
        boundaries[k, 0] = scipy.sparse.csc_matrix(segmentation == k + 1, dtype=np.float64)
    present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)]).astype(np.uint8)
    gtcls = {
        "Boundaries": boundaries,
        "Segmentation": segmentation.astype(np.uint8),
        "CategoriesPresent": present,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"GTcls": gtcls})


def make_sbd(
    root: str | Path,
    train: Sequence[str],
    val: Sequence[str],
    num_classes: int = 21,
    seed: int = 1,
) -> Path:
    """Write ``root/benchmark_RELEASE/dataset/{cls/*.mat, inst/*.mat, img/*.jpg, train.txt, val.txt}``.

    A mask takes the size of the VOC image of the same id when ``make_voc`` wrote one (as real SBD
    masks match VOC's images); SBD masks have no void pixels. Returns the SBD ``dataset`` folder.
    """
    rng = np.random.default_rng(seed)
    sbd = Path(root) / "benchmark_RELEASE" / "dataset"
    voc_images = Path(root) / "VOCdevkit" / "VOC2012" / "JPEGImages"
    for image_id in [*train, *val]:
        voc_jpg = voc_images / f"{image_id}.jpg"
        if voc_jpg.exists():
            image = np.asarray(Image.open(voc_jpg).convert("RGB"))
        else:
            image = random_image(rng, random_size(rng))
        save_jpeg(sbd / "img" / f"{image_id}.jpg", image)
        segmentation = random_mask(rng, image.shape[:2], _voc_values(rng, num_classes), None)
        save_sbd_mat(sbd / "cls" / f"{image_id}.mat", segmentation)
        categories = np.unique(segmentation[segmentation > 0])
        instances = np.searchsorted(categories, segmentation) + 1
        instances[segmentation == 0] = 0
        gtinst = {"Segmentation": instances.astype(np.uint8), "Categories": categories.astype(np.uint8)}
        (sbd / "inst").mkdir(exist_ok=True)
        scipy.io.savemat(sbd / "inst" / f"{image_id}.mat", {"GTinst": gtinst})
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return sbd


def make_voc_sbd(root: str | Path, seed: int = 0) -> dict[str, list[str]]:
    """VOC + SBD whose splits overlap the way the real ones do.

    SBD train holds a VOC train id, a VOC val id and SBD-only ids; SBD val holds a VOC val id and
    SBD-only ids. Returns the id lists and ``"train_aug"``, the expected
    (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted.
    """
    sbd_only = ["2008_000100", "2008_000101", "2009_000200", "2011_000300"]
    sbd_train = [VOC_TRAIN[0], VOC_VAL[0], sbd_only[0], sbd_only[1]]
    sbd_val = [VOC_VAL[1], sbd_only[2], sbd_only[3]]
    make_voc(root, VOC_TRAIN, VOC_VAL, extra=sbd_only, seed=seed)
    make_sbd(root, sbd_train, sbd_val, seed=seed + 1)
    train_aug = sorted((set(sbd_train) | set(sbd_val) | set(VOC_TRAIN)) - set(VOC_VAL))
    return {
        "voc_train": list(VOC_TRAIN), "voc_val": list(VOC_VAL), "sbd_train": sbd_train, "sbd_val": sbd_val,
        "sbd_only": sbd_only, "train_aug": train_aug,
    }  # fmt: skip


#: Raw Cityscapes labelIds used by the fakes: void ids 0-6 and some evaluated/ignored ids.
CITYSCAPES_LABEL_IDS = (0, 1, 3, 6, 7, 8, 11, 14, 24, 26, 33)


def make_cityscapes(
    root: str | Path,
    counts: dict[str, int] | None = None,
    cities: Sequence[str] = ("aachen", "bochum"),
    seed: int = 0,
) -> Path:
    """Write ``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and ``gtFine/.../*_gtFine_labelIds.png``.

    Masks are 8-bit grayscale labelIds drawn from :data:`CITYSCAPES_LABEL_IDS` (void ids 0-6 included).
    ``counts`` is images per split (default train 3, val 2, test 1), spread over ``cities``.
    """
    counts = counts or {"train": 3, "val": 2, "test": 1}
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in counts.items():
        for index in range(count):
            city = cities[index % len(cities)]
            stem = f"{city}_{index:06d}_000019"
            size = random_size(rng)
            image_dir = root / "leftImg8bit" / split / city
            mask_dir = root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_image(rng, size)).save(image_dir / f"{stem}_leftImg8bit.png")
            values = rng.choice(CITYSCAPES_LABEL_IDS, size=4, replace=False).tolist()
            Image.fromarray(random_mask(rng, size, values, void=0), mode="L").save(
                mask_dir / f"{stem}_gtFine_labelIds.png"
            )
    return root


def make_folder_dataset(
    root: str | Path,
    n: int = 8,
    num_classes: int = 3,
    image_dir: str = "images",
    mask_dir: str = "masks",
    suffix: str = ".jpg",
    seed: int = 0,
) -> Path:
    """Write ``root/<image_dir>/img_XXX<suffix>`` and ``root/<mask_dir>/img_XXX.png`` palette masks."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    for index in range(n):
        size = random_size(rng)
        Image.fromarray(random_image(rng, size)).save(root / image_dir / f"img_{index:03d}{suffix}")
        save_palette_png(
            root / mask_dir / f"img_{index:03d}.png", random_mask(rng, size, list(range(num_classes)))
        )
    return root


def _write_pairs(
    rng: np.random.Generator,
    image_dir: Path,
    mask_dir: Path,
    stems: Sequence[str],
    values: Sequence[int],
    void: int | None,
) -> None:
    """JPEG images and 8-bit grayscale PNG masks: rectangles of 4 of ``values`` (``values[0]`` always) on
    ``values[0]``, and every one of ``values`` in the first row (so that each mask holds all of them)."""
    mask_dir.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        size = random_size(rng)
        save_jpeg(image_dir / f"{stem}.jpg", random_image(rng, size))
        chosen = [values[0], *rng.choice(values[1:], size=3, replace=False).tolist()]
        mask = random_mask(rng, size, chosen, void)
        mask[0, : len(values)] = values
        Image.fromarray(mask, mode="L").save(mask_dir / f"{stem}.png")


#: Stored ADE20K values used by the fakes: 0 ("other", void) and classes at both ends.
ADE20K_VALUES = (0, 1, 2, 13, 100, 149, 150)


def make_ade20k(root: str | Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``root/ADEChallengeData2016/{images,annotations}/<split>/ADE_<split>_<n>.{jpg,png}``.

    Masks hold :data:`ADE20K_VALUES` (0 as the background of every mask, no 255, as in ADE20K).
    ``counts``: images per split (default training 3, validation 2).
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "ADEChallengeData2016"
    for split, count in (counts or {"training": 3, "validation": 2}).items():
        stems = [f"ADE_{'train' if split == 'training' else 'val'}_{n:08d}" for n in range(1, count + 1)]
        _write_pairs(rng, base / "images" / split, base / "annotations" / split, stems, ADE20K_VALUES, None)
    return Path(root)


#: Stored PASCAL-Context values used by the fakes: 0 (background) and classes at both ends, 255 outlines.
PASCAL_CONTEXT_VALUES = (0, 1, 2, 30, 58, 59)


def make_pascal_context(root: str | Path, train: int = 3, val: int = 2, seed: int = 0) -> Path:
    """Write ``root/VOCdevkit/VOC2010/``: ``JPEGImages``, ``SegmentationClassContext`` (8-bit values) and
    ``ImageSets/SegmentationContext/{train,val}.txt``; masks hold :data:`PASCAL_CONTEXT_VALUES` and 255."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "VOCdevkit" / "VOC2010"
    ids = {"train": [f"2008_{n:06d}" for n in range(train)], "val": [f"2010_{n:06d}" for n in range(val)]}
    splits = base / "ImageSets" / "SegmentationContext"
    splits.mkdir(parents=True, exist_ok=True)
    for split, stems in ids.items():
        _write_pairs(
            rng, base / "JPEGImages", base / "SegmentationClassContext", stems, PASCAL_CONTEXT_VALUES, 255
        )
        (splits / f"{split}.txt").write_text("".join(f"{i}\n" for i in stems))
    return Path(root)


#: Stored COCO-Stuff values (category id - 1) used by the fakes: things, unused ids (11, 25), stuff.
COCO_STUFF_VALUES = (0, 10, 11, 12, 25, 90, 91, 181)


def make_coco_stuff(root: str | Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``root/images/<split>/<id>.jpg`` and ``root/annotations/<split>/<id>.png`` (stuffthingmaps).

    Masks hold :data:`COCO_STUFF_VALUES` and 255 (unlabelled) outlines. ``counts``: images per split
    (default train2017 3, val2017 2).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (counts or {"train2017": 3, "val2017": 2}).items():
        stems = [f"{n:012d}" for n in range(1, count + 1)]
        _write_pairs(
            rng, root / "images" / split, root / "annotations" / split, stems, COCO_STUFF_VALUES, 255
        )
    return root


#: Colours of the fake RGB-mask folder: index = value (black, red, green, white).
FOLDER_COLORS = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 255))


def make_color_folder_dataset(root: str | Path, n: int = 4, seed: int = 0) -> Path:
    """Write ``root/images/img_XXX.jpg`` and ``root/masks/img_XXX.png`` RGB masks in :data:`FOLDER_COLORS`."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    colors = np.array(FOLDER_COLORS, dtype=np.uint8)
    for index in range(n):
        size = random_size(rng)
        save_jpeg(root / "images" / f"img_{index:03d}.jpg", random_image(rng, size))
        values = random_mask(rng, size, list(range(len(colors))), None)
        Image.fromarray(colors[values]).save(root / "masks" / f"img_{index:03d}.png")
    return root


def spoil_mask(path: Path, value: int) -> None:
    """Write ``value`` into pixel (0, 0) of the 8-bit grayscale mask at ``path``."""
    pixels = np.array(Image.open(path))
    pixels[0, 0] = value
    Image.fromarray(pixels, mode="L").save(path)


def stored_and_mapped(datamodule: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(stored mask as int64, mask as the data module yields it)`` of every validation item."""
    datamodule.setup("validate")
    dataset = datamodule.val_dataset
    return [
        (np.array(Image.open(path)).astype(np.int64), dataset[i]["mask"].numpy())
        for i, path in enumerate(dataset.masks)
    ]


#: Fake data of each data module, in its real layout: class name -> writer of ``root``.
FAKE_DATA: dict[str, Callable[[Path], Path]] = {
    "VOCDataModule": lambda root: (make_voc_sbd(root), root)[1],
    "CityscapesDataModule": make_cityscapes,
    "ADE20KDataModule": make_ade20k,
    "PascalContextDataModule": make_pascal_context,
    "COCOStuffDataModule": make_coco_stuff,
}
