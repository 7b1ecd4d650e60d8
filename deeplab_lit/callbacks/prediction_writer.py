"""``PredictionWriter``: ``predict`` writes a palette PNG of the labels and an overlay for every image.

``deeplab-lit predict --config X.yaml --ckpt_path best.ckpt --data.init_args.predict_path photos/
--prediction.output_dir out/`` turns a file, a folder or a glob of images into, per image,

- ``out/<name>.png``: the label mask as a palette ("P") PNG, one class index per pixel, coloured with the
  data set's palette (VOC colours; Cityscapes colours for Cityscapes); reading its pixel values gives the
  labels back (``deeplab_lit.data.images.read_mask``);
- ``out/<name>_overlay.jpg``: the mask's colours blended over the original image.

Images keep their own size, as viewers show them (turned by their EXIF orientation): the predict loader
gives whole images, and the logits come back at that size (through the module's inference: plain,
multi-scale + flip or sliding window). With ``crf=True`` the
softmax is refined by the dense CRF (:func:`deeplab_lit.crf.dense_crf`, DeepLab v1/v2 post-processing)
on the raw image before the arg-max. The raw image is recovered from the batch with the datamodule's
``normalization``, its palette from ``datamodule.palette``.

A file that cannot be read (corrupt, truncated, unsupported) is skipped with a warning naming it and the
reason, and every skipped file is listed again when predict ends (``--prediction.skip_unreadable false``
stops at the first one instead).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from deeplab_lit.visualize import overlay


def save_palette_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Save ``labels`` (H, W) in 0..255 as a palette PNG whose colour ``i`` is ``palette[i]``."""
    image = Image.fromarray(labels.astype(np.uint8))  # mode "L"; putpalette makes it "P", indices kept
    image.putpalette(np.asarray(palette, dtype=np.uint8)[:256].tobytes())
    image.save(path)


class UnreadableImageWarning(UserWarning):
    """An image that ``predict`` could not read and skipped (filter it with :mod:`warnings` if wanted)."""


class PredictionWriter(BasePredictionWriter):
    """Write each predicted mask as a palette PNG and an overlay JPEG (only acts in ``predict``).

    Args:
        output_dir: Folder for ``<name>.png`` and ``<name>_overlay.jpg`` (created if missing).
        overlay: Also write the overlay.
        alpha: Opacity of the mask colours in the overlay.
        crf: Refine the probabilities with the dense CRF before taking the labels.
        crf_preset: CRF parameters by name (``"deeplab_v2"`` or ``"deeplab_v1_largefov"``, see
            ``deeplab_lit.crf.PRESETS``).
        crf_backend: ``"auto"``, ``"pydensecrf"`` or ``"torch"`` (see :func:`deeplab_lit.crf.dense_crf`).
        skip_unreadable: Skip an image that cannot be read, with an :class:`UnreadableImageWarning` naming
            it and the reason, list every skipped file when predict ends (also in :attr:`skipped`), and
            go on with the rest; False: stop at the first one with its ValueError. The option lives here,
            with the other ``--prediction.*`` options of what predict writes, rather than on the
            datamodule, whose files serve training too, where an unreadable file is always an error.

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
        self.skipped: list[tuple[str, str]] = []
        if crf:
            self._crf_params()  # an unknown preset fails now, not after the first batch

    def _crf_params(self) -> Any:
        from deeplab_lit.crf import CRFParams

        return CRFParams.from_preset(self.crf_preset)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check that the datamodule gives a palette and a normalisation; create the output folder."""
        _data_attributes(trainer)
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
            from deeplab_lit.crf import dense_crf

            probs = prediction["logits"].float().softmax(dim=1)
            labels = dense_crf(probs, images.to(probs.device), self._crf_params(), self.crf_backend).argmax(1)
        else:
            labels = prediction["preds"]
        masks = labels.cpu().numpy()
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        for name, image, mask in zip(batch["name"], images, masks):
            save_palette_png(self.output_dir / f"{name}.png", mask, palette)
            if self.overlay:
                blended = overlay(image, mask, palette, self.alpha)
                Image.fromarray(blended).save(self.output_dir / f"{name}_overlay.jpg", quality=90)


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
