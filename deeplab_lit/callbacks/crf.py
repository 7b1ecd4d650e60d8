"""``DenseCRFCallback``: mIoU before and after the fully-connected CRF, for every validation and test run.

DeepLab v1 and v2 post-process the network's scores with Krähenbühl and Koltun's dense CRF (DeepLab v2
Sec. 3.3) and report mIoU before and after it (v2 Table 4), and the mIoU inside narrow bands around object
boundaries, where the CRF helps most (the "trimap" of v1 Sec. 4.2 / v2 Fig. 10). This callback measures
both in the training loop: it refines the logits each ``validation_step``/``test_step`` returns with
:func:`deeplab_lit.crf.dense_crf` on the raw image, which it recovers from the normalised batch through the
datamodule's ``normalization``, and accumulates torchmetrics confusion matrices over the whole set.

Under DDP every process refines the batches of its own shard; the confusion matrices are summed across
processes when the scores are computed, so the figures are those of the whole set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from deeplab_lit.crf import BACKENDS, CRFParams, dense_crf
from deeplab_lit.crf.pydensecrf_backend import require_pydensecrf
from deeplab_lit.metrics import DEFAULT_BAND_WIDTHS, BoundaryBandIoU, SegmentationMetrics

#: Evaluation stages the callback can run in.
CRF_STAGES = ("val", "test")
_PARAM_NAMES = ("iterations", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std")


class _StageMetrics(nn.ModuleDict):
    """One evaluation stage's metrics, by name (``metrics["crf"]``) or typed attribute (``metrics.crf``)."""

    crf: SegmentationMetrics  # after the CRF
    baseline: SegmentationMetrics  # before it, on the same batches
    band_crf: BoundaryBandIoU  # trimap mIoU after the CRF
    band: BoundaryBandIoU  # and before it

    def __init__(self, num_classes: int, ignore_index: int, band_widths: Sequence[int]) -> None:
        super().__init__(
            {
                "crf": SegmentationMetrics(num_classes, ignore_index),
                "baseline": SegmentationMetrics(num_classes, ignore_index),
                "band_crf": BoundaryBandIoU(num_classes, band_widths, ignore_index),
                "band": BoundaryBandIoU(num_classes, band_widths, ignore_index),
            }
        )

    def reset(self) -> None:
        """Forget everything accumulated."""
        for metric in (self.crf, self.baseline, self.band_crf, self.band):
            metric.reset()


class DenseCRFCallback(Callback):
    """Apply the dense CRF to validation/test predictions and log mIoU and trimap mIoU before and after.

    At the end of each evaluation run in which the CRF ran, it logs (``val/`` or ``test/``):

    * ``{stage}/mIoU_crf``: mIoU of the CRF-refined predictions;
    * ``{stage}/mIoU_crf_baseline``: mIoU of the plain predictions on the same images. It equals the
      module's ``{stage}/mIoU`` when the CRF saw the whole set; with ``max_batches`` it is the figure to
      compare ``mIoU_crf`` with, since ``{stage}/mIoU`` then covers images the CRF never saw;
    * ``{stage}/trimap_mIoU/{w}px`` and ``{stage}/trimap_mIoU_crf/{w}px``: mIoU within ``w`` pixels of a
      ground-truth boundary, before and after the CRF, on the same images, for each ``w`` in
      ``band_widths``.

    Nothing is logged by a run in which the CRF is inactive (not an N-th epoch, not the last epoch, or the
    sanity check). The scores come from confusion matrices summed over the whole set (and over processes
    under DDP), so they are exact set-level figures, not averages of per-batch ones; several validation
    dataloaders are pooled into one figure.

    The raw image is recovered as ``trainer.datamodule.normalization.denormalize(batch["image"])``, so the
    trainer needs a datamodule with a ``normalization`` (every deeplab_lit datamodule has one).

    Args:
        preset: Named CRF parameters (``"deeplab_v2"`` or ``"deeplab_v1_largefov"``, see
            :data:`deeplab_lit.crf.PRESETS`).
        iterations: Mean-field iterations; overrides the preset's when given.
        pos_w: Weight of the spatial (smoothness) kernel; overrides the preset's when given.
        pos_xy_std: Spatial standard deviation of the smoothness kernel, in pixels.
        bi_w: Weight of the bilateral (appearance) kernel.
        bi_xy_std: Spatial standard deviation of the bilateral kernel, in pixels.
        bi_rgb_std: Colour standard deviation of the bilateral kernel, in 0-255 units.
        backend: ``"auto"`` (the faster where it runs: torch, but pydensecrf with one CPU thread; see
            :func:`deeplab_lit.crf.dense.auto_backend`), ``"pydensecrf"`` or ``"torch"``.
        num_workers: Processes of the pydensecrf pool (per training process); None = the cores available.
        every_n_epochs: During ``fit``, run in the validations of every N-th epoch (epochs ``N-1, 2N-1, ...``
            counted from 0, as ``ModelCheckpoint(every_n_epochs=N)``) and of the last epoch, so the final
            model is always measured. With ``val_check_interval`` a validation belongs to the epoch it
            falls in. Standalone ``validate``/``test`` always run.
        only_last_epoch: During ``fit``, run only in the validations of the last epoch (the one that reaches
            ``max_epochs`` or ``max_steps``); exclusive with ``every_n_epochs > 1``.
        max_batches: Refine at most this many batches per evaluation run and per process (None = all).
            The before/after figures then cover those batches only (compare with ``mIoU_crf_baseline``).
        band_widths: Half-widths in pixels of the trimap bands around ground-truth boundaries.
        stages: Which evaluation runs use the CRF: ``"val"``, ``"test"`` or both.

    Raises:
        ValueError: On an unknown preset, backend or stage, a CRF parameter out of range, or a
            non-positive ``every_n_epochs``, ``max_batches``, ``num_workers`` or band width.
        ImportError: If ``backend="pydensecrf"`` and pydensecrf is not installed.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: deeplab_lit.callbacks.DenseCRFCallback
              init_args: {preset: deeplab_v2, max_batches: 50}
    """

    def __init__(
        self,
        preset: str = "deeplab_v2",
        iterations: int | None = None,
        pos_w: float | None = None,
        pos_xy_std: float | None = None,
        bi_w: float | None = None,
        bi_xy_std: float | None = None,
        bi_rgb_std: float | None = None,
        backend: str = "auto",
        num_workers: int | None = None,
        every_n_epochs: int = 1,
        only_last_epoch: bool = False,
        max_batches: int | None = None,
        band_widths: Sequence[int] = DEFAULT_BAND_WIDTHS,
        stages: Sequence[str] = CRF_STAGES,
    ) -> None:
        super().__init__()
        overrides: dict[str, Any] = dict(
            zip(_PARAM_NAMES, (iterations, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std))
        )
        #: The CRF parameters in use: the preset with the explicit overrides applied.
        self.params: CRFParams = dataclasses.replace(
            CRFParams.from_preset(preset), **{k: v for k, v in overrides.items() if v is not None}
        )
        if backend not in BACKENDS:
            raise ValueError(f"DenseCRFCallback backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "pydensecrf":
            require_pydensecrf()
        _check_count("num_workers", num_workers, allow_none=True)
        _check_count("every_n_epochs", every_n_epochs)
        _check_count("max_batches", max_batches, allow_none=True)
        if only_last_epoch and every_n_epochs != 1:
            raise ValueError(
                f"DenseCRFCallback: only_last_epoch=True and every_n_epochs={every_n_epochs} contradict "
                "each other; set one of them"
            )
        if isinstance(band_widths, str | bytes) or not band_widths:
            raise ValueError(f"band_widths must be a non-empty list of pixel counts, got {band_widths!r}")
        for width in band_widths:
            _check_count("band_widths entry", width)
        if isinstance(stages, str) or not stages or not set(stages) <= set(CRF_STAGES):
            raise ValueError(f"stages must be a non-empty list drawn from {CRF_STAGES}, got {stages!r}")
        self.backend = backend
        self.num_workers = num_workers
        self.every_n_epochs = every_n_epochs
        self.only_last_epoch = only_last_epoch
        self.max_batches = max_batches
        self.band_widths = tuple(int(w) for w in band_widths)
        self.stages = tuple(dict.fromkeys(stages))
        #: Per stage: ``crf`` and ``baseline`` (:class:`SegmentationMetrics` after/before the CRF on the
        #: refined images), ``band_crf`` and ``band`` (:class:`BoundaryBandIoU`). Built in :meth:`setup`.
        self.metrics: dict[str, _StageMetrics] = {}
        self._active = dict.fromkeys(CRF_STAGES, False)
        self._batches_done = dict.fromkeys(CRF_STAGES, 0)

    # ------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check that the raw image can be recovered and build the metrics on the module's device."""
        runs = {"fit": ("val",), "validate": ("val",), "test": ("test",)}.get(stage, ())
        if not set(runs) & set(self.stages):
            return
        _normalization(trainer)
        num_classes, ignore_index = _label_space(trainer, pl_module)
        for name in self.stages:
            self.metrics[name] = _StageMetrics(num_classes, ignore_index, self.band_widths)
            self.metrics[name].to(pl_module.device)

    def is_active(self, trainer: Trainer, stage: str) -> bool:
        """Whether the CRF runs in the current ``stage`` run (``"val"`` or ``"test"``) of ``trainer``."""
        if stage not in self.stages or trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        if _in_last_epoch(trainer):
            return True
        return not self.only_last_epoch and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # ------------------------------------------------------------------------------------- hooks
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Decide whether this validation run uses the CRF."""
        self._start("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Decide whether this test run uses the CRF."""
        self._start("test", trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Refine the step's logits with the CRF and update the before/after metrics."""
        self._update("val", trainer, outputs, batch)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """As :meth:`on_validation_batch_end`, for the test set."""
        self._update("test", trainer, outputs, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``val/mIoU_crf``, ``val/mIoU_crf_baseline`` and the trimap mIoUs, then reset."""
        self._log_and_reset("val", pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``test/mIoU_crf``, ``test/mIoU_crf_baseline`` and the trimap mIoUs, then reset."""
        self._log_and_reset("test", pl_module)

    # ----------------------------------------------------------------------------------- helpers
    def _start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        self._batches_done[stage] = 0
        self._active[stage] = self.is_active(trainer, stage)
        if self._active[stage]:
            self.metrics[stage].to(pl_module.device)
            self.metrics[stage].reset()

    def _update(self, stage: str, trainer: Trainer, outputs: Any, batch: Any) -> None:
        if not self._active[stage]:
            return
        if self.max_batches is not None and self._batches_done[stage] >= self.max_batches:
            return
        if not isinstance(outputs, dict) or "logits" not in outputs:
            raise TypeError(
                f"DenseCRFCallback needs the {stage} step to return a dict with 'logits' (N, C, H, W), "
                f"got {type(outputs).__name__}"
            )
        if not isinstance(batch, dict) or "image" not in batch or "mask" not in batch:
            raise TypeError(f"DenseCRFCallback needs {stage} batches as dicts with 'image' and 'mask'")
        logits: Tensor = outputs["logits"]
        masks: Tensor = batch["mask"]
        metrics = self.metrics[stage]
        if logits.shape[1] != metrics.crf.num_classes:
            raise ValueError(
                f"the {stage} logits have {logits.shape[1]} classes, the module says "
                f"num_classes={metrics.crf.num_classes}"
            )
        with torch.no_grad():
            images = _normalization(trainer).denormalize(batch["image"])
            probs = logits.float().softmax(dim=1)
            refined = dense_crf(probs, images, self.params, self.backend, self.num_workers).argmax(dim=1)
            preds = outputs.get("preds")
            preds = logits.argmax(dim=1) if preds is None else preds
            metrics.crf.update(refined, masks)
            metrics.baseline.update(preds, masks)
            metrics.band_crf.update(refined, masks)
            metrics.band.update(preds, masks)
        self._batches_done[stage] += 1

    def _log_and_reset(self, stage: str, pl_module: LightningModule) -> None:
        if not self._active[stage]:
            return
        self._active[stage] = False
        metrics = self.metrics[stage]
        scores = {
            f"{stage}/mIoU_crf": metrics.crf.compute()["mIoU"],
            f"{stage}/mIoU_crf_baseline": metrics.baseline.compute()["mIoU"],
        }
        for width, miou in metrics.band.compute().items():
            scores[f"{stage}/trimap_mIoU/{width}px"] = miou
        for width, miou in metrics.band_crf.compute().items():
            scores[f"{stage}/trimap_mIoU_crf/{width}px"] = miou
        for name, value in scores.items():
            # Already reduced across processes by torchmetrics: every process logs the same value.
            pl_module.log(name, value, prog_bar=name == f"{stage}/mIoU_crf")
        metrics.reset()


def _check_count(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"DenseCRFCallback {name} must be {expected}, got {value!r}")


def _normalization(trainer: Trainer) -> Any:
    """Return the datamodule's ``Normalization``, which maps model input back to uint8 RGB."""
    datamodule = getattr(trainer, "datamodule", None)
    normalization = getattr(datamodule, "normalization", None)
    if normalization is None or not hasattr(normalization, "denormalize"):
        found = "no datamodule" if datamodule is None else f"{type(datamodule).__name__} without one"
        raise ValueError(
            "DenseCRFCallback needs the raw RGB image, which it recovers through the datamodule's "
            f"`normalization` (a deeplab_lit.normalization.Normalization); the trainer has {found}. "
            "Pass a deeplab_lit datamodule (trainer.fit/validate/test(model, datamodule=...))"
        )
    return normalization


def _label_space(trainer: Trainer, pl_module: LightningModule) -> tuple[int, int]:
    """Return ``(num_classes, ignore_index)`` from the module's hparams, else from the datamodule."""
    hparams = getattr(pl_module, "hparams", {})
    datamodule = getattr(trainer, "datamodule", None)  # set by Lightning's data connector, not declared
    num_classes = hparams.get("num_classes", getattr(datamodule, "num_classes", None))
    ignore_index = hparams.get("ignore_index", getattr(datamodule, "ignore_index", 255))
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            "DenseCRFCallback needs the number of classes: the module's hparams.num_classes or the "
            f"datamodule's num_classes, got {num_classes!r}"
        )
    return num_classes, int(ignore_index)


def _in_last_epoch(trainer: Trainer) -> bool:
    """Tell whether training ends with this epoch (by ``max_steps`` or ``max_epochs``)."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs > 0 and trainer.current_epoch >= max_epochs - 1
