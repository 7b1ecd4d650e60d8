"""One label mapping for every reader: the values (or colours) a mask file stores -> class ids, 255 = void.

Each data set only states its mapping (mmsegmentation's idea); applying it is generic, here:

- :func:`lookup`: a table of raw value -> class id (Cityscapes labelIds -> trainIds, COCO-Stuff's 182 ids);
- :func:`reduce_zero_label`: 0 ("other", unlabelled) -> 255, every ``v > 0`` -> ``v - 1`` (ADE20K,
  PASCAL-Context with 59 classes);
- :func:`relabel`: a researcher's ``{source: target}`` (values not named keep their value);
- :func:`palette_decoding`: RGB masks, colour ``k`` of a palette -> value ``k``.

A :class:`LabelMap` is a 256-entry uint8 table applied with ``np.take`` (one pass over the mask), the raw
values it defines (any other is an error naming the file and the values, not a silent class), and for
colour masks the palette decoded first. Maps chain with :meth:`LabelMap.then`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeplab_lit.data.transforms import IGNORE_INDEX

#: Colours of a palette: ``[r, g, b]`` triples, index = the value the colour stands for.
Colors = Sequence[Sequence[int]]


class LabelMapError(ValueError):
    """A mask holds a value or a colour its data set's label map does not define."""


def describe_values(values: np.ndarray) -> str:
    """``[0, 1, 2, 3, 255]`` -> ``"0..3, 255"``: sorted integers as ranges, for messages."""
    parts: list[str] = []
    ordered = np.unique(values).tolist()
    start = previous = ordered[0] if ordered else 0
    for value in [*ordered[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        parts.append(str(start) if start == previous else f"{start}..{previous}")
        if value is not None:
            start = previous = value
    return ", ".join(parts) if ordered else "none"


@dataclass(frozen=True, eq=False)
class LabelMap:
    """Raw mask value -> class id (255 = void), with the raw values that are allowed.

    Attributes:
        table: ``(256,)`` uint8, class id of each raw value.
        defined: ``(256,)`` bool, raw values a mask may hold.
        colors: ``(K, 3)`` uint8 palette for RGB masks (colour ``k`` -> raw value ``k``), or None for
            masks that store one value per pixel.
    """

    table: np.ndarray
    defined: np.ndarray
    colors: np.ndarray | None = None

    def then(self, other: LabelMap) -> LabelMap:
        """This map followed by ``other`` (whose values are this map's outputs)."""
        if other.colors is not None:
            raise ValueError("Only the first map of a chain can decode colours")
        return LabelMap(
            np.take(other.table, self.table), self.defined & np.take(other.defined, self.table), self.colors
        )

    def __call__(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Map one mask: ``(H, W)`` integers (``(H, W, 3)`` uint8 colours with a palette) -> uint8 ``(H, W)``.

        Raises:
            LabelMapError: a value (or colour) the map does not define; the message names ``path``.
        """
        if self.colors is not None:
            raw = decode_colors(raw, self.colors, path)
        if raw.dtype != np.uint8:
            outside = raw[(raw < 0) | (raw > 255)]
            if outside.size:
                self._refuse(outside, path)
            raw = raw.astype(np.uint8)
        if not self.defined.all():
            undefined = np.take(~self.defined, raw)
            if undefined.any():
                self._refuse(raw[undefined], path)
        return np.take(self.table, raw)

    def _refuse(self, values: np.ndarray, path: str | Path) -> None:
        shown = [int(v) for v in np.unique(values)[:10]]
        raise LabelMapError(
            f"Mask {path} holds label values {shown} that the label map does not define; expected values "
            f"in {describe_values(np.flatnonzero(self.defined))}. Check the data set's layout (is this "
            "the right annotation file?) or its label options."
        )

    def signed_table(self) -> np.ndarray:
        """``(256,)`` int16 table with -1 for the raw values the map does not define."""
        return np.where(self.defined, self.table.astype(np.int16), np.int16(-1))

    def fingerprint(self) -> str:
        """Hash of all that decides the mapping, this module's code too (the preflight's cache key)."""
        digest = hashlib.sha256(Path(__file__).read_bytes())
        digest.update(self.signed_table().tobytes())
        if self.colors is not None:
            digest.update(b"colors" + np.ascontiguousarray(self.colors).tobytes())
        return digest.hexdigest()


def lookup(mapping: Mapping[int, int]) -> LabelMap:
    """A map that defines only the raw values of ``mapping`` (raw value -> class id or 255).

    Raises:
        ValueError: a key or a value outside 0..255.
    """
    table, defined = np.zeros(256, np.uint8), np.zeros(256, bool)
    for source, target in mapping.items():
        if not (0 <= source <= 255 and 0 <= target <= 255):
            raise ValueError(f"Label map entries must map 0..255 to 0..255; got {source}: {target}")
        table[source], defined[source] = target, True
    return LabelMap(table, defined)


def identity(num_classes: int) -> LabelMap:
    """Values ``0..num_classes - 1`` and 255 kept as they are; any other value is an error."""
    return lookup({v: v for v in [*range(num_classes), IGNORE_INDEX]})


def relabel(mapping: Mapping[int, int]) -> LabelMap:
    """``{source: target}`` applied, every other value kept (255 stays void unless mapped)."""
    table = np.arange(256, dtype=np.uint8)
    changes = lookup(mapping)
    table[changes.defined] = changes.table[changes.defined]
    return LabelMap(table, np.ones(256, bool))


def reduce_zero_label(max_value: int = IGNORE_INDEX - 1) -> LabelMap:
    """0 -> 255 (void), ``v`` -> ``v - 1`` for ``1 <= v <= max_value``, 255 stays 255; other values undefined.

    The convention of data sets whose 0 means "other" or "unlabelled" (ADE20K, PASCAL-Context 59).
    """
    return lookup({0: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX} | {v: v - 1 for v in range(1, max_value + 1)})


def read_palette(palette: Colors | str | Path) -> np.ndarray:
    """A palette as ``(K, 3)`` uint8: a list of ``[r, g, b]``, or a text file with one ``r g b`` per line.

    In the file, values may be separated by spaces or commas; blank lines and ``#`` comments are skipped.
    Line ``k`` (counting only colour lines, from 0) is the colour of value ``k``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an entry is not three integers in 0..255, or two entries share a colour.
    """
    where = "palette"
    if isinstance(palette, (str, Path)):
        path = Path(palette)
        if not path.is_file():
            raise FileNotFoundError(f"Palette file not found: {path}")
        where = f"palette file {path}"
        lines = (line.split("#", 1)[0].replace(",", " ").split() for line in path.read_text().splitlines())
        entries: list[list[str]] | Colors = [line for line in lines if line]
    else:
        entries = palette
    try:
        colors = np.array([[int(c) for c in entry] for entry in entries], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"The {where} must hold [r, g, b] integer triples: {err}") from err
    if colors.ndim != 2 or colors.shape[1:] != (3,) or not 1 <= len(colors) <= 256:
        raise ValueError(
            f"The {where} must hold 1 to 256 [r, g, b] triples; got {json.dumps(colors.tolist())}"
        )
    if colors.min() < 0 or colors.max() > 255:
        raise ValueError(f"The {where} holds colour values outside 0..255")
    unique, counts = np.unique(colors, axis=0, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"The {where} lists the colour {unique[counts > 1][0].tolist()} twice")
    return colors.astype(np.uint8)


def palette_decoding(palette: Colors | str | Path) -> LabelMap:
    """RGB masks: the ``k``-th colour of ``palette`` (see :func:`read_palette`) becomes value ``k``."""
    colors = read_palette(palette)
    defined = np.zeros(256, bool)
    defined[: len(colors)] = True
    return LabelMap(np.arange(256, dtype=np.uint8), defined, colors)


def _color_codes(colors: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 -> ``(...)`` int32 ``r << 16 | g << 8 | b``."""
    rgb = colors.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_colors(mask: np.ndarray, colors: np.ndarray, path: str | Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 colour mask -> ``(H, W)`` uint8 palette index of each pixel's colour.

    Raises:
        LabelMapError: a colour not in ``colors``; the message names ``path`` and the colours.
    """
    if mask.ndim != 3 or mask.shape[2] != 3:
        raise LabelMapError(f"Mask {path} has shape {mask.shape}; a palette needs (H, W, 3) RGB masks")
    codes = _color_codes(mask)
    known = _color_codes(colors)
    order = np.argsort(known)
    position = np.minimum(np.searchsorted(known[order], codes), len(known) - 1)
    found = known[order][position] == codes
    if not found.all():
        unknown = np.unique(mask[~found], axis=0)
        shown = ", ".join(str(tuple(int(c) for c in color)) for color in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise LabelMapError(
            f"Mask {path} holds the colour(s) {shown}{more} (r, g, b), which the palette does not list "
            f"({len(colors)} colours). Add them to the palette (and label_map them to 255 to ignore them)."
        )
    return order[position].astype(np.uint8)


def combined(
    palette: Colors | str | Path | None = None,
    label_map: Mapping[int, int] | None = None,
    reduce_zero: bool = False,
) -> LabelMap | None:
    """The usual options, in their order: palette decoding, then ``label_map``, then reduce-zero-label.

    Returns None when no option is given (masks are read as they are).
    """
    steps = [
        palette_decoding(palette) if palette is not None else None,
        relabel(label_map) if label_map else None,
        reduce_zero_label() if reduce_zero else None,
    ]
    chain: LabelMap | None = None
    for step in steps:
        if step is not None:
            chain = step if chain is None else chain.then(step)
    return chain
