"""``dense_crf``: refine a batch of softmax probabilities with the fully-connected CRF.

One function, two backends (see the package docstring): ``pydensecrf`` (the C++ reference, over a pool
of processes) and ``torch`` (permutohedral mean field, on the probabilities' device). Inputs are checked
here, where they enter, so both backends see the same valid arrays and the same unary ``-log p``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from deeplab_lit.crf import pydensecrf_backend
from deeplab_lit.crf.mean_field import mean_field
from deeplab_lit.crf.params import CRFParams

#: Probabilities are clamped to at least this before ``-log`` (as pydensecrf's ``unary_from_softmax``).
PROB_EPS = 1e-5
#: How far the probabilities of a pixel may sum from 1 (float32 softmax; half precision gets 10x).
SUM_TOLERANCE = 1e-3
BACKENDS = ("auto", "pydensecrf", "torch")

_warned_fallback = False


def dense_crf(
    probs: Tensor,
    images: Tensor,
    params: CRFParams = CRFParams(),  # noqa: B008 (frozen, immutable)
    backend: str = "auto",
    num_workers: int | None = None,
) -> Tensor:
    """Refine class probabilities with the fully-connected CRF (DeepLab v1/v2 post-processing).

    Mean-field inference (Krähenbühl and Koltun 2011) with unary ``-log p`` and Potts pairwise terms over a
    spatial and a bilateral Gaussian kernel (DeepLab v2 Sec. 3.3).

    Args:
        probs: ``(N, C, H, W)`` float softmax probabilities at the image's resolution
            (``softmax(logits, dim=1)``).
        images: ``(N, 3, H, W)`` uint8 RGB images, the raw pixels (``Normalization.denormalize``).
        params: CRF parameters; the default is the DeepLab v2 preset (``CRFParams()``).
        backend: ``"pydensecrf"`` (C++ reference on the CPU, images spread over ``num_workers``
            processes), ``"torch"`` (permutohedral mean field on ``probs``' device, CPU or GPU) or
            ``"auto"``, the faster where it runs (:func:`auto_backend`): torch, except on the CPU with
            a single torch thread, where pydensecrf is (torch with a one-time warning if it is not
            installed).
        num_workers: Processes of the pydensecrf pool; None = the cores available. Ignored by torch.

    Returns:
        ``(N, C, H, W)`` float32 refined probabilities on ``probs``' device.

    Raises:
        TypeError: If ``probs`` is not floating point or ``images`` is not uint8.
        ValueError: On wrong shapes, probabilities that are not a distribution over ``C``, or an unknown
            backend.
        ImportError: If ``backend="pydensecrf"`` and pydensecrf is not installed.
    """
    if not isinstance(params, CRFParams):
        raise TypeError(f"params must be a CRFParams, got {type(params).__name__}")
    _check_inputs(probs, images)
    chosen = _resolve_backend(backend, probs)
    if probs.shape[0] == 0:
        return probs.new_empty(probs.shape, dtype=torch.float32)
    with torch.no_grad():  # post-processing: no gradient flows through the CRF
        unary = -probs.to(torch.float32).clamp(min=PROB_EPS).log()
        if chosen == "torch":
            return mean_field(unary, images.to(probs.device), params)
        q = pydensecrf_backend.refine_batch(
            unary.cpu().numpy(), images.permute(0, 2, 3, 1).contiguous().cpu().numpy(), params, num_workers
        )
        return torch.from_numpy(q).to(probs.device)


def _check_inputs(probs: Tensor, images: Tensor) -> None:
    if not isinstance(probs, Tensor) or not isinstance(images, Tensor):
        raise TypeError(
            f"dense_crf expects torch tensors, got probs {type(probs).__name__} "
            f"and images {type(images).__name__}"
        )
    if probs.dim() != 4:
        raise ValueError(f"probs must be (N, C, H, W) softmax probabilities, got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(
            f"probs must be floating-point probabilities (softmax(logits)), got dtype {probs.dtype}"
        )
    if images.dtype != torch.uint8:
        raise TypeError(
            f"images must be the raw uint8 RGB image, got dtype {images.dtype}; "
            "pass the raw uint8 RGB image (use Normalization.denormalize on normalised model input)"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) uint8 RGB, got shape {tuple(images.shape)}")
    if images.shape[0] != probs.shape[0]:
        raise ValueError(
            f"batch sizes differ: probs has {probs.shape[0]} images, images has {images.shape[0]}"
        )
    if images.shape[-2:] != probs.shape[-2:]:
        raise ValueError(
            f"image size {tuple(images.shape[-2:])} differs from the probabilities' size "
            f"{tuple(probs.shape[-2:])}; run the CRF at the image's original resolution"
        )
    if probs.numel() == 0:
        return
    tolerance = SUM_TOLERANCE if probs.dtype in (torch.float32, torch.float64) else 10 * SUM_TOLERANCE
    minimum = probs.amin()
    error = (probs.sum(dim=1, dtype=torch.float32) - 1).abs().amax()
    # NaN fails both comparisons, so NaN inputs are refused too.
    if not bool(minimum >= 0) or not bool(error <= tolerance):
        raise ValueError(
            f"probs must be a probability distribution over the C={probs.shape[1]} classes (dim 1): "
            f"non-negative and summing to 1, got min {float(minimum):.4g} "
            f"and max |sum - 1| = {float(error):.4g}; "
            "pass softmax(logits, dim=1), not logits"
        )


def auto_backend(device: torch.device) -> str:
    """The backend ``"auto"`` picks on ``device``: the one measured faster there.

    torch on all the threads beats a pool of as many pydensecrf processes, on 2 cores and on 16, and on a
    GPU torch is the only choice. With a single torch thread, though, torch costs more CPU time per image
    than one pydensecrf process: pydensecrf is then faster. Figures: BENCHMARKS.md, "Dense CRF
    (benchmarks/crf_speed.py)" and "Dense CRF on the GPU machine (third session)".
    """
    if device.type != "cpu" or torch.get_num_threads() > 1:
        return "torch"
    return "pydensecrf"


def _resolve_backend(backend: str, probs: Tensor) -> str:
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; expected one of {BACKENDS}")
    if backend == "pydensecrf":
        pydensecrf_backend.require_pydensecrf()
        return "pydensecrf"
    if backend == "torch" or auto_backend(probs.device) == "torch":
        return "torch"
    if pydensecrf_backend.is_available():
        return "pydensecrf"
    if not _warned_fallback:
        warnings.warn(
            "backend='auto' with one torch thread on the CPU uses pydensecrf, which is not installed "
            "(`pip install pydensecrf2`); falling back to the torch backend, which agrees with it but is "
            "slower with one thread",
            stacklevel=3,
        )
        _warned_fallback = True
    return "torch"
