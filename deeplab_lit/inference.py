"""Whole-image inference: plain, multi-scale + flip test-time augmentation, and sliding windows.

Used by ``validate``, ``test`` and ``predict`` alike, so that an evaluation figure and a written mask
always come from the same code. Every function maps normalised images (N, 3, H, W) to logits
(N, C, H, W) at the input's size.

Multi-scale + flip follows DeepLab v3 Sec. 4.4 / v3+ Sec. 4: the image is resized to each scale (and
mirrored), the logits are resized back and averaged. Sliding windows (for Cityscapes' 1024x2048 frames,
larger than a training crop) average the logits of overlapping windows.

Big images: whole-image inference holds the network's high-resolution feature maps for the whole image
at once, and nothing here can free them without changing the result, so above
:attr:`InferenceConfig.max_pixels` :func:`segment` switches to sliding windows by itself (validate, test
and predict alike), and says so. What that costs and saves: :class:`InferenceConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch.nn.functional as F
from torch import Tensor

Model = Callable[[Tensor], Tensor]

#: Default :attr:`InferenceConfig.max_pixels` (see there for the measurement behind it).
DEFAULT_MAX_PIXELS = 12_582_912
#: Automatic windows hold at most ``max_pixels // AUTO_WINDOW_SHARE`` pixels, so that one window's forward
#: plus the full-size logits being summed stay below a whole-image forward at ``max_pixels`` (quarters
#: halved the peak of a 24-MP validate, where halves saved less: BENCHMARKS.md, "Evaluation memory and the
#: data preflight").
AUTO_WINDOW_SHARE = 4


@dataclass(frozen=True)
class InferenceConfig:
    """How to turn an image into logits at evaluation time.

    Attributes:
        scales: Input scales whose logits are averaged (``(1.0,)`` = plain inference).
        flip: Also average the horizontally mirrored input's logits.
        window: Sliding-window size ``(height, width)`` in pixels at each scale; ``None`` = whole image.
        overlap: Fraction of a window shared with its neighbour, in ``[0, 1)``.
        max_pixels: Largest image (height x width, at each scale) run whole when ``window`` is None;
            a larger one runs in automatic sliding windows of at most ``max_pixels //
            AUTO_WINDOW_SHARE`` pixels (:func:`auto_window`) with ``overlap``, and one info line per
            image size says so. ``None`` = always whole. At or below it the logits are exactly those
            of whole-image inference. The default, 12,582,912 (4096x3072), keeps VOC, Cityscapes
            (2048x1024, and its TTA scales up to 1.75) and 12-MP photos (4000x3000, 4032x3024)
            whole: v3+ ResNet-101 at output stride 16 then peaks under 8 GB on the CPU, its peak the
            decoder at stride 4 (the layer1 features it keeps, the upsampled ASPP output, their
            304-channel concatenation and the 256-channel convolutions). Output stride 8 costs about
            4x more from layer3 on: lower it there. Windows change results, mostly through the
            ASPP's image pooling (over one window instead of the image): a few percent of the labels
            of a 12-24 MP image. Figures: BENCHMARKS.md, "Evaluation memory and the data preflight".
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: tuple[int, int] | None = None
    overlap: float = 1 / 3
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"inference scales must be positive numbers, got {self.scales}")
        if self.window is not None and (len(self.window) != 2 or min(self.window) < 1):
            raise ValueError(f"sliding window must be (height, width) in pixels, got {self.window}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"window overlap must be in [0, 1), got {self.overlap}")
        if self.max_pixels is not None and (
            isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1
        ):
            raise ValueError(
                f"inference max_pixels must be a positive number of pixels (height x width) or None "
                f"(never switch to sliding windows), got {self.max_pixels!r}"
            )
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.window is not None:
            object.__setattr__(self, "window", (int(self.window[0]), int(self.window[1])))

    @property
    def is_plain(self) -> bool:
        """True when inference is one forward pass on the whole image (given it is within ``max_pixels``)."""
        return self.scales == (1.0,) and not self.flip and self.window is None

    def window_for(self, height: int, width: int) -> tuple[int, int] | None:
        """Return the sliding window for a ``height`` x ``width`` image (at one scale); None = whole image."""
        if self.window is not None:
            return self.window
        if self.max_pixels is None or height * width <= self.max_pixels:
            return None
        return auto_window(height, width, max(1, self.max_pixels // AUTO_WINDOW_SHARE))


def auto_window(height: int, width: int, pixels: int) -> tuple[int, int]:
    """Return the largest window of at most ``pixels`` pixels for a ``height`` x ``width`` image.

    A square of side ``isqrt(pixels)``, clipped to the image; a side the image clips gives its
    pixels to the other, so a wide panorama gets full-height windows rather than small squares.
    """
    win_h = min(height, max(1, math.isqrt(pixels)))
    win_w = min(width, max(1, pixels // win_h))
    win_h = min(height, max(1, pixels // win_w))
    return win_h, win_w


@cache
def _announce_window(height: int, width: int, window: tuple[int, int], max_pixels: int) -> None:
    """Say once per process and size that an image runs in automatic sliding windows."""
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(
        f"Inference: a {width}x{height} image ({height * width / 1e6:.1f} MP) is over max_pixels = "
        f"{max_pixels} ({max_pixels / 1e6:.1f} MP): it runs in sliding windows of {window[1]}x{window[0]} "
        f"(width x height) to bound memory. Set model.init_args.inference.max_pixels: null for whole-image "
        f"inference."
    )


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
    return logits.div_(counts)  # in place: no second full-size copy of the logits


def segment(model: Model, images: Tensor, config: InferenceConfig | None = None) -> Tensor:
    """Logits (N, C, H, W) for normalised images (N, 3, H, W) under ``config`` (plain by default).

    An image (at a scale) larger than ``config.max_pixels`` runs in automatic sliding windows
    (:meth:`InferenceConfig.window_for`); at or below it, the result is exactly that of whole-image
    inference. Views are summed in place, so TTA holds two full-size logit tensors at most.
    """
    config = config or InferenceConfig()
    height, width = images.shape[-2:]
    if config.is_plain and config.window_for(height, width) is None:
        return model(images)
    total: Tensor | None = None
    total_is_ours = False  # the first view may be the model's own output: never modify that in place
    for scale in config.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if scale == 1.0 else F.interpolate(images, size, mode="bilinear", align_corners=False)
        views = [_run(model, scaled, config)]
        if config.flip:
            views.append(_run(model, scaled.flip(-1), config).flip(-1))
        for logits in views:
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
            if total is None:
                total = logits
            elif total_is_ours:
                total.add_(logits)
            else:
                total, total_is_ours = total + logits, True
    assert total is not None
    count = len(config.scales) * (2 if config.flip else 1)
    return total if count == 1 else total.div_(count)


def _run(model: Model, images: Tensor, config: InferenceConfig) -> Tensor:
    """Logits of ``images`` at their own size: whole, or in the window ``config`` gives for their size."""
    height, width = images.shape[-2:]
    window = config.window_for(height, width)
    if window is None:
        return model(images)
    if config.window is None and config.max_pixels is not None:
        _announce_window(height, width, window, config.max_pixels)
    return sliding_window(model, images, window, config.overlap)
