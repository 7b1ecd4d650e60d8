"""``PredictionWriter``: ``predict`` writes a palette PNG of the labels and an overlay for every image.

``deeplab-lit predict --config X.yaml --ckpt_path best.ckpt --data.init_args.predict_path photos/
--prediction.output_dir out/`` turns a file, a folder or a glob of images into, per image,

- ``out/<name>.png``: the label mask as a palette ("P") PNG, one class index per pixel, coloured with the
  data set's palette (VOC colours; Cityscapes colours for Cityscapes); reading its pixel values gives the
  labels back (``deeplab_lit.data.images.read_mask``);
- ``out/<name>_overlay.jpg``: the mask's colours blended over the original image.

``<name>`` is the input's path below the inputs' common folder without its extension (sub-folders are
mirrored; inputs that differ only by extension keep it). ``--prediction.format`` writes an evaluation
server's files instead; clashing outputs and a server format that does not fit the model's classes are
refused before any image is predicted (:mod:`deeplab_lit.callbacks.prediction_outputs`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from deeplab_lit.callbacks.prediction_outputs import (
    PredictionFormat,
    check_num_classes,
    check_outputs,
    mask_file,
    save_mask,
)
from deeplab_lit.crf import CRFParams, dense_crf
from deeplab_lit.visualize import overlay


class UnreadableImageWarning(UserWarning):
    """An image that ``predict`` could not read and skipped (filter it with :mod:`warnings` if wanted)."""


class PredictionWriter(BasePredictionWriter):
    """Write each predicted mask as a palette PNG and an overlay JPEG (only acts in ``predict``).

    Images keep their own size, as viewers show them (turned by their EXIF orientation): the predict
    loader gives whole images, and the logits come back at that size (through the module's inference:
    plain, multi-scale + flip or sliding window). With ``crf=True`` the softmax is refined by the dense CRF
    (:func:`deeplab_lit.crf.dense_crf`, DeepLab v1/v2 post-processing) on the raw image before the
    arg-max. The raw image is recovered from the batch with the datamodule's ``normalization``, its
    palette from ``datamodule.palette``.

    Args:
        output_dir: Folder for ``<name>.png`` and ``<name>_overlay.jpg`` (created if missing).
        overlay: Also write the overlay (``palette`` format only: a server reads only the masks).
        alpha: Opacity of the mask colours in the overlay.
        crf: Refine the probabilities with the dense CRF before taking the labels.
        crf_preset: CRF parameters by name (``"deeplab_v2"`` or ``"deeplab_v1_largefov"``, see
            ``deeplab_lit.crf.PRESETS``).
        crf_backend: ``"auto"``, ``"pydensecrf"`` or ``"torch"`` (see :func:`deeplab_lit.crf.dense_crf`).
        skip_unreadable: Skip an image that cannot be read (corrupt, truncated, unsupported, a
            decompression bomb), with an :class:`UnreadableImageWarning` naming it and the reason, list
            every skipped file when predict ends (also in :attr:`skipped`), and go on with the rest; False:
            stop at the first one with its ValueError. The option lives here, with the other
            ``--prediction.*`` options of what predict writes, rather than on the datamodule, whose files
            serve training too, where an unreadable file is always an error.
        format: ``palette`` (class indices in the data set's colours), or an evaluation server's files:
            ``cityscapes`` (label IDs), ``voc`` (comp6 layout), ``ade20k`` (class + 1); see
            :mod:`deeplab_lit.callbacks.prediction_outputs`.

    Attributes:
        skipped: ``(path, reason)`` of every image skipped in the current (or last) predict run.
    """

    def __init__(
        self,
        output_dir: str = "predictions",
        overlay: bool = True,
        alpha: float = 0.5,
        crf: bool = False,
        crf_preset: str = "deeplab_v2",
        crf_backend: str = "auto",
        skip_unreadable: bool = True,
        format: PredictionFormat = "palette",  # the option's name on the command line
    ) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir = Path(output_dir)
        self.overlay = overlay
        self.alpha = alpha
        self.crf = crf
        self.crf_preset = crf_preset
        self.crf_backend = crf_backend
        self.skip_unreadable = skip_unreadable
        self.format = format
        self.skipped: list[tuple[str, str]] = []
        if crf:
            self._crf_params()  # an unknown preset fails now, not after the first batch

    def _crf_params(self) -> CRFParams:
        return CRFParams.from_preset(self.crf_preset)

    def output_files(self, name: str) -> list[Path]:
        """Files written for the input named ``name``: its mask, then its overlay if one is written."""
        files = [self.output_dir / mask_file(self.format, name)]
        if self.overlay and self.format == "palette":
            files.append(self.output_dir / f"{name}_overlay.jpg")
        return files

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the datamodule, the format's classes and every planned output; create the output folder.

        Raises:
            PredictionFormatError: the format's server has another class count than the model, or (for
                ``cityscapes``) an input's name has no ``<city>_<seq>_<frame>`` part.
            OutputCollisionError, OutputOverInputError: see
                :func:`~deeplab_lit.callbacks.prediction_outputs.check_outputs`.
        """
        _data_attributes(trainer)
        num_classes = getattr(pl_module, "hparams", {}).get("num_classes")
        if isinstance(num_classes, int):
            check_num_classes(self.format, num_classes)
        for dataset in _predict_datasets(trainer):
            paths, names = getattr(dataset, "paths", None), getattr(dataset, "names", None)
            if paths is not None and names is not None:  # an ImageFileDataset: every input known up front
                check_outputs(paths, [self.output_files(name) for name in names])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.skipped = []

    def on_predict_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Warn about (or stop at) the batch's unreadable images, before the batch is predicted."""
        for entry in batch.get("skipped", ()) if isinstance(batch, dict) else ():
            if not self.skip_unreadable:
                raise ValueError(
                    f"{entry['error']}\n(predict stops at the first unreadable image because "
                    "prediction.skip_unreadable is false; set it to true to skip such files and list them)"
                )
            warnings.warn(
                f"predict skips an unreadable image: {entry['error']}", UnreadableImageWarning, stacklevel=2
            )
            self.skipped.append((entry["path"], entry["error"]))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """List every image skipped in this run, so that none goes unnoticed under a long progress bar."""
        if self.skipped:
            listed = "\n".join(f"  {path}: {reason}" for path, reason in self.skipped)
            warnings.warn(
                f"predict skipped {len(self.skipped)} unreadable image(s); no mask was written for them:\n"
                f"{listed}",
                UnreadableImageWarning,
                stacklevel=2,
            )

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Write the PNG (and overlay) of every image of the batch, named by ``batch["name"]``."""
        if not batch["name"]:
            return  # every file of the batch was unreadable (see on_predict_batch_start)
        palette, normalization = _data_attributes(trainer)
        images = normalization.denormalize(batch["image"])  # uint8 RGB (N, 3, H, W)
        if self.crf:
            probs = prediction["logits"].float().softmax(dim=1)
            labels = dense_crf(probs, images.to(probs.device), self._crf_params(), self.crf_backend).argmax(1)
        else:
            labels = prediction["preds"]
        masks = labels.cpu().numpy()
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        for name, image, mask in zip(batch["name"], images, masks):
            mask_path, *overlay_path = self.output_files(name)
            save_mask(self.format, mask_path, mask, palette)
            for path in overlay_path:  # the format is given: Pillow would not know the extension of "..png"
                blended = overlay(image, mask, palette, self.alpha)
                Image.fromarray(blended).save(path, format="JPEG", quality=90)


def _predict_datasets(trainer: Trainer) -> list[Any]:
    """The datasets of the trainer's predict loader(s) (set up before ``on_predict_start``)."""
    loaders = trainer.predict_dataloaders
    if loaders is None:
        return []
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return [getattr(loader, "dataset", None) for loader in cast(list[Any], loaders)]


def _data_attributes(trainer: Trainer) -> tuple[np.ndarray, Any]:
    """``(palette, normalization)`` of the trainer's datamodule, or one ValueError saying what is missing."""
    datamodule = getattr(trainer, "datamodule", None)
    palette = getattr(datamodule, "palette", None)
    normalization = getattr(datamodule, "normalization", None)
    if palette is None or not hasattr(normalization, "denormalize"):
        found = "no datamodule" if datamodule is None else type(datamodule).__name__
        raise ValueError(
            "PredictionWriter needs the datamodule's `palette` (colours of the PNGs) and `normalization` "
            f"(to recover the image for the overlay and the CRF); the trainer has {found}. Predict with a "
            "deeplab_lit datamodule: trainer.predict(model, datamodule=...)"
        )
    return np.asarray(palette), normalization
