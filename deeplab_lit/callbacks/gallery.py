"""``PredictionGallery``: pictures of validation predictions, a per-class IoU table and a confusion matrix.

Numbers say a model improved; pictures say where. Every ``every_n_val_epochs`` validation runs this
callback takes a fixed set of validation images (the first ``num_images`` of the validation loader, or
``indices``; the same ones every time, so runs and epochs compare image by image) with their ground truth,
prediction and dense-CRF prediction, and the per-class IoU and confusion matrix of the module's own
validation confusion matrix (so they agree with ``val/mIoU``). Where each goes (PNG/CSV files always, W&B
interactive masks, TensorBoard panels) is :mod:`deeplab_lit.callbacks.gallery_output`. Only global rank 0
draws and logs; the confusion matrix is summed over processes first.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor

from deeplab_lit.callbacks.crf import DenseCRFCallback
from deeplab_lit.callbacks.gallery_output import (
    Sample,
    iou_rows,
    log_tensorboard,
    log_wandb,
    render_grid,
    render_panels,
    write_files,
)
from deeplab_lit.crf import CRFParams, dense_crf
from deeplab_lit.normalization import Normalization
from deeplab_lit.visualize import confusion_matrix_figure, figure_to_array


class PredictionGallery(Callback):
    """Log fixed validation images with ground truth, prediction and CRF prediction, plus IoU and confusion.

    Every logged validation run (sanity checks excluded) writes, whatever the logger (none included), to
    :attr:`output_folder` = ``<trainer.log_dir>/gallery/`` (``trainer.log_dir`` is the W&B logger's
    ``save_dir``, i.e. ``trainer.default_root_dir`` in the CLI; the CSV/TensorBoard logger's version folder;
    with ``logger: false``, ``trainer.default_root_dir``):

    - ``epoch_003.png``: one picture of the run (epochs count from 0, as in checkpoint names). Top to
      bottom, per image: a caption line ``name: image | ground truth | prediction | CRF``, then those
      panels side by side (masks blended over the image in the data set's palette); 4 white pixels between
      images; at the bottom a legend of the palette's colours with the class names (void included). With
      several validations in one epoch (``val_check_interval``), the later ones are
      ``epoch_003_step0001234.png``.
    - ``epoch_003_iou.csv``: class, IoU, ground-truth and predicted pixels.
    - ``epoch_003_confusion_matrix.png``: the row-normalised confusion matrix.

    and to the loggers, under ``val/`` at the trainer's global step: W&B gets ``val/gallery`` (each image
    with interactive ``ground_truth``/``prediction``/``crf`` masks labelled with the class names, void as
    ``"void"``: classes toggle in the UI), ``val/iou_table`` and ``val/confusion_matrix``; TensorBoard gets
    the panels (``val/gallery/<i>``), the table as text and the plot.

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

    Attributes:
        output_folder: Where the files are written (None before the first logged validation run).
        last_picture: The latest ``epoch_*.png`` written (None before).

    Raises:
        ValueError: On a non-positive count, an alpha outside [0, 1], or (at set-up) when the palette,
            the normalisation or the module's validation confusion matrix cannot be found, or when a W&B
            logger is on and the labels do not fit its 8-bit masks (more than 255 classes).
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
        self.ignore_index = 255
        self.output_folder: Path | None = None
        self.last_picture: Path | None = None
        self._stems: set[str] = (
            set()
        )  # pictures written in this run, so a second validation per epoch adds its step
        self._runs = 0  # validation runs seen (sanity checks excluded); saved in checkpoints
        self._active = False
        self._seen = 0
        self._samples: list[Sample] = []
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
        hparams = getattr(pl_module, "hparams", {})
        self.class_names = list(
            getattr(pl_module, "class_names", None)
            or getattr(datamodule, "class_names", None)
            or [f"class_{i}" for i in range(int(hparams.get("num_classes", 0)))]
        )
        self.ignore_index = int(hparams.get("ignore_index", 255))
        self._stems = set()
        num_labels = len(self.class_names)
        if any(isinstance(lg, WandbLogger) for lg in trainer.loggers) and num_labels > 255:
            raise ValueError(
                f"PredictionGallery: W&B masks are 8-bit (labels 0-254 plus void), the module has "
                f"{num_labels} classes; remove the W&B logger or the gallery"
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
            maps = [batch["mask"][index], preds[row], None if refined is None else refined[row]]
            image, (mask, pred, crf) = _shrink(
                images[row].permute(1, 2, 0).cpu().numpy(),
                [None if m is None else m.cpu().numpy().astype(np.uint8) for m in maps],
                self.max_side,
            )
            assert mask is not None and pred is not None
            name = str(names[index]) if names is not None else f"#{start + index}"
            self._samples.append(Sample(start + index, name, image, mask, pred, crf))

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
        self._publish(trainer, confmat)
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
        assert self.palette is not None  # setup() found one or raised
        return [render_panels(sample, self.palette, self.alpha) for sample in self._samples]

    def class_labels(self) -> dict[int, str]:
        """Label -> name for every class and the void label (W&B mask labels, legend)."""
        return {**dict(enumerate(self.class_names)), self.ignore_index: "void"}

    def _publish(self, trainer: Trainer, confmat: Tensor | None) -> None:
        """Render once, then write the files and log to each logger that takes pictures."""
        assert self.palette is not None  # setup() found one or raised
        step = trainer.global_step
        names = self.class_names or [f"class_{i}" for i in range(0 if confmat is None else len(confmat))]
        rows = iou_rows(confmat, names) if self.iou_table and confmat is not None else None
        confusion = None
        if self.confusion_matrix and confmat is not None:
            title = f"Confusion matrix (step {step})"
            figure = confusion_matrix_figure(confmat.double().numpy(), names, normalize=True, title=title)
            confusion = figure_to_array(figure)
        panels = self.panels()
        labels = self.class_labels()
        if panels:
            self.output_folder = Path(trainer.log_dir or trainer.default_root_dir) / "gallery"
            grid = render_grid(panels, self.palette, list(labels.items()))
            self.last_picture = write_files(self.output_folder, self._stem(trainer), grid, rows, confusion)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_wandb(logger, step, self._samples, labels, rows, confusion)
            elif isinstance(logger, TensorBoardLogger):
                log_tensorboard(logger, step, panels, rows, confusion)

    def _stem(self, trainer: Trainer) -> str:
        """``epoch_003``, or ``epoch_003_step0001234`` for a later validation of the same epoch."""
        stem = f"epoch_{trainer.current_epoch:03d}"
        if stem in self._stems:
            stem = f"{stem}_step{trainer.global_step:07d}"
        self._stems.add(stem)
        return stem

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
