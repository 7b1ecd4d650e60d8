"""Pictures of segmentations: label masks in a palette, overlays on the image, confusion-matrix plots.

Numpy and Pillow (text), plus matplotlib imported only by the plotting functions: no Lightning, no torch
needed, so the prediction gallery, the notebooks and the prediction writer share one way of drawing. Arrays
follow the image convention: ``(H, W, 3)`` uint8 RGB for pictures, ``(H, W)`` integer class indices for masks
(255 = void), ``(256, 3)`` uint8 for a palette (index = class id; every datamodule has one as ``.palette``).

Example:
    >>> panel = side_by_side([image, overlay(image, mask, palette), overlay(image, pred, palette)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # matplotlib is optional: imported by the plotting functions only
    from matplotlib.figure import Figure


def _as_mask(mask: Any) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"a label mask must be a 2-D integer array (H, W), got {mask.dtype} {mask.shape}")
    return mask


def _as_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"an image must be uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
    return image


def colorize(mask: Any, palette: Any) -> np.ndarray:
    """Paint a label mask with a palette.

    Args:
        mask: ``(H, W)`` integer class indices (255 = void).
        palette: ``(K, 3)`` uint8 colours, index = class id; K must exceed every label in ``mask``
            (K = 256 covers the void label).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    mask = _as_mask(mask)
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be (K, 3) RGB colours, got shape {palette.shape}")
    if mask.size and (mask.min() < 0 or mask.max() >= len(palette)):
        raise ValueError(
            f"mask labels span {mask.min()}..{mask.max()} but the palette has {len(palette)} colours"
        )
    return palette[mask]


def overlay(
    image: Any, mask: Any, palette: Any, alpha: float = 0.5, ignore_index: int | None = None
) -> np.ndarray:
    """Blend a palette-coloured mask over an image: ``(1 - alpha) * image + alpha * colour``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` integer class indices of the same size.
        palette: ``(K, 3)`` uint8 colours (see :func:`colorize`).
        alpha: Opacity of the mask, 0 (image only) to 1 (mask only).
        ignore_index: Label left uncoloured (the image shows through); None colours every label,
            the void label included (VOC's palette gives it a cream colour).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    image = _as_image(image)
    mask = _as_mask(mask)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blended = (1.0 - alpha) * image + alpha * colorize(mask, palette).astype(np.float64)
    if ignore_index is not None:
        keep = mask == ignore_index
        blended[keep] = image[keep]
    return np.rint(blended).astype(np.uint8)


def side_by_side(panels: Sequence[Any], gap: int = 4, fill: int = 255) -> np.ndarray:
    """Concatenate ``(H, W, 3)`` uint8 pictures of one height left to right, ``gap`` pixels apart.

    Returns:
        ``(H, sum(W) + gap * (len(panels) - 1), 3)`` uint8.
    """
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    panels = [_as_image(p) for p in panels]
    heights = {p.shape[0] for p in panels}
    if len(heights) != 1:
        raise ValueError(f"panels must share one height, got heights {sorted(heights)}")
    spacer = np.full((panels[0].shape[0], gap, 3), fill, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for index, panel in enumerate(panels):
        parts += [spacer, panel] if index else [panel]
    return np.concatenate(parts, axis=1)


#: Height in pixels of one line of text drawn by :func:`text_strip` and :func:`legend`.
TEXT_HEIGHT = 14
#: Width in pixels of one legend entry (colour swatch and class name).
LEGEND_CELL = 112


def stack(pictures: Sequence[Any], gap: int = 4, fill: int = 255) -> np.ndarray:
    """Stack ``(H, W, 3)`` uint8 pictures top to bottom, ``gap`` pixels apart, left-aligned.

    Narrower pictures are padded on the right with ``fill``.

    Returns:
        ``(sum(H) + gap * (len(pictures) - 1), max(W), 3)`` uint8.
    """
    if not pictures:
        raise ValueError("stack needs at least one picture")
    pictures = [_as_image(p) for p in pictures]
    width = max(p.shape[1] for p in pictures)
    parts: list[np.ndarray] = []
    for index, picture in enumerate(pictures):
        if index and gap:
            parts.append(np.full((gap, width, 3), fill, dtype=np.uint8))
        pad = np.full((picture.shape[0], width - picture.shape[1], 3), fill, dtype=np.uint8)
        parts.append(np.concatenate([picture, pad], axis=1))
    return np.concatenate(parts, axis=0)


def text_strip(text: str, width: int, fill: int = 255) -> np.ndarray:
    """One line of black text on a ``(TEXT_HEIGHT, width, 3)`` uint8 strip, cut to the width.

    Uses Pillow's default font, so no font file is needed.
    """
    strip = Image.new("RGB", (max(1, width), TEXT_HEIGHT), (fill, fill, fill))
    _draw_text(ImageDraw.Draw(strip), (2, 1), text, width - 4)
    return np.asarray(strip).copy()


def legend(entries: Sequence[tuple[int, str]], palette: Any, width: int, fill: int = 255) -> np.ndarray:
    """Colour swatches with class names, ``LEGEND_CELL`` pixels per entry, as many per line as fit.

    Args:
        entries: ``(label, name)`` pairs, e.g. ``[(0, "background"), ..., (255, "void")]``.
        palette: ``(K, 3)`` uint8 colours, index = label.
        width: Width of the legend in pixels.
        fill: Background grey level.

    Returns:
        ``(lines * TEXT_HEIGHT, width, 3)`` uint8 with
        ``lines = ceil(len(entries) / max(1, width // LEGEND_CELL))``.
    """
    palette = np.asarray(palette, dtype=np.uint8)
    per_line = max(1, width // LEGEND_CELL)
    lines = -(-len(entries) // per_line)
    picture = Image.new("RGB", (max(1, width), lines * TEXT_HEIGHT), (fill, fill, fill))
    draw = ImageDraw.Draw(picture)
    for index, (label, name) in enumerate(entries):
        x, y = (index % per_line) * LEGEND_CELL, (index // per_line) * TEXT_HEIGHT
        colour = tuple(int(c) for c in palette[label])
        draw.rectangle((x + 2, y + 2, x + 11, y + 11), fill=colour, outline=(0, 0, 0))
        _draw_text(draw, (x + 15, y + 1), name, min(LEGEND_CELL, width) - 17)
    return np.asarray(picture).copy()


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, room: float) -> None:
    """Draw ``text`` in black at ``xy``, dropping characters at the end until it fits in ``room`` pixels."""
    font = ImageFont.load_default()
    while text and draw.textlength(text, font=font) > room:
        text = text[:-1]
    draw.text(xy, text, fill=(0, 0, 0), font=font)


def confusion_matrix_figure(
    confmat: Any, class_names: Sequence[str], normalize: bool = True, title: str = "Confusion matrix"
) -> Figure:
    """Plot a confusion matrix (rows = ground truth, columns = prediction) as a matplotlib figure.

    Args:
        confmat: ``(C, C)`` pixel counts.
        class_names: ``C`` names, index = class id.
        normalize: Show each row as fractions of the ground-truth pixels of its class (per-class recall
            on the diagonal); rows without pixels stay 0. False shows the raw counts.
        title: Figure title.

    Returns:
        A ``matplotlib.figure.Figure`` (not attached to pyplot, so nothing leaks between calls).
    """
    from matplotlib.figure import Figure

    counts = np.asarray(confmat, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(class_names):
        raise ValueError(
            f"confmat must be (C, C) with C = {len(class_names)} class names, got shape {counts.shape}"
        )
    values = counts
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    num = len(class_names)
    side = max(4.0, 0.45 * num + 2.0)
    figure = Figure(figsize=(side + 1.0, side), dpi=80, layout="constrained")
    axes = figure.add_subplot()
    shown = axes.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    figure.colorbar(shown, ax=axes, shrink=0.8)
    axes.set_xticks(range(num), labels=class_names, rotation=90)
    axes.set_yticks(range(num), labels=class_names)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    axes.set_title(title)
    if num <= 25:
        top = values.max() if values.size else 0.0
        for row in range(num):
            for col in range(num):
                text = f"{values[row, col]:.2f}" if normalize else f"{int(values[row, col])}"
                dark = values[row, col] > 0.5 * top
                axes.text(col, row, text, ha="center", va="center", fontsize=7, color="w" if dark else "k")
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a matplotlib figure to ``(H, W, 3)`` uint8 RGB (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
