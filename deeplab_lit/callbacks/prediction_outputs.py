"""Where ``predict`` writes each mask and which pixel values it holds: the output formats, checked up front.

``--prediction.format`` is ``palette`` (default: a palette PNG of the class indices in the data set's
colours, and an overlay) or the files an evaluation server reads: ``cityscapes`` (label IDs), ``voc``
(the comp6 layout) or ``ade20k`` (class + 1); each format's file names and values: :func:`mask_file`.

The server formats write the masks only (a server reads every PNG it is given), in one flat folder named
by the files' stems, and need the server's class count. Before any image is predicted,
:func:`check_outputs` refuses two inputs that would get one output file and an output that would
overwrite an input.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Literal, get_args

import numpy as np
from PIL import Image

from deeplab_lit.data.cityscapes import label_id_to_train_id
from deeplab_lit.data.voc import voc_palette

PredictionFormat = Literal["palette", "cityscapes", "voc", "ade20k"]
#: The format names, in the order the help lists them.
FORMATS: tuple[str, ...] = get_args(PredictionFormat)
#: Classes each evaluation-server format is defined for.
FORMAT_CLASSES: dict[str, int] = {"cityscapes": 19, "voc": 21, "ade20k": 150}
#: Folder of the ``voc`` format's masks below the output folder, as the VOC server expects it.
VOC_RESULTS = "results/VOC2012/Segmentation/comp6_test_cls"
#: ``<city>_<seq>_<frame>`` at the start of a Cityscapes file stem (cityscapesScripts' ``getCsFileInfo``).
_CITYSCAPES_FRAME = re.compile(r"^([^_]+_\d{6}_\d{6})(?:_|$)")


class PredictionFormatError(ValueError):
    """A ``--prediction.format`` that does not fit the model's classes or an input's name."""


class OutputCollisionError(ValueError):
    """Two inputs of one ``predict`` run would be written to the same output file."""


class OutputOverInputError(ValueError):
    """An output file of ``predict`` would overwrite one of its input images."""


def check_num_classes(output_format: str, num_classes: int) -> None:
    """Refuse a server format whose class count differs from the model's ``num_classes``."""
    expected = FORMAT_CLASSES.get(output_format)
    if expected is not None and expected != num_classes:
        raise PredictionFormatError(
            f"--prediction.format {output_format} writes the {expected} classes of its evaluation server, "
            f"but the model predicts {num_classes}. Use a model trained on that data set, or "
            "--prediction.format palette (class indices as they are)."
        )


def mask_file(output_format: str, name: str) -> str:
    """Mask path, below the output folder, of the input named ``name`` (``/``-separated, no extension).

    - ``palette``: ``<name>.png``, a palette PNG of the class indices in the data set's colours (the
      overlay, ``<name>_overlay.jpg``, beside it); ``<name>`` mirrors the input's folders below the
      inputs' common folder (:func:`deeplab_lit.data.images.relative_names`).
    - ``cityscapes``: ``<city>_<seq>_<frame>.png``, 8-bit grayscale of Cityscapes *label IDs* (7 = road,
      ..., 33 = bicycle), mapped from the 19 train IDs with cityscapesScripts' table (the one training
      uses, :func:`deeplab_lit.data.cityscapes.label_id_to_train_id`, inverted). The Cityscapes server and
      ``evalPixelLevelSemanticLabeling`` find each prediction by the ``<city>_<seq>_<frame>`` start of its
      name.
    - ``voc``: ``results/VOC2012/Segmentation/comp6_test_cls/<stem>.png``, palette PNGs in the VOC colours:
      the layout the PASCAL VOC server unpacks (comp6: training data beyond VOC allowed).
    - ``ade20k``: ``<stem>.png``, 8-bit grayscale of class + 1 (1..150; 0 is "other", never predicted), as
      the MIT Scene Parsing benchmark reads.
    """
    if output_format == "palette":
        return f"{name}.png"
    stem = PurePosixPath(name).name
    if output_format == "voc":
        return f"{VOC_RESULTS}/{stem}.png"
    if output_format == "cityscapes":
        match = _CITYSCAPES_FRAME.match(stem)
        if match is None:
            raise PredictionFormatError(
                f"--prediction.format cityscapes names each mask by the <city>_<seq>_<frame> part of its "
                f"image's name (e.g. berlin_000000_000019_leftImg8bit.png), and the input {name!r} has "
                "none. Predict the Cityscapes images under their own names, or use --prediction.format "
                "palette."
            )
        return f"{match.group(1)}.png"
    return f"{stem}.png"


def train_id_to_label_id() -> np.ndarray:
    """Lookup table ``(256,)`` uint8: Cityscapes trainId 0..18 -> labelId; other entries 0 (unlabeled)."""
    to_train = label_id_to_train_id()
    lut = np.zeros(256, dtype=np.uint8)
    for train_id in range(FORMAT_CLASSES["cityscapes"]):
        lut[train_id] = np.flatnonzero(to_train == train_id)[0]  # one labelId per train ID
    return lut


def save_palette_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Save ``labels`` (H, W) in 0..255 as a palette PNG whose colour ``i`` is ``palette[i]``.

    The format is given, not guessed from the name, so that any file name works (an input ``..jpg``
    gives ``..png``, whose extension Pillow would not recognise).
    """
    image = Image.fromarray(labels.astype(np.uint8))  # mode "L"; putpalette makes it "P", indices kept
    image.putpalette(np.asarray(palette, dtype=np.uint8)[:256].tobytes())
    image.save(path, format="PNG")


def save_mask(output_format: str, path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Write class indices ``labels`` (H, W) as ``output_format`` says (``palette``: in ``palette``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if output_format in ("palette", "voc"):
        save_palette_png(path, labels, palette if output_format == "palette" else voc_palette())
        return
    values = train_id_to_label_id()[labels] if output_format == "cityscapes" else labels.astype(np.uint8) + 1
    Image.fromarray(values.astype(np.uint8)).save(path, format="PNG")


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def check_outputs(inputs: Sequence[Path], outputs: Sequence[Sequence[Path]]) -> None:
    """Refuse, before any work, two inputs sharing an output file and an output over an input.

    Args:
        inputs: Input image files.
        outputs: For each input, the files ``predict`` would write for it.

    Raises:
        OutputCollisionError: some output file would be written for more than one input; lists them all.
        OutputOverInputError: an output file is one of the inputs (same resolved path, or the same file
            through a link or a case-insensitive file system); names each and the remedy.
    """
    sources: dict[Path, list[Path]] = defaultdict(list)
    for source, files in zip(inputs, outputs):
        for file in files:
            sources[file.resolve()].append(source)
    shared = {file: owners for file, owners in sources.items() if len(owners) > 1}
    if shared:
        listed = "\n".join(f"  {file} <- {', '.join(map(str, owners))}" for file, owners in shared.items())
        raise OutputCollisionError(
            f"predict would write {len(shared)} output file(s) for more than one input, and keep only the "
            f"last:\n{listed}\nRename one of each group of inputs, or predict them in separate runs into "
            "different --prediction.output_dir folders."
        )
    by_id = {_file_id(p): p for p in inputs}
    by_path = {p.resolve(): p for p in inputs}
    over = [
        (file, by_path.get(file) or by_id[_file_id(file)])
        for file in sources
        if file in by_path or (os.path.exists(file) and _file_id(file) in by_id)
    ]
    if over:
        listed = "\n".join(f"  {file} is the input image {source}" for file, source in over)
        raise OutputOverInputError(
            f"predict would overwrite {len(over)} input image(s) with its output:\n{listed}\nChoose a "
            "--prediction.output_dir that holds none of the inputs (e.g. a new folder beside them)."
        )
