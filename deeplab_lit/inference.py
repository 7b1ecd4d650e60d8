"""Whole-image inference: plain, multi-scale + flip test-time augmentation, and sliding windows.

Used by ``validate``, ``test`` and ``predict`` alike, so that an evaluation figure and a written mask
always come from the same code. Every function maps normalised images (N, 3, H, W) to logits
(N, C, H, W) at the input's size.

Multi-scale + flip follows DeepLab v3 Sec. 4.4 / v3+ Sec. 4: the image is resized to each scale (and
mirrored), the logits are resized back and averaged. Sliding windows (for Cityscapes' 1024x2048
frames, larger than a training crop) tile the image with overlapping windows and average the logits
where windows overlap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Model = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class InferenceConfig:
    """How to turn an image into logits at evaluation time.

    Attributes:
        scales: Input scales whose logits are averaged (``(1.0,)`` = plain inference).
        flip: Also average the horizontally mirrored input's logits.
        window: Sliding-window size ``(height, width)`` in pixels at each scale; ``None`` = whole image.
        overlap: Fraction of a window shared with its neighbour, in ``[0, 1)``.
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: tuple[int, int] | None = None
    overlap: float = 1 / 3

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"inference scales must be positive numbers, got {self.scales}")
        if self.window is not None and (len(self.window) != 2 or min(self.window) < 1):
            raise ValueError(f"sliding window must be (height, width) in pixels, got {self.window}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"window overlap must be in [0, 1), got {self.overlap}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.window is not None:
            object.__setattr__(self, "window", (int(self.window[0]), int(self.window[1])))

    @property
    def is_plain(self) -> bool:
        """True when inference is a single forward pass on the whole image."""
        return self.scales == (1.0,) and not self.flip and self.window is None


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``size``, the last one flush with the end."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(count)})


def sliding_window(model: Model, images: Tensor, window: tuple[int, int], overlap: float = 1 / 3) -> Tensor:
    """Logits from overlapping windows, averaged where they overlap.

    A window larger than the image shrinks to the image, so this equals ``model(images)`` then.
    """
    height, width = images.shape[-2:]
    win_h, win_w = min(window[0], height), min(window[1], width)
    stride_h = max(1, int(win_h * (1 - overlap)))
    stride_w = max(1, int(win_w * (1 - overlap)))
    logits: Tensor | None = None
    counts = images.new_zeros(1, 1, height, width)
    for top in _window_starts(height, win_h, stride_h):
        for left in _window_starts(width, win_w, stride_w):
            tile = model(images[..., top : top + win_h, left : left + win_w])
            if logits is None:
                logits = images.new_zeros(images.shape[0], tile.shape[1], height, width, dtype=tile.dtype)
            logits[..., top : top + win_h, left : left + win_w] += tile
            counts[..., top : top + win_h, left : left + win_w] += 1
    assert logits is not None
    return logits / counts


def segment(model: Model, images: Tensor, config: InferenceConfig | None = None) -> Tensor:
    """Logits (N, C, H, W) for normalised images (N, 3, H, W) under ``config`` (plain by default)."""
    config = config or InferenceConfig()
    if config.is_plain:
        return model(images)
    height, width = images.shape[-2:]

    def run(x: Tensor) -> Tensor:
        return model(x) if config.window is None else sliding_window(model, x, config.window, config.overlap)

    total: Tensor | None = None
    for scale in config.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if scale == 1.0 else F.interpolate(images, size, mode="bilinear", align_corners=False)
        views = [run(scaled)]
        if config.flip:
            views.append(run(scaled.flip(-1)).flip(-1))
        for logits in views:
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
    assert total is not None
    return total / (len(config.scales) * (2 if config.flip else 1))


def predict_labels(model: Model, images: Tensor, config: InferenceConfig | None = None) -> Tensor:
    """Arg-max labels (N, H, W) int64 under ``config``."""
    with torch.inference_mode():
        return segment(model, images, config).argmax(dim=1)
