"""Where the prediction gallery goes: PNG and CSV files, W&B interactive masks, TensorBoard panels.

Split from :mod:`deeplab_lit.callbacks.gallery` (which picks the images and runs the model's outputs through
the CRF) so that each destination's format lives in one place:

- **Files**, with any logger or none: one picture per validation run (a grid, see :func:`render_grid`), the
  confusion-matrix plot and the per-class IoU table as CSV.
- **W&B**: each image once, with its ground truth, prediction and CRF prediction as interactive masks
  (``wandb.Image(image, masks={"ground_truth": ..., "prediction": ..., "crf": ...})``) carrying the class
  names, so a class can be toggled in the UI. Sent through Lightning's ``WandbLogger.log_image``, which
  imports wandb itself: nothing here imports wandb, an optional extra.
- **TensorBoard**: the rendered panels (image | ground truth | prediction | CRF), the table as Markdown text.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor

from deeplab_lit.metrics import scores_from_confusion
from deeplab_lit.visualize import legend, overlay, side_by_side, stack, text_strip

#: Columns of the per-class IoU table.
IOU_COLUMNS = ["class", "IoU", "gt_pixels", "pred_pixels"]
#: Titles of the panels of one image, in order (the CRF panel only when the CRF is on).
PANEL_TITLES = ("image", "ground truth", "prediction", "CRF")
#: W&B mask layer of each label map of a sample.
WANDB_MASK_KEYS = {"mask": "ground_truth", "pred": "prediction", "crf": "crf"}


@dataclass
class Sample:
    """One gallery image: uint8 RGB ``(H, W, 3)`` and ``(H, W)`` uint8 label maps (255 = void)."""

    index: int
    name: str
    image: np.ndarray
    mask: np.ndarray
    pred: np.ndarray
    crf: np.ndarray | None

    def label_maps(self) -> dict[str, np.ndarray]:
        """Ground truth, prediction and (when computed) CRF prediction, by field name."""
        maps = {"mask": self.mask, "pred": self.pred, "crf": self.crf}
        return {key: value for key, value in maps.items() if value is not None}


def iou_rows(confmat: Tensor, names: list[str]) -> list[list[Any]]:
    """Rows of the IoU table (:data:`IOU_COLUMNS`), IoU by :func:`deeplab_lit.metrics.scores_from_confusion`.

    NaN IoU for a class absent from both ground truth and prediction, as in ``val/mIoU``.
    """
    iou = scores_from_confusion(confmat)["iou"]
    gt, pred = confmat.sum(dim=1), confmat.sum(dim=0)
    return [[name, float(iou[c]), int(gt[c]), int(pred[c])] for c, name in enumerate(names)]


def render_panels(sample: Sample, palette: np.ndarray, alpha: float) -> tuple[np.ndarray, str]:
    """``(panel, caption)``: image | ground truth | prediction | [CRF], masks blended over the image."""
    parts = [sample.image] + [overlay(sample.image, m, palette, alpha) for m in sample.label_maps().values()]
    return side_by_side(parts), f"{sample.name}: " + " | ".join(PANEL_TITLES[: len(parts)])


def render_grid(
    panels: list[tuple[np.ndarray, str]], palette: np.ndarray, legend_entries: list[tuple[int, str]]
) -> np.ndarray:
    """One picture of a validation run: per image a caption line above its panels, then a colour legend.

    Layout, top to bottom: for each image a :data:`~deeplab_lit.visualize.TEXT_HEIGHT`-pixel caption
    (``name: image | ground truth | prediction | CRF``) and the panels of :func:`render_panels`, 4 pixels
    between images; then the legend (one swatch and name per class, void included). The width is the
    widest row's; narrower rows are padded with white on the right.
    """
    width = max(panel.shape[1] for panel, _ in panels)
    rows = [stack([text_strip(caption, width), panel], gap=0) for panel, caption in panels]
    return stack([*rows, legend(legend_entries, palette, width)])


def write_files(
    folder: Path, stem: str, grid: np.ndarray, rows: list[list[Any]] | None, confusion: np.ndarray | None
) -> Path:
    """Write ``<stem>.png`` (grid), ``<stem>_iou.csv``, ``<stem>_confusion_matrix.png``; return the first."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.png"
    Image.fromarray(grid).save(path)
    if rows is not None:
        with open(folder / f"{stem}_iou.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([IOU_COLUMNS, *rows])
    if confusion is not None:
        Image.fromarray(confusion).save(folder / f"{stem}_confusion_matrix.png")
    return path


def log_wandb(
    logger: WandbLogger,
    step: int,
    samples: list[Sample],
    class_labels: dict[int, str],
    rows: list[list[Any]] | None,
    confusion: np.ndarray | None,
) -> None:
    """Log each image with interactive masks under ``val/gallery``, the table and the confusion plot."""
    if samples:
        masks = [
            {
                WANDB_MASK_KEYS[key]: {"mask_data": labels, "class_labels": class_labels}
                for key, labels in sample.label_maps().items()
            }
            for sample in samples
        ]
        logger.log_image(
            key="val/gallery",
            images=[s.image for s in samples],
            step=step,
            caption=[s.name for s in samples],
            masks=masks,
        )
    if rows is not None:
        logger.log_table(key="val/iou_table", columns=IOU_COLUMNS, data=rows, step=step)
    if confusion is not None:
        logger.log_image(
            key="val/confusion_matrix", images=[confusion], step=step, caption=["rows: ground truth"]
        )


def log_tensorboard(
    logger: TensorBoardLogger,
    step: int,
    panels: list[tuple[np.ndarray, str]],
    rows: list[list[Any]] | None,
    confusion: np.ndarray | None,
) -> None:
    """Add the rendered panels (``val/gallery/<i>``), the table as Markdown and the confusion plot."""
    writer = logger.experiment
    for index, (panel, _) in enumerate(panels):
        writer.add_image(f"val/gallery/{index}", panel, global_step=step, dataformats="HWC")
    if rows is not None:
        lines = ["| " + " | ".join(IOU_COLUMNS) + " |", "|" + "---|" * len(IOU_COLUMNS)]
        lines += [
            "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
            for row in rows
        ]
        writer.add_text("val/iou_table", "\n".join(lines), global_step=step)
    if confusion is not None:
        writer.add_image("val/confusion_matrix/0", confusion, global_step=step, dataformats="HWC")
