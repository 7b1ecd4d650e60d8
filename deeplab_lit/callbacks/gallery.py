"""``PredictionGallery``: pictures of validation predictions, a per-class IoU table and a confusion matrix.

Numbers say a model improved; pictures say where. Every ``every_n_val_epochs`` validation runs this
callback logs, for a fixed set of validation images (the first ``num_images`` of the validation loader, or
``indices``; the same ones every time, so runs and epochs compare image by image), one panel per image::

    image | ground truth | prediction | CRF prediction (when on)

with the masks overlaid in the data set's palette, then a table of per-class IoU and a confusion-matrix
plot computed from the module's own validation confusion matrix (so they agree with ``val/mIoU``).

It writes through whatever logger the trainer has: ``WandbLogger`` (``log_image``/``log_table``),
``TensorBoardLogger`` (``add_image``/``add_text``), and for any other logger (CSV) or none, PNG and CSV
files under ``<log_dir>/gallery/``. Only global rank 0 draws and logs; the confusion matrix is summed over
processes first.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import DummyLogger
from PIL import Image
from torch import Tensor

from deeplab_lit.callbacks.crf import DenseCRFCallback
from deeplab_lit.crf import CRFParams, dense_crf
from deeplab_lit.normalization import Normalization
from deeplab_lit.visualize import confusion_matrix_figure, figure_to_array, overlay, side_by_side


class PredictionGallery(Callback):
    """Log fixed validation images with ground truth, prediction and CRF prediction, plus IoU and confusion.

    Logged under ``val/`` at the trainer's global step: ``val/gallery`` (one panel per image, captioned
    with the image's name), ``val/iou_table`` (class, IoU, accuracy, ground-truth and predicted pixels)
    and ``val/confusion_matrix`` (row-normalised plot). Sanity-check runs log nothing.

    Args:
        num_images: How many images, the first of the validation loader (of rank 0's shard under DDP).
        indices: Positions in the validation loader to show instead of the first ``num_images``.
        every_n_val_epochs: Log in every N-th validation run (the 1st, N+1-th, ...); with
            ``val_check_interval`` each validation counts as one.
        crf: Add a dense-CRF panel. None (default): when a ``DenseCRFCallback`` is on, with its parameters
            and backend. True: always, with ``crf_preset`` unless a ``DenseCRFCallback`` gives parameters.
        crf_preset: CRF parameter preset when no ``DenseCRFCallback`` is present.
        alpha: Opacity of the masks over the image.
        max_side: Downscale images whose longer side exceeds this many pixels (None keeps the size).
        iou_table: Log the per-class IoU table.
        confusion_matrix: Log the confusion-matrix plot (needs matplotlib).
        palette: ``(K, 3)`` colours, index = class id; default: the datamodule's ``palette``.
        normalization: Maps model input back to uint8 RGB; default: the datamodule's ``normalization``.

    Raises:
        ValueError: On a non-positive count, an alpha outside [0, 1], or (at set-up) when the palette,
            the normalisation or the module's validation confusion matrix cannot be found.
        ImportError: At set-up, if ``confusion_matrix`` is on and matplotlib is missing.
    """

    def __init__(
        self,
        num_images: int = 4,
        indices: list[int] | None = None,
        every_n_val_epochs: int = 1,
        crf: bool | None = None,
        crf_preset: str = "deeplab_v2",
        alpha: float = 0.5,
        max_side: int | None = 512,
        iou_table: bool = True,
        confusion_matrix: bool = True,
        palette: list[list[int]] | None = None,
        normalization: Normalization | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_images", num_images), ("every_n_val_epochs", every_n_val_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PredictionGallery {name} must be a positive int, got {value!r}")
        if indices is not None and (not indices or any(i < 0 for i in indices)):
            raise ValueError(f"PredictionGallery indices must be non-empty and >= 0, got {indices!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"PredictionGallery alpha must be in [0, 1], got {alpha}")
        if max_side is not None and max_side < 8:
            raise ValueError(f"PredictionGallery max_side must be >= 8 pixels or None, got {max_side}")
        #: Positions in the validation loader that the gallery shows.
        self.wanted = frozenset(indices if indices is not None else range(num_images))
        self.every_n_val_epochs = every_n_val_epochs
        self.crf = crf
        self.crf_params = CRFParams.from_preset(crf_preset)
        self.crf_backend = "auto"
        self.alpha = alpha
        self.max_side = max_side
        self.iou_table = iou_table
        self.confusion_matrix = confusion_matrix
        self.palette = None if palette is None else np.asarray(palette, dtype=np.uint8)
        self.normalization = normalization
        self.class_names: list[str] = []
        self._runs = 0  # validation runs seen (sanity checks excluded); saved in checkpoints
        self._active = False
        self._seen = 0
        self._samples: list[dict[str, Any]] = []
        self._use_crf = False

    # ------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find palette, normalisation, class names and the CRF settings; fail now rather than later."""
        if stage not in ("fit", "validate"):
            return
        datamodule = getattr(trainer, "datamodule", None)
        if self.palette is None:
            self.palette = getattr(datamodule, "palette", None)
        if self.normalization is None:
            self.normalization = getattr(datamodule, "normalization", None)
        if self.palette is None or self.normalization is None:
            raise ValueError(
                "PredictionGallery needs a palette and a normalization: use a deeplab_lit datamodule "
                "(it has .palette and .normalization) or pass palette= and normalization="
            )
        self.palette = np.asarray(self.palette, dtype=np.uint8)
        if self.palette.ndim != 2 or self.palette.shape[1] != 3 or len(self.palette) < 256:
            raise ValueError(f"PredictionGallery palette must be (256, 3) colours, got {self.palette.shape}")
        self.class_names = list(
            getattr(pl_module, "class_names", None) or getattr(datamodule, "class_names", None) or []
        )
        if self.iou_table or self.confusion_matrix:
            self._confmat_metric(pl_module)  # raises if the module keeps none
        if self.confusion_matrix and importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "PredictionGallery(confusion_matrix=True) plots with matplotlib: pip install matplotlib "
                "(or set confusion_matrix: false)"
            )
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # Lightning sets it, undeclared, in a connector
        crf_callbacks = [cb for cb in callbacks if isinstance(cb, DenseCRFCallback)]
        if crf_callbacks:
            self.crf_params, self.crf_backend = crf_callbacks[0].params, crf_callbacks[0].backend
        self._use_crf = bool(crf_callbacks) if self.crf is None else self.crf

    # ------------------------------------------------------------------------------------- hooks
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Decide whether this validation run is logged."""
        self._active = False
        if not trainer.sanity_checking:
            self._active = self._runs % self.every_n_val_epochs == 0
            self._runs += 1
        self._seen = 0
        self._samples = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the wanted images of this batch (rank 0), with prediction and CRF prediction."""
        if not self._active or dataloader_idx != 0:
            return
        count = batch["image"].shape[0]
        start, self._seen = self._seen, self._seen + count
        picks = [i for i in range(count) if start + i in self.wanted]
        if not picks or not trainer.is_global_zero:
            return
        if not isinstance(outputs, dict) or "logits" not in outputs:
            raise TypeError("PredictionGallery needs the validation step to return a dict with 'logits'")
        with torch.no_grad():
            logits: Tensor = outputs["logits"][picks]
            preds = outputs["preds"][picks] if "preds" in outputs else logits.argmax(dim=1)
            assert self.normalization is not None  # setup() found one or raised
            images = self.normalization.denormalize(batch["image"][picks])
            refined = None
            if self._use_crf:
                probs = logits.float().softmax(dim=1)
                refined = dense_crf(probs, images, self.crf_params, self.crf_backend).argmax(dim=1).cpu()
        names = batch.get("name")
        for row, index in enumerate(picks):
            self._samples.append(
                {
                    "index": start + index,
                    "name": str(names[index]) if names is not None else f"#{start + index}",
                    "image": images[row].permute(1, 2, 0).cpu().numpy(),
                    "mask": batch["mask"][index].cpu().numpy(),
                    "pred": preds[row].cpu().numpy(),
                    "crf": None if refined is None else refined[row].numpy(),
                }
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the panels, the IoU table and the confusion matrix.

        Lightning calls callbacks' ``on_validation_epoch_end`` before the module's (see
        ``_on_evaluation_epoch_end`` in its evaluation loop), and the module's computes the scores and
        resets the confusion matrix, so the matrix read here is the whole validation set's.
        """
        if not self._active:
            return
        self._active = False
        confmat = None
        if self.iou_table or self.confusion_matrix:
            metric = self._confmat_metric(pl_module)
            with metric.sync_context():  # sums over processes under DDP (every rank must enter)
                confmat = metric.confmat.detach().cpu().clone()
        if not trainer.is_global_zero:
            return
        self._log_gallery(trainer)
        if confmat is not None:
            self._log_scores(trainer, confmat)
        self._samples = []

    def state_dict(self) -> dict[str, Any]:
        """Return the validation runs counted so far, so a resumed run keeps its logging rhythm."""
        return {"runs": self._runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._runs = int(state_dict.get("runs", 0))

    # ----------------------------------------------------------------------------------- drawing
    def panels(self) -> list[tuple[np.ndarray, str]]:
        """``(panel, caption)`` per kept image: image | ground truth | prediction | [CRF], uint8 RGB."""
        out = []
        for sample in self._samples:
            image, masks = _shrink(
                sample["image"], [sample["mask"], sample["pred"], sample["crf"]], self.max_side
            )
            titles = ["image", "ground truth", "prediction", "CRF"]
            parts = [image] + [overlay(image, m, self.palette, self.alpha) for m in masks if m is not None]
            out.append((side_by_side(parts), f"{sample['name']}: " + " | ".join(titles[: len(parts)])))
        return out

    def _log_gallery(self, trainer: Trainer) -> None:
        panels = self.panels()
        if panels:
            _log_images(trainer, "val/gallery", [p for p, _ in panels], [c for _, c in panels])

    def _log_scores(self, trainer: Trainer, confmat: Tensor) -> None:
        counts = confmat.double()
        true_pos, gt, pred = counts.diagonal(), counts.sum(dim=1), counts.sum(dim=0)
        union = gt + pred - true_pos
        names = self.class_names or [f"class_{i}" for i in range(len(counts))]
        if self.iou_table:
            rows = [
                [
                    name,
                    float(true_pos[c] / union[c]) if union[c] > 0 else float("nan"),
                    float(true_pos[c] / gt[c]) if gt[c] > 0 else float("nan"),
                    int(gt[c]),
                    int(pred[c]),
                ]
                for c, name in enumerate(names)
            ]
            _log_table(
                trainer, "val/iou_table", ["class", "IoU", "accuracy", "gt_pixels", "pred_pixels"], rows
            )
        if self.confusion_matrix:
            title = f"Confusion matrix (step {trainer.global_step})"
            figure = confusion_matrix_figure(counts.numpy(), names, normalize=True, title=title)
            _log_images(trainer, "val/confusion_matrix", [figure_to_array(figure)], ["rows: ground truth"])

    @staticmethod
    def _confmat_metric(pl_module: LightningModule) -> Any:
        metric = getattr(pl_module, "metrics", {})
        metric = metric["val"] if "val" in metric else None
        if metric is None or not hasattr(metric, "confmat"):
            raise ValueError(
                "PredictionGallery's IoU table and confusion matrix read the module's validation confusion "
                "matrix, pl_module.metrics['val'] (a deeplab_lit SegmentationModule has it); "
                f"{type(pl_module).__name__} has none. Set iou_table: false and confusion_matrix: false"
            )
        return metric


def _shrink(
    image: np.ndarray, masks: list[np.ndarray | None], max_side: int | None
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Downscale an image (bilinear) and its masks (nearest) so the longer side is at most ``max_side``."""
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image, masks
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    resized = [
        None
        if m is None
        else np.asarray(Image.fromarray(m.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
        for m in masks
    ]
    return small, resized


def _file_loggers(trainer: Trainer) -> list[Logger | None]:
    """Loggers that cannot take images (CSV, ...), or ``[None]`` when the trainer has no logger."""
    known = (WandbLogger, TensorBoardLogger, DummyLogger)
    if not trainer.loggers:
        return [None]
    return [logger for logger in trainer.loggers if not isinstance(logger, known)]


def _files_dir(trainer: Trainer, logger: Logger | None) -> Path:
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(log_dir or trainer.default_root_dir) / "gallery"


def _log_images(trainer: Trainer, key: str, images: list[np.ndarray], captions: list[str]) -> None:
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=images, caption=captions, step=step)
        elif isinstance(logger, TensorBoardLogger):
            for index, image in enumerate(images):
                logger.experiment.add_image(f"{key}/{index}", image, global_step=step, dataformats="HWC")
    for file_logger in _file_loggers(trainer):
        folder = _files_dir(trainer, file_logger) / key.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            Image.fromarray(image).save(folder / f"step{step:07d}_{index:02d}.png")


def _log_table(trainer: Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=rows, step=step)
        elif isinstance(logger, TensorBoardLogger):
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += [
                "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |"
                for r in rows
            ]
            logger.experiment.add_text(key, "\n".join(lines), global_step=step)
    for file_logger in _file_loggers(trainer):
        folder = _files_dir(trainer, file_logger) / key.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"step{step:07d}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([columns, *rows])
