"""Synthetic CRF inputs: photo-like images with sharp object edges and a blurred, noisy softmax.

Used by the tests and the benchmark to compare the two CRF backends and to show that the CRF snaps
blurred predictions to image edges, without any data on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _smooth_noise(
    generator: torch.Generator, shape: tuple[int, ...], size: tuple[int, int], cell: int
) -> Tensor:
    """Low-frequency noise ``shape + size``: random values on a coarse grid, bilinearly upsampled."""
    coarse = torch.randn(*shape, max(2, size[0] // cell), max(2, size[1] // cell), generator=generator)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def synthetic_scene(
    batch: int = 1,
    num_classes: int = 5,
    height: int = 40,
    width: int = 50,
    seed: int = 0,
    output_stride: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """Make a batch of scenes: labels, photo-like images and the softmax of a blurry, noisy classifier.

    Each scene is a background with random ellipses and rectangles of the other classes. The image gives
    every class a colour, adds smooth shading and pixel noise; the probabilities come from one-hot logits
    average-pooled by ``output_stride`` and upsampled (the blur of a stride-8 network), plus smooth and pixel
    noise, so that boundaries are wrong by a few pixels and a few regions are confused.

    Args:
        batch: Number of scenes N.
        num_classes: Number of classes C (>= 2).
        height: Image height H.
        width: Image width W.
        seed: Seed of the scenes.
        output_stride: Blur of the simulated classifier, in pixels.

    Returns:
        ``labels`` int64 (N, H, W), ``images`` uint8 (N, 3, H, W) RGB, ``probs`` float32 (N, C, H, W).
    """
    if num_classes < 2:
        raise ValueError(f"synthetic_scene needs num_classes >= 2, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(height, dtype=torch.float32)[:, None]
    x = torch.arange(width, dtype=torch.float32)[None, :]
    labels = torch.zeros(batch, height, width, dtype=torch.int64)
    for n in range(batch):
        for _ in range(3 + num_classes):
            cls = int(torch.randint(1, num_classes, (1,), generator=gen))
            cy, cx = float(torch.rand(1, generator=gen)) * height, float(torch.rand(1, generator=gen)) * width
            ry = (0.1 + 0.25 * float(torch.rand(1, generator=gen))) * height
            rx = (0.1 + 0.25 * float(torch.rand(1, generator=gen))) * width
            if float(torch.rand(1, generator=gen)) < 0.5:
                inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
            else:
                inside = ((y - cy).abs() <= ry) & ((x - cx).abs() <= rx)
            labels[n][inside] = cls
    colours = torch.rand(batch, num_classes, 3, generator=gen) * 200 + 25
    image = torch.gather(colours, 1, labels.reshape(batch, -1, 1).expand(-1, -1, 3))
    image = image.reshape(batch, height, width, 3).permute(0, 3, 1, 2)
    image = image + 20 * _smooth_noise(gen, (batch, 3), (height, width), 16)
    image = image + 3 * torch.randn(batch, 3, height, width, generator=gen)
    images = image.round().clamp(0, 255).to(torch.uint8)
    one_hot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    pooled = F.avg_pool2d(one_hot, output_stride, ceil_mode=True)
    logits = 4 * F.interpolate(pooled, size=(height, width), mode="bilinear", align_corners=False)
    logits = logits + 1.0 * _smooth_noise(gen, (batch, num_classes), (height, width), 12)
    logits = logits + 0.3 * torch.randn(batch, num_classes, height, width, generator=gen)
    return labels, images, logits.softmax(1)
