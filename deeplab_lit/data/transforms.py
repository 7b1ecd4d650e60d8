"""Augmentation pipelines (albumentations) that turn decoded pixels into the model's tensors.

Training follows the DeepLab recipe (v2 Sec. 4, v3 Sec. 4.1): random scale in ``scale_range`` with the
aspect ratio kept, pad to ``crop_size`` (image with the mean pixel, mask with the ignore label 255),
random ``crop_size`` x ``crop_size`` crop, random horizontal flip. Evaluation keeps the whole image.
Both end with :class:`~deeplab_lit.normalization.Normalization` applied to the uint8 tensor, so its
arithmetic (RGB/BGR, 0-255 statistics) lives in one place only.

Output of every pipeline: ``image`` float32 ``(3, H, W)`` normalised, ``mask`` int64 ``(H, W)``.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would otherwise query PyPI on import

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset

from deeplab_lit.normalization import IMAGENET, Normalization

IGNORE_INDEX = 255


class SegmentationTransform:
    """An albumentations pipeline followed by normalisation; picklable for DataLoader workers.

    Args:
        augment: Geometric/photometric albumentations steps on uint8 ``(H, W, 3)`` pixels.
        normalization: Maps the uint8 RGB tensor to the model's input.
        seed: Seed of the pipeline's own random state (albumentations ignores global seeds).
        normalize: False: return the uint8 ``(3, H, W)`` tensor, for normalisation on the GPU after the
            batch is transferred (4x fewer bytes to collate, pin and copy; see the datamodules'
            ``normalize_on_device``).
    """

    def __init__(
        self,
        augment: list[A.BasicTransform],
        normalization: Normalization,
        seed: int | None = None,
        normalize: bool = True,
    ):
        self.normalization = normalization
        self.normalize = normalize
        self.pipeline = A.Compose([*augment, ToTensorV2()], seed=seed)

    def set_random_seed(self, seed: int) -> None:
        """Reseed the augmentation state (one call per DataLoader worker, see ``seed_worker``)."""
        self.pipeline.set_random_seed(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[Tensor, Tensor | None]:
        """Transform one sample.

        Args:
            image: ``uint8`` RGB pixels ``(H, W, 3)``.
            mask: Class indices ``(H, W)`` with 255 = ignore, or None (prediction).

        Returns:
            ``(image, mask)``: float32 ``(3, h, w)`` normalised (uint8 with ``normalize=False``), and
            int64 ``(h, w)`` or None.
        """
        out = self.pipeline(image=image) if mask is None else self.pipeline(image=image, mask=mask)
        pixels = out["image"]
        pixels = self.normalization.normalize(pixels) if self.normalize else pixels.contiguous()
        return pixels, None if mask is None else out["mask"].long()

    def __repr__(self) -> str:
        steps, normalization = self.pipeline.transforms, self.normalization
        return f"SegmentationTransform({steps}, {normalization}, normalize={self.normalize})"


def train_transform(
    crop_size: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    normalization: Normalization = IMAGENET,
    seed: int | None = None,
    normalize: bool = True,
) -> SegmentationTransform:
    """Build the DeepLab training augmentation: scale, pad, crop, flip, normalise.

    Args:
        crop_size: Side of the square training crop (321 for VOC in v1/v2, 513 in v3/v3+, 769 for Cityscapes).
        scale_range: Range of the random scale factor, sampled uniformly; aspect ratio is kept.
        normalization: Input normalisation; its mean (0-255 RGB) is also the image padding value.
        seed: Seed of the augmentation's random state (None: fresh entropy).
        normalize: False: leave the crops uint8 (see :class:`SegmentationTransform`).

    Returns:
        A transform whose outputs are exactly ``crop_size`` x ``crop_size``.
    """
    if crop_size < 1:
        raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    mean_pixel = tuple(int(round(m)) for m in normalization.mean)
    augment = [
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR, p=1.0),
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=mean_pixel,
            fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
        A.HorizontalFlip(p=0.5),
    ]
    return SegmentationTransform(augment, normalization, seed=seed, normalize=normalize)


def eval_transform(normalization: Normalization = IMAGENET, normalize: bool = True) -> SegmentationTransform:
    """Evaluation/prediction: the whole image at its own size, normalised (uint8 with ``normalize=False``)."""
    return SegmentationTransform([], normalization, seed=0, normalize=normalize)


def augmentation_seed(base: int) -> int:
    """Seed of an augmentation stream: ``base`` mixed with this process's global (DDP) rank.

    Under DDP every rank runs ``seed_everything`` with the same seed, so a seed drawn from torch alone
    would give every rank the same scales, crops and flips (on different images). Mixing in the rank
    Lightning assigned keeps ranks apart and a single-process run unchanged across rank counts.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank = int(getattr(rank_zero_only, "rank", 0) or 0)
    return int(np.random.SeedSequence([base % 2**32, rank]).generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker its own augmentation stream.

    albumentations keeps its random state inside the pipeline, so forked workers would otherwise
    repeat one another's crops, and every epoch's fresh workers would repeat the last epoch's.
    ``torch.initial_seed()`` differs per worker and per epoch and follows ``seed_everything``; the DDP
    rank is mixed in by :func:`augmentation_seed`. Every transform of the worker's dataset is reseeded,
    also those inside a ``ConcatDataset`` (Cityscapes ``trainval``), nested ones and ``Subset`` s: a
    transform shared by several parts once, distinct transforms each with their own seed.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    seed = augmentation_seed(torch.initial_seed())
    for index, transform in enumerate(_dataset_transforms(info.dataset)):
        # index 0 keeps the single-dataset seed; the others draw from (seed, index), apart from every worker's
        part_seed = seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        transform.set_random_seed(part_seed)


def _dataset_transforms(dataset: Dataset[Any]) -> list[SegmentationTransform]:
    """List the distinct :class:`SegmentationTransform` s of ``dataset`` and the datasets it wraps."""
    found: dict[int, SegmentationTransform] = {}
    pending = [dataset]
    while pending:
        current = pending.pop(0)
        transform = getattr(current, "transform", None)
        if isinstance(transform, SegmentationTransform):
            found.setdefault(id(transform), transform)
        if isinstance(current, ConcatDataset):
            pending.extend(current.datasets)
        elif isinstance(current, Subset):
            pending.append(current.dataset)
    return list(found.values())
