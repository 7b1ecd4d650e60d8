"""The embedded default data set: shapes on clutter, written once in the VOC layout.

Six classes: ``background`` and five shapes, ``disc``, ``square``, ``triangle``, ``ring`` and
``cross``, each a saturated colour of random hue on a noisy grey stripe texture with distractors of
the background class (how an image is drawn: :func:`render_sample`). Colour and texture tell objects
from most of the background (deliberately easy, so that a small network trained from scratch on a CPU
gets past the all-background phase within its first hundred steps); telling a disc from a ring, a
square from a cross, or a shape from a coloured distractor needs the shape over the object's whole
extent, not one pixel's colour. ``imbalance`` skews the shape classes for studies of class imbalance.

Written as ``root/{JPEGImages,SegmentationClass,ImageSets/Segmentation}`` with a ``synthetic.json``
manifest of the generation parameters. Generation is atomic (a temporary folder renamed into place)
and skipped when the manifest matches; a changed parameter regenerates. Deterministic given ``seed``:
image ``i`` of a split depends only on ``(seed, split, i)`` and the drawing parameters.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from deeplab_lit.data.transforms import IGNORE_INDEX
from deeplab_lit.data.voc import voc_palette

SYNTHETIC_CLASSES: list[str] = ["background", "disc", "square", "triangle", "ring", "cross"]
MANIFEST = "synthetic.json"
FORMAT_VERSION = 4  # bump when the drawing code changes, so old folders regenerate
_SPLIT_CODES = {"train": 0, "val": 1}


def _random_colour(rng: np.random.Generator) -> tuple[int, ...]:
    """Draw a uniformly random RGB colour (the distractors' paint)."""
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _vivid_colour(rng: np.random.Generator) -> tuple[int, ...]:
    """Draw a saturated colour of random hue (the objects' paint)."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return tuple(int(round(255 * c)) for c in rgb)


def _grey(rng: np.random.Generator) -> tuple[int, ...]:
    """Draw a near-grey colour (the background's paint): saturation below 0.15."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.15), rng.uniform(0.2, 0.9))
    return tuple(int(round(255 * c)) for c in rgb)


def _texture(
    rng: np.random.Generator,
    size: int,
    base: tuple[int, ...],
    other: tuple[int, ...],
    strength: float,
    noise: float,
    stripes: bool,
) -> np.ndarray:
    """Float ``(size, size, 3)`` texture: ``base`` blended with ``other`` (stripes or gradient), plus noise.

    ``strength`` in [0, 1] is the weight of ``other`` at its peak, ``noise`` the standard deviation of the
    Gaussian pixel noise; ``stripes=False`` allows only a gradient (or a flat fill).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, math.pi)
    coord = xx * math.cos(angle) + yy * math.sin(angle)
    if stripes:
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(3, 12) * coord + rng.uniform(0, 2 * math.pi))
    else:
        weight = (coord - coord.min()) / (np.ptp(coord) + 1e-6)
    weight = strength * weight[..., None]
    pixels = (1 - weight) * np.array(base, np.float32) + weight * np.array(other, np.float32)
    return pixels + rng.normal(0, noise, (size, size, 3)).astype(np.float32)


#: Circumradius factors giving each polygon the disc's area pi r^2 (areas at circumradius r: square 2 r^2,
#: triangle 3 sqrt(3)/4 r^2, cross with arms 0.72 r wide 2.36 r^2).
_EQUAL_AREA = {
    "square": math.sqrt(math.pi / 2),
    "triangle": math.sqrt(math.pi / (3 * math.sqrt(3) / 4)),
    "cross": math.sqrt(math.pi / (4 * 0.72 - 0.72**2)),
}


def _shape_polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a rotated square, triangle or cross with the area of a disc of radius ``r``."""
    r = r * _EQUAL_AREA[name]
    if name == "square":
        pts: list[tuple[float, float]] = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = r / math.sqrt(2)
    elif name == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        scale = r
    else:  # cross: a plus sign with arms 0.36 r wide
        w = 0.36
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
        scale = r
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts]


def _draw_shape(
    name: str, size: int, cx: float, cy: float, r: float, angle: float, hole: float
) -> np.ndarray:
    """Boolean ``(size, size)`` mask of one shape."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if name in ("disc", "ring"):
        r = r / math.sqrt(1 - hole**2) if name == "ring" else r  # a ring has the disc's area too
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if name == "ring":
            draw.ellipse((cx - hole * r, cy - hole * r, cx + hole * r, cy + hole * r), fill=0)
    else:
        draw.polygon(_shape_polygon(name, cx, cy, r, angle), fill=255)
    return np.asarray(canvas) > 127


def _draw_distractors(rng: np.random.Generator, image: Image.Image, count: int) -> None:
    """Background-class clutter: elongated ellipses, lines and jagged blobs (image only, not the mask)."""
    size = image.width
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        colour = _random_colour(rng)
        cx, cy = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.04, 0.25)
        kind = rng.integers(0, 3)
        if kind == 0:  # ellipse with aspect >= 3 (never a disc)
            layer = Image.new("L", (size, size), 0)
            ImageDraw.Draw(layer).ellipse(
                (cx - r, cy - r / rng.uniform(3, 6), cx + r, cy + r / rng.uniform(3, 6)), fill=255
            )
            layer = layer.rotate(rng.uniform(0, 180), center=(cx, cy))
            image.paste(colour, mask=layer)
        elif kind == 1:  # line or polyline
            pts = [tuple(rng.uniform(0, size, 2)) for _ in range(rng.integers(2, 5))]
            draw.line(pts, fill=colour, width=int(rng.integers(1, max(2, size // 40) + 1)))
        else:  # jagged blob: polygon with strongly varying radius
            n = int(rng.integers(10, 17))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = r * rng.uniform(0.3, 1.0, n)
            draw.polygon(
                [(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii)], fill=colour
            )


#: Tries to place a shape where it touches no earlier shape before it is left out.
_PLACEMENT_ATTEMPTS = 20


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` dilated by ``pixels`` (a square neighbourhood)."""
    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(grown) > 127


def shape_class_probabilities(imbalance: float) -> np.ndarray:
    """Probabilities of the shape classes (ids 1..5): geometric, the first ``imbalance`` x the last."""
    shapes = len(SYNTHETIC_CLASSES) - 1
    weights = float(imbalance) ** (-np.arange(shapes) / (shapes - 1))
    return np.asarray(weights / weights.sum())


def render_sample(
    rng: np.random.Generator,
    size: int,
    max_objects: int,
    void_border: bool,
    object_size: tuple[float, float] = (0.1, 0.33),
    clutter: float = 0.5,
    imbalance: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its mask (object radii log-uniform in ``object_size`` x ``size``).

    Each image holds 1..``max_objects`` shapes at log-uniform sizes; every shape has the area of the disc
    of its radius, so classes are balanced. Each is rotated and painted a saturated colour of random hue
    (nearly flat: a faint gradient and a little noise), so colour says nothing about the class. The
    background is a noisy stripe texture of two near-grey colours, with distractors of the background
    class on it: elongated ellipses, lines and jagged blobs of any colour. Shapes never touch one another
    (each is placed where it keeps a gap of 1/32 of the side to the earlier ones, or left out after 20
    tries): a shape half hidden behind another could be any class, and such labels slow learning
    (BENCHMARKS.md, "Synthetic data: occlusion"). Like VOC, a thin void band (255) runs along every object
    outline, unless ``void_border=False``.

    ``clutter`` in [0, 1] scales the number of flat distractors on the background (up to
    ``6 * clutter``). ``imbalance`` skews the shape classes (:func:`shape_class_probabilities`): drawn
    with probabilities falling geometrically from ``disc`` to ``cross``, the first ``imbalance`` times as
    likely as the last (``cross`` is the rare class); 1 draws every shape class equally likely.

    Returns:
        ``(image, mask)``: uint8 ``(size, size, 3)`` RGB and uint8 ``(size, size)`` class indices / 255.
    """
    pixels = _texture(
        rng, size, _grey(rng), _grey(rng), rng.uniform(0.5, 1.0), rng.uniform(4, 14), stripes=True
    )
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _draw_distractors(rng, image, int(rng.integers(0, round(6 * clutter) + 1)))
    pixels = np.asarray(image).astype(np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)
    taken = np.zeros((size, size), dtype=bool)  # earlier shapes, grown by a gap
    for _ in range(int(rng.integers(1, max_objects + 1))):
        if imbalance == 1:  # the balanced draw as it always was, so the default data set stays the same
            label = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        else:
            label = 1 + int(rng.choice(len(SYNTHETIC_CLASSES) - 1, p=shape_class_probabilities(imbalance)))
        r = size * math.exp(rng.uniform(math.log(object_size[0]), math.log(object_size[1])))
        angle, hole = rng.uniform(0, 2 * math.pi), rng.uniform(0.45, 0.65)
        for _attempt in range(_PLACEMENT_ATTEMPTS):  # a place where the shape touches no earlier one
            cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
            shape = _draw_shape(SYNTHETIC_CLASSES[label], size, cx, cy, r, angle, hole)
            if shape.any() and not (shape & taken).any():
                break
        else:
            continue  # no free place: fewer shapes in this image
        taken |= _grow(shape, max(1, size // 32))
        fill = _texture(
            rng, size, _vivid_colour(rng), _vivid_colour(rng), rng.uniform(0.0, 0.3), 3.0, stripes=False
        )
        pixels[shape] = fill[shape]
        mask[shape] = label
        if void_border:
            outline = Image.fromarray(shape.astype(np.uint8) * 255)
            band = np.asarray(outline.filter(ImageFilter.MaxFilter(3))) != np.asarray(
                outline.filter(ImageFilter.MinFilter(3))
            )
            mask[band] = IGNORE_INDEX
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0, 0.8))
    )
    return np.asarray(image), mask


def _write_split(folder: Path, split: str, count: int, params: dict[str, Any], palette: bytes) -> list[str]:
    ids = []
    for index in range(count):
        rng = np.random.default_rng([params["seed"], _SPLIT_CODES[split], index])
        image, mask = render_sample(
            rng,
            params["image_size"],
            params["max_objects"],
            params["void_border"],
            tuple(params["object_size"]),
            params["clutter"],
            params.get("imbalance", 1.0),
        )
        name = f"{split}_{index:05d}"
        Image.fromarray(image).save(folder / "JPEGImages" / f"{name}.jpg", quality=92)
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(folder / "SegmentationClass" / f"{name}.png")
        ids.append(name)
    return ids


def generate_synthetic(
    root: str | Path,
    num_train: int = 400,
    num_val: int = 80,
    image_size: int = 128,
    max_objects: int = 4,
    object_size: tuple[float, float] = (0.1, 0.33),
    clutter: float = 0.5,
    void_border: bool = True,
    seed: int = 0,
    imbalance: float = 1.0,
) -> Path:
    """Write the synthetic data set under ``root`` unless an identical one is already there.

    Args:
        root: Target folder; it receives ``JPEGImages``, ``SegmentationClass``, ``ImageSets`` and
            ``synthetic.json``. An existing folder without that manifest is never overwritten.
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: Side of the square images in pixels.
        max_objects: Most shapes per image (at least one).
        object_size: ``(min, max)`` object radius as a fraction of ``image_size`` (log-uniform).
        clutter: Background difficulty in [0, 1]: the number of distractors.
        void_border: Draw a thin 255 (ignore) band along object outlines, as VOC does.
        seed: Seed of the whole data set.
        imbalance: How many times likelier the commonest shape class is than the rarest (1: balanced).

    Returns:
        ``root`` as a Path.
    """
    params = {
        "version": FORMAT_VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size,
        "max_objects": max_objects, "object_size": [float(s) for s in object_size],
        "clutter": float(clutter), "void_border": void_border, "seed": seed,
    }  # fmt: skip
    if imbalance != 1:  # recorded only when set, so that default data sets written before it stay valid
        params["imbalance"] = float(imbalance)
    if num_train < 1 or num_val < 1 or image_size < 16 or max_objects < 1:
        raise ValueError(
            f"Synthetic data needs num_train, num_val, max_objects >= 1 and image_size >= 16; got {params}"
        )
    if not imbalance >= 1:
        raise ValueError(f"imbalance must be >= 1 (1: balanced classes), got {imbalance}")
    if not 0 <= clutter <= 1:
        raise ValueError(f"clutter must be in [0, 1], got {clutter}")
    if not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(
            f"object_size must be (min, max) fractions with 0 < min <= max <= 1, got {object_size}"
        )
    root = Path(root)
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root
    if root.exists() and not manifest.is_file() and any(root.iterdir()):
        raise ValueError(
            f"{root} exists and is not a synthetic data set written by deeplab_lit (no {MANIFEST}); "
            "refusing to overwrite it. Choose another root or remove the folder."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        palette = voc_palette().tobytes()
        splits = {
            s: _write_split(tmp, s, n, params, palette) for s, n in (("train", num_train), ("val", num_val))
        }
        splits["trainval"] = splits["train"] + splits["val"]
        for split, ids in splits.items():
            (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(params, indent=2))
        old = None
        if root.exists():  # an outdated synthetic set: move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}-old-", dir=root.parent))
            os.replace(root, old / root.name)
        os.replace(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
