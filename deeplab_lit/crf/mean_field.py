"""Mean-field inference of the fully-connected CRF in PyTorch (the ``torch`` backend).

Krähenbühl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials"
(NIPS 2011, Alg. 1), computed exactly as the reference C++ code in pydensecrf does with its defaults
(``DIAG_KERNEL``, ``NORMALIZE_SYMMETRIC``, Potts compatibility):

* ``Q_0 = softmax(-U)``;
* every iteration, each kernel ``k`` filters ``Q`` with ``D_k^-1/2 K_k D_k^-1/2`` where ``K_k`` is the
  permutohedral Gaussian filter (its self-contribution included, as in the reference) and ``D_k = K_k 1``;
  the reference's Potts compatibility multiplies the filtered marginals by ``-w_k`` and subtracts the
  result from the energy, so ``Q <- softmax(-U + sum_k w_k D_k^-1/2 K_k D_k^-1/2 Q)`` (the textbook Potts
  message ``w_k sum_{l' != l}`` differs from it by a per-pixel constant, which the softmax removes).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from deeplab_lit.crf.params import CRFParams
from deeplab_lit.crf.permutohedral import PermutohedralLattice


def grid_features(height: int, width: int, xy_std: float, device: torch.device | str = "cpu") -> Tensor:
    """``(H*W, 2)`` pixel coordinates ``(x, y) / xy_std`` in the reference's order (row-major, x fastest)."""
    std = torch.tensor(xy_std, dtype=torch.float32, device=device)
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device) / std,
        torch.arange(width, dtype=torch.float32, device=device) / std,
        indexing="ij",
    )
    return torch.stack([x, y], -1).reshape(height * width, 2)


def pixel_features(images: Tensor, xy_std: float, rgb_std: float | None) -> Tensor:
    """Per-pixel kernel features of a batch.

    Args:
        images: ``(N, 3, H, W)`` RGB images (any dtype; used only when ``rgb_std`` is given).
        xy_std: Spatial standard deviation in pixels.
        rgb_std: Colour standard deviation, or None for the spatial-only kernel.

    Returns:
        ``(N, H*W, 2)`` features ``(x, y) / xy_std``, or ``(N, H*W, 5)`` with ``(r, g, b) / rgb_std``
        appended.
    """
    n, _, h, w = images.shape
    xy = grid_features(h, w, xy_std, images.device).expand(n, -1, -1)
    if rgb_std is None:
        return xy.contiguous()
    rgb = images.to(torch.float32).permute(0, 2, 3, 1).reshape(n, h * w, 3)
    return torch.cat([xy, rgb / torch.tensor(rgb_std, dtype=torch.float32, device=images.device)], -1)


def _normalised_kernel(features: Tensor, weight: float) -> PermutohedralLattice:
    """Lattice whose filter is ``weight * D^-1/2 K D^-1/2`` (the reference's NORMALIZE_SYMMETRIC)."""
    lattice = PermutohedralLattice(features)
    ones = features.new_ones(features.shape[0], features.shape[1], 1)
    norm = (lattice.filter(ones)[..., 0] + 1e-20).rsqrt()
    return lattice.scaled(before=norm, after=norm * weight)


@functools.lru_cache(maxsize=4)
def spatial_kernel(
    height: int, width: int, xy_std: float, weight: float, device: torch.device
) -> PermutohedralLattice:
    """Build (once per size, then cached) the normalised spatial kernel, the same for every image."""
    return _normalised_kernel(grid_features(height, width, xy_std, device)[None], weight)


def mean_field(unary: Tensor, images: Tensor, params: CRFParams, per_image: bool | None = None) -> Tensor:
    """Dense-CRF mean-field inference with permutohedral filtering.

    The bilateral lattice is built once per batch (one lattice for all its images); the spatial lattice
    depends only on the image size, so it is built once per size and cached, and filters all the images
    of a batch as extra channels. The iteration loop is sparse matrix products and an in-place softmax
    into buffers allocated once, free of host synchronisation, on any device. On the CPU the images of a
    batch are refined one after the other (faster there: smaller working set); on a GPU the whole batch
    is one problem.

    Args:
        unary: ``(N, C, H, W)`` float unary energies, ``-log p``.
        images: ``(N, 3, H, W)`` uint8 RGB images on the same device.
        params: CRF parameters.
        per_image: Refine the images one after the other (True) or as one batched problem (False); None
            picks per image on the CPU and batched elsewhere. The results are the same.

    Returns:
        ``(N, C, H, W)`` float32 marginals ``Q`` after ``params.iterations`` iterations.
    """
    n, c, h, w = unary.shape
    if per_image is None:
        # On the CPU one image at a time is faster: the working set stays in cache, and the temporaries of
        # the sparse products stay small enough for the allocator to reuse instead of page-faulting.
        per_image = unary.device.type == "cpu"
    if per_image and n > 1:
        return torch.cat([mean_field(unary[i : i + 1], images[i : i + 1], params, False) for i in range(n)])
    energy = unary.to(torch.float32).permute(0, 2, 3, 1).reshape(n, h * w, c)
    spatial = bilateral = None
    if params.pos_w > 0:
        spatial = spatial_kernel(h, w, params.pos_xy_std, params.pos_w, unary.device)
    if params.bi_w > 0:
        bilateral = _normalised_kernel(
            pixel_features(images, params.bi_xy_std, params.bi_rgb_std), params.bi_w
        )
    q = torch.softmax(-energy, dim=-1)
    message = torch.empty_like(q)
    # Every buffer of the loop is allocated once: no allocation (and no host sync) per iteration.
    size = max(spatial.num_vertices * n * c if spatial else 0, bilateral.num_vertices * c if bilateral else 0)
    buffers = (q.new_empty(size), q.new_empty(size))
    by_pixel = q.new_empty(1, h * w, n * c) if spatial is not None and n > 1 else None
    spatial_out = q.new_empty(1, h * w, n * c) if spatial is not None else None
    for _ in range(params.iterations):
        if bilateral is not None:
            bilateral.filter(q, out=message, buffers=buffers)
        else:
            message.zero_()
        message.sub_(energy)
        if spatial is not None and spatial_out is not None:
            # One spatial lattice for the whole batch: the images are extra channels, (1, P, N*C).
            if by_pixel is None:
                pixels = q.view(1, h * w, c)
            else:
                pixels = by_pixel
                pixels.view(h * w, n, c).copy_(q.transpose(0, 1))
            spatial.filter(pixels, out=spatial_out, buffers=buffers)
            message.add_(spatial_out.view(h * w, n, c).transpose(0, 1))
        # softmax over the classes, in place
        message.sub_(message.amax(-1, keepdim=True)).exp_()
        message.div_(message.sum(-1, keepdim=True))
        q, message = message, q
    return q.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
