"""Image and mask files: decoding with clear errors, and the lists of images that `predict` runs over.

Every file a data set touches is read here, so that a missing, truncated or corrupt file stops with
one message that names it. Truncated JPEGs are errors: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES``
is deliberately left False (a half-decoded image would silently train on grey pixels).

Images become 8-bit RGB the way an image viewer shows them, whatever the camera or scanner wrote
(:func:`pixels_to_rgb`): grayscale is repeated over three channels, 16-bit grayscale is scaled to 8 bits
(``round(v / 257)``, so 65535 -> 255: a plain ``convert("RGB")`` clips every value above 255 to white),
palette, CMYK, YCbCr, Lab and 1-bit images are converted by Pillow, and transparent pixels are composited
over :data:`TRANSPARENT_BACKGROUND`. Float images have no defined value range and are refused.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from deeplab_lit.data.labels import LabelMap
from deeplab_lit.data.transforms import IGNORE_INDEX, SegmentationTransform, eval_transform

#: File suffixes (lower case) treated as images when listing folders and globs.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: Pillow modes that hold one class index per pixel.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")
#: Colour that transparent pixels are composited over: white, what a web page or a document shows under a
#: transparent PNG (viewers that draw a checkerboard have no single colour to match). The colour stored
#: under a fully transparent pixel is arbitrary (often black) and never meant to be seen, so it is not used.
TRANSPARENT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
#: A dataset's ``transform``: ``(image uint8 (H, W, 3), mask uint8 (H, W) or None) -> (image, mask)``, e.g. a
#: :class:`~deeplab_lit.data.transforms.SegmentationTransform` (the preflight swaps in one returning sizes).
PairTransform = Callable[[np.ndarray, np.ndarray | None], tuple[Any, Any]]
#: Pillow modes of 16-bit grayscale (PNG, TIFF, PGM); mode "I" is read as 16-bit too, see pixels_to_rgb.
_GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
#: Modes with an alpha channel (``"RGBa"`` is premultiplied; Pillow un-multiplies it when converting).
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
#: Modes that Pillow converts to RGB exactly, as viewers show them (CMYK without colour management).
_RGB_CONVERTIBLE_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB")
#: EXIF tag of the orientation, and its values that turn the image by 90 degrees (swap width and height).
_EXIF_ORIENTATION = 0x0112
_EXIF_QUARTER_TURNS = (5, 6, 7, 8)
#: What opening or decoding an untrusted file can raise: Pillow raises OSError, SyntaxError and ValueError
#: for bad data, ``Image.DecompressionBombError`` (a plain Exception) for images above
#: ``Image.MAX_IMAGE_PIXELS``, and its format plugins let others through on malformed headers
#: (``struct.error``, ``IndexError``, ``ZeroDivisionError``, ...). Each means "this file cannot be read".
_UNDECODABLE = (Exception,)


def _open(path: str | Path) -> Image.Image:
    """Open and fully decode ``path``; missing -> FileNotFoundError, undecodable -> ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except PermissionError:
        raise  # "Permission denied: <path>" is the right message; it is no decoding problem
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"Could not read image file {path}: {err} If you trust the file, raise "
            "PIL.Image.MAX_IMAGE_PIXELS."
        ) from err
    except _UNDECODABLE as err:
        raise ValueError(
            f"Could not decode image file {path}: {err}. The file is truncated, corrupt or not an image; "
            "re-download or re-export it."
        ) from err
    return image


def _gray16_to_rgb(image: Image.Image, path: str | Path) -> np.ndarray:
    """16-bit grayscale -> 8-bit RGB by ``round(v / 257)``, the scaling that maps 0..65535 onto 0..255.

    Mode ``"I"`` (32-bit integers) is how Pillow opens 16-bit PGM files (and 16-bit PNGs in old releases);
    its values are taken as 16-bit data, and values outside 0..65535 are an error rather than a guess.
    """
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"Image file {path} has mode {image.mode!r} with values {values.min()}..{values.max()}; expected "
            "16-bit data (0..65535). Rescale it to 8 or 16 bits per channel and save it again."
        )
    gray = ((values + 128) // 257).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _composite(image: Image.Image) -> np.ndarray:
    """RGB of ``image`` over :data:`TRANSPARENT_BACKGROUND`, by its alpha (rounded to the nearest value)."""
    rgba = np.asarray(image.convert("RGBA")).astype(np.uint16)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    background = np.asarray(TRANSPARENT_BACKGROUND, dtype=np.uint16)
    return ((rgb * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)


def pixels_to_rgb(image: Image.Image, path: str | Path = "<image>") -> np.ndarray:
    """Convert a decoded ``image`` to 8-bit RGB, the way an image viewer shows it.

    - 16-bit grayscale (``I;16*``, and ``I`` holding 16-bit values): ``round(v / 257)`` on every channel.
    - Alpha (RGBA, LA, PA) or a transparent colour (``transparency`` of P, L and RGB files): composited
      over :data:`TRANSPARENT_BACKGROUND`.
    - RGB, grayscale, 1-bit, palette, CMYK, YCbCr, Lab: Pillow's conversion (CMYK without an ICC profile).

    Args:
        image: A decoded Pillow image.
        path: The file it came from, named in errors.

    Returns:
        ``uint8`` array ``(H, W, 3)``, a writable copy.

    Raises:
        ValueError: a mode that has no defined mapping to colours (float ``"F"``, 32-bit values, ...).
    """
    mode = image.mode
    if mode in _GRAY16_MODES:
        return _gray16_to_rgb(image, path)
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite(image)
    if mode in _RGB_CONVERTIBLE_MODES:
        return np.array(image.convert("RGB"), dtype=np.uint8)
    reason = (
        "floating-point pixels have no defined range (0..1? 0..255? physical units?)"
        if mode == "F"
        else "it has no defined mapping to RGB colours"
    )
    raise ValueError(
        f"Image file {path} has the unsupported mode {mode!r}: {reason}. Supported: 8- and 16-bit "
        "grayscale, RGB, with or without alpha, palette, CMYK, YCbCr, Lab and 1-bit. Convert it to one "
        "of these (e.g. 8-bit RGB) and save it again."
    )


def exif_orientation(path: str | Path) -> int:
    """EXIF orientation tag of an image file: 1 (as stored) to 8; 1 when it has none or it is unreadable."""
    try:
        with Image.open(path) as image:
            value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except _UNDECODABLE:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _exif_transposed(image: Image.Image, path: str | Path) -> Image.Image:
    """``image`` turned as its EXIF orientation says, or one ValueError naming the file."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as err:  # malformed EXIF blocks
        raise ValueError(
            f"Could not apply the EXIF orientation of image file {path}: {err}. Its EXIF block is corrupt; "
            "strip it (e.g. `exiftool -all= FILE`) or save the image again."
        ) from err


def read_image(path: str | Path, *, exif_transpose: bool = False) -> np.ndarray:
    """Read an image file as 8-bit RGB pixels, the way a viewer shows them (see :func:`pixels_to_rgb`).

    Args:
        path: Image file (any format Pillow decodes: JPEG, PNG, TIFF, ...).
        exif_transpose: Turn the pixels as the EXIF orientation tag says (photos from phones), as every
            viewer does; ``predict`` does. Off for data sets, whose masks are drawn on the stored pixel
            grid (:class:`SegmentationDataset` explains a mask that fits only the turned image).

    Returns:
        ``uint8`` array ``(H, W, 3)`` in RGB order, a writable copy (``torch.from_numpy`` warns otherwise).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded (truncated, corrupt, not an image), its EXIF block is
            corrupt, or its pixel mode has no defined mapping to colours.
    """
    image = _open(path)
    if exif_transpose:
        image = _exif_transposed(image, path)
    return pixels_to_rgb(image, path)


def read_mask(path: str | Path, colors: bool = False) -> np.ndarray:
    """Read a label mask stored as one class index per pixel, or as colours.

    Palette (``"P"``) PNGs, as VOC stores them, are read as their palette *indices*, not their colours;
    grayscale (``"L"``) and 16-bit PNGs are read as their values.

    Args:
        path: Mask file, normally a PNG.
        colors: Read the colours instead (``(H, W, 3)`` RGB; alpha dropped), for data sets whose masks
            are painted in a palette's colours (:func:`deeplab_lit.data.labels.palette_decoding`).

    Returns:
        Integer array ``(H, W)`` (``uint8`` for palette/grayscale files), or uint8 ``(H, W, 3)`` colours.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded, or it holds colours (RGB/RGBA) instead of indices.
    """
    image = _open(path)
    if colors:
        return np.array(image.convert("RGB"), dtype=np.uint8)
    if image.mode not in _INDEX_MODES:
        raise ValueError(
            f"Mask file {path} has image mode {image.mode!r}; expected one class index per pixel "
            "(a palette 'P' or grayscale 'L' PNG). Convert colour masks to index masks first, or give "
            "the data set the palette of their colours (FolderDataModule's palette option)."
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


def mask_size_mismatch(
    image_path: Path, image_size: tuple[int, ...], mask_path: Path, mask_size: tuple[int, ...]
) -> str:
    """Explain a mask whose ``(H, W)`` differs from its image's stored ``(H, W)``.

    When the image carries an EXIF orientation that turns it by 90 degrees and the mask fits the turned
    size, the mask was drawn on the image as a viewer shows it; the message says so and how to fix it.
    """
    message = (
        f"Mask {mask_path} is {mask_size[1]}x{mask_size[0]} (WxH) but its image {image_path} is "
        f"{image_size[1]}x{image_size[0]}; a mask must have its image's size"
    )
    orientation = exif_orientation(image_path)
    if orientation in _EXIF_QUARTER_TURNS and tuple(mask_size) == tuple(image_size[::-1]):
        message += (
            f". The image carries EXIF orientation {orientation} (viewers show it turned by 90 degrees) and "
            "the mask fits the turned image: it was drawn on the image as viewers show it. Data sets are "
            "read on the stored pixel grid, without EXIF turns; store the image turned (e.g. "
            "`PIL.ImageOps.exif_transpose(Image.open(f)).save(f)`, or `exiftran -ai f` for JPEGs, lossless)"
        )
    return message


class SegmentationDataset(Dataset[dict[str, Any]]):
    """Pairs of image and mask files, decoded, checked and transformed.

    Items are ``{"image": float32 (3, H, W) normalised, "mask": int64 (H, W) with 255 = ignore,
    "name": str}``. Every file is checked for existence at construction (so a bad list fails before
    training starts); each mask is checked against its image's size and the class range when read.

    Images are read on their stored pixel grid, ignoring any EXIF orientation tag: annotations of the
    public data sets are drawn on that grid. A mask that fits only the image as turned by its EXIF tag
    (width and height swapped) is an error that says so; a 180-degree or mirroring tag cannot be told
    from the sizes, and such images are read as stored.

    Args:
        images: Image files.
        masks: Mask files, one per image, same order.
        num_classes: Number of classes; mask values must lie in ``[0, num_classes)`` or be 255.
        transform: Callable ``(image uint8 (H,W,3), mask) -> (image tensor, mask tensor)``; default:
            whole image with ImageNet normalisation.
        names: Item names (default: the image file stems).
        source: Where the list came from (a split file, a folder), named in errors.
        label_map: Applied to the raw mask values (or colours) after the size check, before the class
            check (e.g. Cityscapes labelIds -> trainIds); see :mod:`deeplab_lit.data.labels`.
    """

    def __init__(
        self,
        images: Sequence[Path],
        masks: Sequence[Path],
        num_classes: int,
        transform: PairTransform | None = None,
        names: Sequence[str] | None = None,
        source: str | Path = "the file list",
        label_map: LabelMap | None = None,
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
        self.transform: PairTransform = transform if transform is not None else eval_transform()
        self.source = str(source)
        self.label_map = label_map
        check_files_exist(self.images, "image", source)
        check_files_exist(self.masks, "mask", source)

    def __len__(self) -> int:
        return len(self.images)

    def load_mask(self, path: Path) -> np.ndarray:
        """Decode one mask file into raw values ``(H, W)``; subclasses add formats (SBD ``.mat``)."""
        return read_mask(path, colors=self.label_map is not None and self.label_map.colors is not None)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.images[index], self.masks[index]
        image = read_image(image_path)
        mask = self.load_mask(mask_path)
        if mask.shape[:2] != image.shape[:2]:
            raise ValueError(mask_size_mismatch(image_path, image.shape[:2], mask_path, mask.shape[:2]))
        if self.label_map is not None:
            mask = self.label_map(mask, mask_path)
        _check_mask_values(mask, self.num_classes, mask_path)
        image_t, mask_t = self.transform(image, mask.astype(np.uint8, copy=False))
        return {"image": image_t, "mask": mask_t, "name": self.names[index]}


def relative_names(paths: Sequence[Path]) -> list[str]:
    """Output names for ``paths``: each path below the inputs' common folder, without its extension.

    The folder structure is mirrored, never flattened: ``photos/a/x.jpg`` and ``photos/b/x.jpg`` become
    ``a/x`` and ``b/x`` (``/``-separated); a single file or a flat folder gives the plain stems. Inputs
    that would still share a name (``x.jpg`` and ``x.png`` in one folder) keep their extension:
    ``x.jpg`` and ``x.png``. A name can still repeat only when a file is named like another one with its
    extension (``x.jpg``, ``x.png`` and ``x.jpg.png``); the prediction writer refuses that before any work.

    Args:
        paths: Input files.

    Returns:
        One name per path, same order.
    """
    resolved = [p.resolve() for p in paths]
    base = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    relative = [p.relative_to(base).as_posix() for p in resolved]
    # string slicing, not with_suffix(""): a file named "..jpg" has the stem "." that Path refuses
    names = [rel[: len(rel) - len(p.suffix)] for rel, p in zip(relative, resolved)]
    counts = Counter(names)
    return [rel if counts[name] > 1 else name for rel, name in zip(relative, names)]


class ImageFileDataset(Dataset[dict[str, Any]]):
    """Images without masks, for ``predict``: ``{"image", "name", "path"}`` items.

    Images are turned as their EXIF orientation says, so they are segmented, and their masks written,
    the way viewers show them. A file that cannot be read (corrupt, truncated, unsupported mode, gone)
    does not raise here: its item is ``{"image": None, "name", "path", "error": <the reason>}``, and the
    predict loader's collate (``deeplab_lit.data.loaders.eval_collate``) moves it to the batch's
    ``"skipped"`` list, where :class:`~deeplab_lit.callbacks.PredictionWriter` warns about it and lists it
    at the end (or stops, with ``skip_unreadable=False``). A folder of photos with one bad file is thus
    still predicted; the decision to stop is taken in the main process, where it can name the file.

    Args:
        path: An image file, a folder of images, or a glob (see :func:`list_images`).
        transform: Evaluation transform (whole image, normalised); default ImageNet normalisation.
    """

    def __init__(self, path: str | Path, transform: SegmentationTransform | None = None):
        self.paths = list_images(path)
        self.names = relative_names(self.paths)
        self.transform = transform if transform is not None else eval_transform()

    def __len__(self) -> int:
        return len(self.paths)

    def displayed_sizes(self) -> list[tuple[int, int] | None]:
        """``(height, width)`` of every image as viewers show it, from the file headers (no decoding).

        None for a file whose header cannot be read (its item will be skipped or stop the run).
        """
        sizes: list[tuple[int, int] | None] = []
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    width, height = image.size
                    turned = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            except _UNDECODABLE:  # a decompression bomb too: its item is skipped or stops the run
                sizes.append(None)
                continue
            sizes.append((width, height) if turned else (height, width))
        return sizes

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            pixels = read_image(path, exif_transpose=True)
        except (OSError, ValueError) as err:  # FileNotFoundError and PermissionError are OSErrors
            return {"image": None, "name": self.names[index], "path": str(path), "error": str(err)}
        image, _ = self.transform(pixels, None)
        return {"image": image, "name": self.names[index], "path": str(path)}
