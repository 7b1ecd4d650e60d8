"""Image and mask files: decoding with clear errors, and the lists of images that `predict` runs over.

Every file a data set touches is read here, so that a missing, truncated or corrupt file stops with
one message that names it. Truncated JPEGs are errors: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES``
is deliberately left False (a half-decoded image would silently train on grey pixels).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from deeplab_lit.data.transforms import IGNORE_INDEX, SegmentationTransform, eval_transform

#: File suffixes (lower case) treated as images when listing folders and globs.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: Pillow modes that hold one class index per pixel.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


def _open(path: str | Path) -> Image.Image:
    """Open and fully decode ``path``; missing -> FileNotFoundError, undecodable -> ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # Pillow raises all three for bad data
        raise ValueError(
            f"Could not decode image file {path}: {err}. The file is truncated, corrupt or not an image; "
            "re-download or re-export it."
        ) from err
    return image


def read_image(path: str | Path, *, exif_transpose: bool = False) -> np.ndarray:
    """Read an image file as RGB pixels.

    Args:
        path: Image file (any format Pillow decodes: JPEG, PNG, ...).
        exif_transpose: Rotate the pixels as the EXIF orientation tag says (photos from phones).
            Off for data sets, whose masks were drawn on the stored pixel grid.

    Returns:
        ``uint8`` array ``(H, W, 3)`` in RGB order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded (truncated, corrupt, not an image).
    """
    image = _open(path)
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    return np.array(
        image.convert("RGB"), dtype=np.uint8
    )  # a writable copy (torch.from_numpy warns otherwise)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask stored as one class index per pixel.

    Palette (``"P"``) PNGs, as VOC stores them, are read as their palette *indices*, not their colours;
    grayscale (``"L"``) and 16-bit PNGs are read as their values.

    Args:
        path: Mask file, normally a PNG.

    Returns:
        Integer array ``(H, W)`` (``uint8`` for palette/grayscale files).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded, or it holds colours (RGB/RGBA) instead of indices.
    """
    image = _open(path)
    if image.mode not in _INDEX_MODES:
        raise ValueError(
            f"Mask file {path} has image mode {image.mode!r}; expected one class index per pixel "
            "(a palette 'P' or grayscale 'L' PNG). Convert colour masks to index masks first."
        )
    return np.array(image)


def check_files_exist(paths: Sequence[Path], what: str, source: str | Path) -> None:
    """Raise one FileNotFoundError if any of ``paths`` is missing (cheap: ``Path.exists`` only).

    Args:
        paths: Files a split refers to.
        what: What they are, for the message ("image", "mask").
        source: Where the list came from (a split file, a folder), for the message.
    """
    missing = [p for p in paths if not p.exists()]
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} {what} files listed by {source} do not exist:\n  {shown}{more}"
        )


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(path: str | Path) -> list[Path]:
    """List the images that ``path`` names: an image file, a folder (not recursive) or a glob.

    Globs follow :func:`glob.glob` with ``recursive=True``, so ``photos/**/*.jpg`` walks sub-folders.
    Files are returned sorted; files whose suffix is not in :data:`IMAGE_SUFFIXES` are left out of
    folder and glob listings.

    Args:
        path: An image file, a folder of images, or a glob pattern.

    Returns:
        Sorted list of image paths (at least one).

    Raises:
        FileNotFoundError: nothing exists at ``path`` or it matches no image.
        ValueError: ``path`` is a single file that is not an image.
    """
    text = str(path)
    candidate = Path(text).expanduser()
    if candidate.is_file():
        if candidate.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{candidate} is not an image file; expected one of {', '.join(IMAGE_SUFFIXES)}")
        return [candidate]
    if candidate.is_dir():
        found = sorted(p for p in candidate.iterdir() if _is_image(p))
        where = f"folder {candidate}"
    elif glob.has_magic(text):
        found = sorted(p for p in map(Path, glob.glob(str(candidate), recursive=True)) if _is_image(p))
        where = f"glob pattern {text!r}"
    else:
        raise FileNotFoundError(f"No image file, folder or glob match at {text!r}: it does not exist")
    if not found:
        raise FileNotFoundError(
            f"No images found in {where}; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    return found


def _check_mask_values(mask: np.ndarray, num_classes: int, path: Path) -> None:
    """Raise if ``mask`` holds values outside ``[0, num_classes) ∪ {255}``."""
    bad = mask[(mask >= num_classes) & (mask != IGNORE_INDEX) | (mask < 0)]
    if bad.size:
        values = np.unique(bad)
        shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if values.size > 10 else "")
        raise ValueError(
            f"Mask {path} holds values [{shown}] outside the classes: expected 0..{num_classes - 1} "
            f"({num_classes} classes) or {IGNORE_INDEX} (ignore)"
        )


class SegmentationDataset(Dataset):
    """Pairs of image and mask files, decoded, checked and transformed.

    Items are ``{"image": float32 (3, H, W) normalised, "mask": int64 (H, W) with 255 = ignore,
    "name": str}``. Every file is checked for existence at construction (so a bad list fails before
    training starts); each mask is checked against its image's size and the class range when read.

    Args:
        images: Image files.
        masks: Mask files, one per image, same order.
        num_classes: Number of classes; mask values must lie in ``[0, num_classes)`` or be 255.
        transform: Callable ``(image uint8 (H,W,3), mask) -> (image tensor, mask tensor)``; default:
            whole image with ImageNet normalisation.
        names: Item names (default: the image file stems).
        source: Where the list came from (a split file, a folder), named in errors.
        label_map: Optional lookup table applied to raw mask values before the class check (e.g.
            Cityscapes labelIds -> trainIds); entries < 0 mark raw values that are not allowed.
    """

    def __init__(
        self,
        images: Sequence[Path],
        masks: Sequence[Path],
        num_classes: int,
        transform: SegmentationTransform | None = None,
        names: Sequence[str] | None = None,
        source: str | Path = "the file list",
        label_map: np.ndarray | None = None,
    ):
        if len(images) != len(masks):
            raise ValueError(f"{source}: {len(images)} images but {len(masks)} masks")
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX}, got {num_classes}")
        if not images:
            raise ValueError(f"{source} lists no images: the split is empty")
        self.images = [Path(p) for p in images]
        self.masks = [Path(p) for p in masks]
        self.names = list(names) if names is not None else [p.stem for p in self.images]
        self.num_classes = num_classes
        self.transform = transform if transform is not None else eval_transform()
        self.source = str(source)
        self.label_map = label_map
        check_files_exist(self.images, "image", source)
        check_files_exist(self.masks, "mask", source)

    def __len__(self) -> int:
        return len(self.images)

    def load_mask(self, path: Path) -> np.ndarray:
        """Decode one mask file into raw values ``(H, W)``; subclasses add formats (SBD ``.mat``)."""
        return read_mask(path)

    def _mapped(self, raw: np.ndarray, path: Path) -> np.ndarray:
        assert self.label_map is not None
        lut = self.label_map
        bad = raw[(raw < 0) | (raw >= len(lut))]
        if not bad.size:
            mapped = lut[raw]
            bad = raw[mapped < 0]
        if bad.size:
            known = np.flatnonzero(lut >= 0)
            raise ValueError(
                f"Mask {path} holds label values {[int(v) for v in np.unique(bad)[:10]]} that the label "
                f"map does not define; expected values in {known.min()}..{known.max()}"
            )
        return mapped.astype(np.uint8)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.images[index], self.masks[index]
        image = read_image(image_path)
        mask = self.load_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}; a mask must have its image's size"
            )
        if self.label_map is not None:
            mask = self._mapped(mask, mask_path)
        _check_mask_values(mask, self.num_classes, mask_path)
        image_t, mask_t = self.transform(image, mask.astype(np.uint8, copy=False))
        return {"image": image_t, "mask": mask_t, "name": self.names[index]}


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Output names for ``paths``: the file stem, or the path below the common folder when stems repeat.

    ``a/x.jpg`` and ``b/x.jpg`` become ``a__x`` and ``b__x``, so predictions never overwrite each other.
    """
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    base = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return ["__".join(p.resolve().relative_to(base).with_suffix("").parts) for p in paths]


class ImageFileDataset(Dataset):
    """Images without masks, for ``predict``: ``{"image", "name", "path"}`` items.

    Args:
        path: An image file, a folder of images, or a glob (see :func:`list_images`).
        transform: Evaluation transform (whole image, normalised); default ImageNet normalisation.
    """

    def __init__(self, path: str | Path, transform: SegmentationTransform | None = None):
        self.paths = list_images(path)
        self.names = unique_names(self.paths)
        self.transform = transform if transform is not None else eval_transform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image, _ = self.transform(read_image(path, exif_transpose=True), None)
        return {"image": image, "name": self.names[index], "path": str(path)}
