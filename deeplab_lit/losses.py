"""Training objectives: the module's one ``loss``, called as ``loss(logits, masks, step)``.

Every loss takes logits (N, C, H, W), masks int64 (N, H, W) with ``ignore_index`` for void, and the
optimiser step (for schedules such as hard-example mining), and returns a scalar; a loss of one's own is
any ``nn.Module`` with that call. The LightningModule builds it from its ``loss`` option, a mapping
``{"class_path": ..., "init_args": {...}}`` (the full import path, ``deeplab_lit.losses.CrossEntropy``),
with :func:`build_loss`: where the class's ``__init__`` takes ``ignore_index`` or ``num_classes``, the
module's values are passed, so a loss never disagrees with the metrics about which label is void.

* :class:`CrossEntropy`: class weights (a list, or ``"auto"``: median-frequency balancing), the DeepLab
  reference code's bootstrapping (``top_k_percent_pixels``, ``hard_example_mining_step``), label smoothing.
* :class:`OHEMCrossEntropy`: mmsegmentation's online hard example mining.
* :class:`LovaszSoftmax`: the Lovász extension of the Jaccard loss (Berman et al., CVPR 2018).
* :class:`Sum`: a weighted sum of losses, e.g. cross-entropy + 0.5 x Lovász.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CrossEntropy",
    "LovaszSoftmax",
    "OHEMCrossEntropy",
    "Sum",
    "build_loss",
    "median_frequency_weights",
]

#: The module's loss when ``loss`` is not given: plain mean cross-entropy over the labelled pixels.
DEFAULT_LOSS: dict[str, Any] = {"class_path": "deeplab_lit.losses.CrossEntropy"}
#: Arguments the module passes to a loss whose ``__init__`` takes them.
MODULE_ARGUMENTS = ("ignore_index", "num_classes")


class LossSpecError(ValueError):
    """A ``loss`` option that names no loss, or one that cannot be built from the arguments given."""


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise LossSpecError(
            f"loss class_path {class_path!r} names no class ({err}); use one of {__all__[:4]} "
            "(e.g. deeplab_lit.losses.CrossEntropy) or the import path of your own nn.Module"
        ) from err
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise LossSpecError(f"loss class_path {class_path!r} is not an nn.Module class")
    return found


def build_loss(
    spec: Mapping[str, Any] | nn.Module | None, ignore_index: int, num_classes: int | None
) -> nn.Module:
    """Build a loss from ``{"class_path": ..., "init_args": {...}}`` (None: :data:`DEFAULT_LOSS`).

    ``ignore_index`` and ``num_classes`` are passed where the class's ``__init__`` takes them; an
    ``init_args`` value for them other than the module's raises, since the metrics use the module's.
    An ``nn.Module`` (inside :class:`Sum`, from Python) is returned as it is.

    Raises:
        LossSpecError: not such a mapping, an unknown class, or arguments its ``__init__`` refuses.
    """
    if isinstance(spec, nn.Module):
        return spec
    spec = DEFAULT_LOSS if spec is None else spec
    if not isinstance(spec, Mapping) or "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
        raise LossSpecError(
            "loss must be a mapping {class_path: ..., init_args: {...}}, e.g. {class_path: "
            f"deeplab_lit.losses.CrossEntropy, init_args: {{class_weights: auto}}}}; got {spec!r}"
        )
    cls = _import_class(str(spec["class_path"]))
    init_args = dict(spec.get("init_args") or {})
    accepted = inspect.signature(cls).parameters
    given = {"ignore_index": ignore_index, "num_classes": num_classes}
    for name in MODULE_ARGUMENTS:
        if name in accepted and given[name] is not None:
            if name in init_args and init_args[name] != given[name]:
                raise LossSpecError(
                    f"loss init_args {name}={init_args[name]!r} differs from the module's {name}="
                    f"{given[name]!r}; set it on the module (model.init_args.{name}), not on the loss"
                )
            init_args[name] = given[name]
    try:
        inspect.signature(cls).bind(**init_args)
    except TypeError as err:
        raise LossSpecError(f"loss {cls.__name__} does not take {sorted(init_args)}: {err}") from err
    return cls(**init_args)


def median_frequency_weights(pixels: Sequence[int], image_pixels: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Median-frequency balancing (Eigen and Fergus, ICCV 2015, Sec. 4.2): ``w_c = median(f) / f_c``.

    ``f_c = pixels[c] / image_pixels[c]``: the pixels of class ``c`` over the labelled pixels of the
    training images in which ``c`` appears. A class absent from the training split gets weight 1 (it
    adds nothing to the training loss; on validation it then counts as a plain class) and is returned
    in the list of absent classes, for a warning.

    Returns:
        ``(weights (C,) float32, absent class ids)``.
    """
    pixels_t = torch.as_tensor(list(pixels), dtype=torch.float64)
    totals = torch.as_tensor(list(image_pixels), dtype=torch.float64)
    present = pixels_t > 0
    if not present.any():
        raise ValueError("median-frequency class weights need labelled pixels; the training split has none")
    frequency = pixels_t[present] / totals[present]
    weights = torch.ones_like(pixels_t)
    weights[present] = frequency.quantile(0.5) / frequency  # the middle two's mean for an even count
    absent = [int(c) for c in torch.nonzero(~present).flatten()]
    return weights.float(), absent


class ClassWeighted(nn.Module):
    """Base of the losses with per-class weights: ``None``, a list, or ``"auto"`` (median frequency).

    The weights live in the buffer ``class_weight`` (so checkpoints keep them: resume and evaluation
    use the weights training used). ``"auto"`` starts as NaN, and the LightningModule fills it at
    ``setup`` from the class counts of the data module's preflight (:meth:`set_class_counts`), unless
    a checkpoint filled it already.
    """

    class_weight: Tensor | None

    def __init__(
        self, class_weights: Sequence[float] | str | None, num_classes: int | None, ignore_index: int
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.auto_weights = class_weights == "auto"
        if class_weights is None:
            self.register_buffer("class_weight", None)
            return
        if self.auto_weights:
            if num_classes is None:
                raise ValueError("class_weights='auto' needs num_classes (the LightningModule passes it)")
            weight = torch.full((num_classes,), math.nan)
        elif isinstance(class_weights, str):
            raise ValueError(
                f"class_weights must be a list of numbers, 'auto' or None; got {class_weights!r}"
            )
        else:
            weight = torch.as_tensor([float(w) for w in class_weights])
            if num_classes is not None and weight.numel() != num_classes:
                raise ValueError(f"class_weights has {weight.numel()} values for {num_classes} classes")
            if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
                raise ValueError(f"class_weights must be finite and >= 0, got {list(class_weights)}")
        self.register_buffer("class_weight", weight)

    @property
    def needs_class_counts(self) -> bool:
        """True while ``"auto"`` weights are still to be counted (not yet set, nor loaded)."""
        return self.class_weight is not None and bool(self.class_weight.isnan().any())

    def set_class_counts(self, pixels: Sequence[int], image_pixels: Sequence[int]) -> list[int]:
        """Set the ``"auto"`` weights from the training split's counts; return the absent classes."""
        assert self.class_weight is not None
        count = self.class_weight.numel()
        padded = [list(c)[:count] + [0] * (count - len(c)) for c in (pixels, image_pixels)]
        weights, absent = median_frequency_weights(*padded)
        self.class_weight.copy_(weights)
        return absent

    def _weight(self, logits: Tensor) -> Tensor | None:
        if self.class_weight is None:
            return None
        if self.needs_class_counts:
            raise ValueError(
                "class_weights='auto' has no counts: they are counted by the data module's preflight at "
                "setup (keep data.init_args.preflight true), or give class_weights as a list"
            )
        return self.class_weight.to(logits.dtype)


class CrossEntropy(ClassWeighted):
    """Pixel-wise cross-entropy, optionally class-weighted and bootstrapped (the DeepLab reference code's).

    With the defaults it is the mean cross-entropy over the labelled pixels, the papers' loss.

    Args:
        class_weights: None, one weight per class (then equal to ``F.cross_entropy(weight=...)``: the
            weighted sum over the pixels divided by the sum of their weights), or ``"auto"``
            (:func:`median_frequency_weights` of the training split, counted once at setup).
        top_k_percent_pixels: Bootstrapping (``train_utils.add_softmax_cross_entropy_loss_for_each_scale``
            of tensorflow/models research/deeplab): below 1, only the ``k = int(fraction * N * H * W)``
            largest per-pixel losses of the batch (void pixels count, with loss 0) are kept, and their sum
            is divided by how many of them are non-zero. With class weights, as there, each pixel's loss
            is weighted by its class's weight before the selection.
        hard_example_mining_step: The fraction goes linearly from 1 to ``top_k_percent_pixels`` over
            this many steps (0: at once).
        label_smoothing: As ``F.cross_entropy``'s.
        ignore_index: Void label (the module passes its own).
        num_classes: Class count (the module passes it; needed by ``"auto"``).
    """

    def __init__(
        self,
        class_weights: Sequence[float] | str | None = None,
        top_k_percent_pixels: float = 1.0,
        hard_example_mining_step: int = 0,
        label_smoothing: float = 0.0,
        ignore_index: int = 255,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(class_weights, num_classes, ignore_index)
        if not 0 < top_k_percent_pixels <= 1:
            raise ValueError(f"top_k_percent_pixels must be in (0, 1], got {top_k_percent_pixels}")
        if hard_example_mining_step < 0:
            raise ValueError(f"hard_example_mining_step must be >= 0, got {hard_example_mining_step}")
        self.top_k_percent_pixels = top_k_percent_pixels
        self.hard_example_mining_step = hard_example_mining_step
        self.label_smoothing = label_smoothing

    def top_k_pixels(self, num_pixels: int, step: int) -> int:
        """How many pixels of ``num_pixels`` the bootstrapping keeps at ``step`` (the reference's formula)."""
        if self.hard_example_mining_step == 0:
            return int(self.top_k_percent_pixels * num_pixels)
        ratio = min(1.0, step / self.hard_example_mining_step)
        return int((ratio * self.top_k_percent_pixels + (1.0 - ratio)) * num_pixels)

    def forward(self, logits: Tensor, masks: Tensor, step: int = 0) -> Tensor:
        """Loss of logits (N, C, H, W) against masks (N, H, W) at optimiser step ``step``."""
        weight = self._weight(logits)
        options: dict[str, Any] = {
            "weight": weight,
            "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing,
        }
        if self.top_k_percent_pixels == 1.0:
            return F.cross_entropy(logits, masks, **options)
        pixel_losses = F.cross_entropy(logits, masks, reduction="none", **options).flatten()
        k = self.top_k_pixels(pixel_losses.numel(), step)
        top = pixel_losses.topk(k, sorted=False).values
        present = (top != 0).sum()
        return top.sum() / present.clamp(min=1)  # the reference's _div_maybe_zero: 0 when none is present


class OHEMCrossEntropy(ClassWeighted):
    """Online hard example mining (mmsegmentation's ``OHEMPixelSampler`` with a threshold).

    Of the labelled pixels, keep those whose softmax probability of their own label is below
    ``max(thresh, p_min_kept)``, where ``p_min_kept`` is the sorted probabilities' value at index
    ``min(min_kept * N, count - 1)`` (as mmsegmentation: ``min_kept`` per image, so at least
    ``min_kept * N`` pixels of a batch of N are kept, ties aside). The selection takes no gradient. The
    loss is the mean cross-entropy over the kept pixels (weighted by ``class_weights`` as
    ``F.cross_entropy``); mmsegmentation's decode head instead divides by every pixel of the batch.

    Args:
        thresh: Probability below which a pixel is hard.
        min_kept: Pixels per image kept at least.
        class_weights: As :class:`CrossEntropy`'s.
        ignore_index: Void label (the module passes its own).
        num_classes: Class count (the module passes it; needed by ``"auto"``).
    """

    def __init__(
        self,
        thresh: float = 0.7,
        min_kept: int = 100000,
        class_weights: Sequence[float] | str | None = None,
        ignore_index: int = 255,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(class_weights, num_classes, ignore_index)
        if not 0 < thresh <= 1 or min_kept < 1:
            raise ValueError(f"OHEM needs 0 < thresh <= 1 and min_kept >= 1; got {thresh}, {min_kept}")
        self.thresh = thresh
        self.min_kept = min_kept

    @torch.no_grad()
    def kept(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Boolean (N, H, W): the labelled pixels the mining keeps."""
        valid = masks != self.ignore_index
        labels = masks.where(valid, 0).unsqueeze(1)
        probability = logits.softmax(dim=1).gather(1, labels).squeeze(1)
        ordered = probability[valid].sort().values
        threshold = self.thresh
        if ordered.numel() > 0:
            index = min(self.min_kept * masks.shape[0], ordered.numel() - 1)
            threshold = max(threshold, float(ordered[index]))
        return valid & (probability < threshold)

    def forward(self, logits: Tensor, masks: Tensor, step: int = 0) -> Tensor:
        """Mean cross-entropy of the kept pixels of logits (N, C, H, W) against masks (N, H, W)."""
        hard = masks.where(self.kept(logits, masks), self.ignore_index)
        if not bool((hard != self.ignore_index).any()):
            return logits.sum() * 0.0  # nothing kept: a zero that keeps the graph
        return F.cross_entropy(logits, hard, weight=self._weight(logits), ignore_index=self.ignore_index)


def lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al., Alg. 1).

    ``gt_sorted`` (P, C): 1 where the pixel belongs to the class, in each column's decreasing-error order.
    """
    gts = gt_sorted.sum(dim=0)
    intersection = gts - gt_sorted.cumsum(dim=0)
    union = gts + (1 - gt_sorted).cumsum(dim=0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class LovaszSoftmax(nn.Module):
    """Lovász-Softmax (Berman et al., CVPR 2018, Sec. 3.2) on the softmax probabilities.

    For each class, the errors ``|[y = c] - p_c|`` of the labelled pixels, sorted in decreasing order,
    are dotted with :func:`lovasz_grad`; the loss is the mean over the classes, as the authors'
    ``lovasz_softmax`` (bermanmaxim/LovaszSoftmax).

    Args:
        per_image: Compute the loss per image and average over the images, instead of over the batch.
        classes: ``"present"`` (the classes in the masks), ``"all"``, or a list of class ids.
        ignore_index: Void label (the module passes its own).
    """

    def __init__(
        self, per_image: bool = False, classes: str | Sequence[int] = "present", ignore_index: int = 255
    ) -> None:
        super().__init__()
        if isinstance(classes, str) and classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present', 'all' or a list of class ids, got {classes!r}")
        self.per_image = per_image
        self.classes = classes if isinstance(classes, str) else list(classes)
        self.ignore_index = ignore_index

    def _flat(self, probabilities: Tensor, labels: Tensor) -> Tensor:
        """The loss of probabilities (P, C) against labels (P) of labelled pixels."""
        if labels.numel() == 0:
            return probabilities.sum() * 0.0
        foreground = F.one_hot(labels, probabilities.shape[1]).to(probabilities.dtype)
        errors, order = (foreground - probabilities).abs().sort(dim=0, descending=True)
        per_class = (errors * lovasz_grad(foreground.gather(0, order))).sum(dim=0)
        if self.classes == "present":
            per_class = per_class[foreground.sum(dim=0) > 0]
        elif self.classes != "all":
            per_class = per_class[list(self.classes)]
        return per_class.mean() if per_class.numel() else probabilities.sum() * 0.0

    def forward(self, logits: Tensor, masks: Tensor, step: int = 0) -> Tensor:
        """Lovász-Softmax of logits (N, C, H, W) against masks (N, H, W)."""
        probabilities = logits.softmax(dim=1).movedim(1, -1)  # (N, H, W, C)
        valid = masks != self.ignore_index
        if self.per_image:
            losses = [self._flat(p[v], m[v]) for p, m, v in zip(probabilities, masks, valid)]
            return torch.stack(losses).mean()
        return self._flat(probabilities[valid], masks[valid])


class Sum(nn.Module):
    """A weighted sum of losses, e.g. ``losses: [CrossEntropy, LovaszSoftmax], weights: [1.0, 0.5]``.

    Args:
        losses: Each a ``{"class_path", "init_args"}`` mapping (built as the module's ``loss``, with its
            ``ignore_index`` and ``num_classes``) or an ``nn.Module``.
        weights: One per loss (default all 1).
        ignore_index: Void label (the module passes its own).
        num_classes: Class count (the module passes it).
    """

    def __init__(
        self,
        losses: Sequence[Mapping[str, Any] | nn.Module],
        weights: Sequence[float] | None = None,
        ignore_index: int = 255,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not losses:
            raise ValueError("Sum needs at least one loss")
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if len(weights) != len(losses):
            raise ValueError(f"Sum has {len(losses)} losses but {len(weights)} weights")
        self.losses = nn.ModuleList(build_loss(loss, ignore_index, num_classes) for loss in losses)
        self.weights = weights

    def forward(self, logits: Tensor, masks: Tensor, step: int = 0) -> Tensor:
        """``sum(weight * loss(logits, masks, step))``."""
        terms = [w * loss(logits, masks, step) for w, loss in zip(self.weights, self.losses)]
        return torch.stack(terms).sum()
