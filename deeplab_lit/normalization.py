"""Input normalisation: how raw uint8 RGB pixels become the float tensor a model sees.

Normalisation belongs to the data and the weights together: torchvision's ImageNet weights expect
RGB scaled to 0-1 then standardised, while the Caffe-trained DeepLab checkpoints
(kazuto1011/deeplab-pytorch) expect BGR in 0-255 with the mean subtracted and no scaling. One small
value object describes both, is exposed by every datamodule (``normalization``), recorded in
checkpoints and checked against the data's
(:meth:`~deeplab_lit.modules.base.SegmentationModule.on_save_checkpoint`, ``setup``), and used by the
CRF callback to recover the raw image (README, "Published weights" and "Dense CRF").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine normalisation, with statistics given in 0-255 pixel units, RGB order.

    ``normalised = (pixel[order] - mean[order]) / std[order]`` where ``order`` is RGB or BGR.

    Attributes:
        mean: Channel means in 0-255 units, listed in RGB order.
        std: Channel standard deviations in 0-255 units, listed in RGB order.
        bgr: If True the model's channel order is BGR (Caffe-trained weights).
    """

    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    bgr: bool = False

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(
                f"Normalization needs 3 channel means and stds, got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalization std must be positive, got {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=like.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=like.device)
        if self.bgr:
            mean, std = mean.flip(0), std.flip(0)
        return mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def normalize(self, images: Tensor) -> Tensor:
        """Map uint8 RGB images ``(..., 3, H, W)`` to the model's float input."""
        if images.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 RGB images, got dtype {images.dtype}")
        # Contiguous first: albumentations' ToTensorV2 hands over a channels-first *view* of HWC pixels,
        # on which these element-wise ops and the DataLoader's collate run ~2x slower (strided; BENCHMARKS.md,
        # "Models on the GPU machine (third session)").
        x = images.contiguous().float()
        if self.bgr:
            x = x.flip(-3)
        mean, std = self._stats(x)
        return x.sub_(mean).div_(std)  # in place on the fresh float copy: one allocation per batch

    def denormalize(self, images: Tensor) -> Tensor:
        """Recover uint8 RGB images ``(..., 3, H, W)`` from normalised model input."""
        mean, std = self._stats(images)
        x = images.float() * std + mean
        if self.bgr:
            x = x.flip(-3)
        return x.round().clamp_(0, 255).to(torch.uint8)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, for checkpoints and hyper-parameters."""
        return asdict(self)


#: torchvision's ImageNet statistics, the default for every backbone trained by torchvision or timm.
IMAGENET = Normalization()
#: Caffe DeepLab (kazuto1011/deeplab-pytorch): BGR, 0-255, mean subtraction only.
CAFFE_BGR = Normalization(mean=(122.675, 116.669, 104.008), std=(1.0, 1.0, 1.0), bgr=True)
