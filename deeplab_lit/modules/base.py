"""The one training/evaluation loop every DeepLab version shares.

A version differs only in :meth:`SegmentationModule.build_model` (which backbone, head, decoder and
defaults); the step, the loss, the optimiser, the "poly" schedule and the metrics live here once.

The papers' recipe is the default (DeepLab v2 Sec. 4.1, v3 Sec. 4.1): pixel-wise cross-entropy that
ignores label 255, SGD with momentum 0.9 and weight decay, the learning rate multiplied by
``(1 - iter / max_iter) ** 0.9`` every iteration, and a 10x learning rate on the newly added layers.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from deeplab_lit.inference import InferenceConfig, segment
from deeplab_lit.metrics import SegmentationMetrics

Batch = dict[str, Any]
STAGES = ("val", "test")


class SegmentationModule(LightningModule):
    """Shared LightningModule: ``model(x)`` gives logits (N, C, H, W) at the input's size.

    Args:
        num_classes: Number of classes, void excluded (21 for VOC, 19 for Cityscapes).
        backbone: Backbone name (see ``deeplab_lit.models.BACKBONES``).
        pretrained_backbone: ``True`` for torchvision/timm ImageNet weights, a weights-enum name, or a
            local state-dict path; ``False`` for random initialisation.
        lr: Base learning rate (backbone); new layers get ``lr * head_lr_mult``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (L2).
        poly_power: Exponent of the "poly" schedule, stepped every iteration.
        head_lr_mult: Learning-rate multiplier of the layers not in the backbone (10 in the papers).
        freeze_bn: Keep the backbone's BatchNorm statistics and affine parameters fixed (DeepLab v2,
            trained with small batches).
        ignore_index: Label that contributes neither loss nor metric.
        aux_weight: Loss weight of an auxiliary head's output (outputs named ``aux*``).
        inference: Evaluation-time inference (multi-scale, flip, sliding window).
        class_names: Names for per-class metrics; defaults to ``class_0..``. Linked from the data by the CLI.
    """

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet101",
        pretrained_backbone: bool | str = False,
        lr: float = 0.007,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        head_lr_mult: float = 10.0,
        freeze_bn: bool = False,
        ignore_index: int = 255,
        aux_weight: float = 0.4,
        inference: InferenceConfig = InferenceConfig(),
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.save_hyperparameters()
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.inference_config = inference
        self.model = self.build_model()
        if freeze_bn:
            for module in self.backbone_modules():
                if isinstance(module, _BatchNorm):
                    module.requires_grad_(False)
            self.train(self.training)  # frozen BatchNorm starts in eval mode
        self.metrics = nn.ModuleDict({stage: SegmentationMetrics(num_classes, ignore_index) for stage in STAGES})

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Build the network from ``self.hparams``; it must offer ``forward`` and ``forward_train``."""

    def backbone_modules(self) -> list[nn.Module]:
        """Modules of the (ImageNet-initialised) backbone, which train at the base learning rate."""
        return [m for name, m in self.model.named_modules() if ".backbone." in f".{name}."]

    def forward(self, images: Tensor) -> Tensor:
        """Logits (N, C, H, W) at the input's size for normalised images (N, 3, H, W)."""
        return self.model(images)

    def train(self, mode: bool = True) -> SegmentationModule:
        """Switch train/eval mode, keeping frozen BatchNorm layers in eval mode."""
        super().train(mode)
        if mode and self.hparams.freeze_bn:
            for module in self.backbone_modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    # ----------------------------------------------------------------------------------- loss
    def compute_loss(self, outputs: dict[str, Tensor], masks: Tensor) -> Tensor:
        """Cross-entropy summed over the outputs (MSC scales at weight 1, ``aux*`` at ``aux_weight``)."""
        total = masks.new_zeros((), dtype=torch.float32)
        for name, logits in outputs.items():
            weight = self.hparams.aux_weight if name.startswith("aux") else 1.0
            loss = F.cross_entropy(logits.float(), masks, ignore_index=self.hparams.ignore_index)
            total = total + weight * loss
        return total

    # ---------------------------------------------------------------------------------- steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """One iteration: every output of ``forward_train`` against the mask."""
        images, masks = batch["image"], batch["mask"]
        loss = self.compute_loss(self.model.forward_train(images), masks)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        images, masks = batch["image"], batch["mask"]
        logits = segment(self.model, images, self.inference_config)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.hparams.ignore_index)
        preds = logits.argmax(dim=1)
        self.metrics[stage].update(preds, masks)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=images.shape[0], sync_dist=True)
        return {"logits": logits, "preds": preds}

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Whole-image inference; returns ``{"logits", "preds"}`` for callbacks (e.g. the dense CRF)."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """As :meth:`validation_step`, logged under ``test/``."""
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Logits and labels for a batch of images, with the batch's names/paths passed through."""
        logits = segment(self.model, batch["image"], self.inference_config)
        extras = {k: v for k, v in batch.items() if k != "image"}
        return {"logits": logits, "preds": logits.argmax(dim=1), **extras}

    def _log_epoch_scores(self, stage: str) -> None:
        scores = self.metrics[stage].compute()
        self.log_dict(
            {f"{stage}/{key}": scores[key] for key in ("mIoU", "pixel_acc", "mean_acc")}, prog_bar=stage == "val"
        )
        per_class = {
            f"{stage}/IoU/{name}": iou for name, iou in zip(self.class_names, scores["iou"]) if not iou.isnan()
        }
        self.log_dict(per_class)
        self.metrics[stage].reset()

    def on_validation_epoch_end(self) -> None:
        """Log mIoU, pixel accuracy, mean accuracy and per-class IoU over the whole validation set."""
        self._log_epoch_scores("val")

    def on_test_epoch_end(self) -> None:
        """As :meth:`on_validation_epoch_end`, for the test set."""
        self._log_epoch_scores("test")

    # ------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with a 10x head learning rate and the per-iteration poly schedule."""
        backbone_ids = {id(p) for m in self.backbone_modules() for p in m.parameters(recurse=False)}
        backbone, head = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (backbone if id(param) in backbone_ids else head).append(param)
        hp = self.hparams
        groups = [{"params": backbone, "lr": hp.lr}, {"params": head, "lr": hp.lr * hp.head_lr_mult}]
        optimizer = torch.optim.SGD(
            [g for g in groups if g["params"]], lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=hp.poly_power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
