"""Permutohedral lattice: fast high-dimensional Gaussian filtering in PyTorch.

Adams, Baek and Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice" (2010), as used
by Krähenbühl and Koltun's fully-connected CRF (2011, Sec. 4). Every point with a ``d``-dimensional
feature is embedded in the ``d``-dimensional hyperplane of ``R^(d+1)``, where it lies in one simplex of the
permutohedral lattice. Filtering is then a *splat* onto the simplices' vertices, a *blur* along each
lattice direction and a *slice* back to the points (:class:`PermutohedralLattice`).

The result approximates ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (features already divided by their
standard deviations) at a cost linear in the number of points. This module reproduces the arithmetic of
the reference C++ implementation shipped in pydensecrf (``permutohedral.cpp``: same elevation, rounding,
barycentric weights, blur order and ``alpha`` scaling), so both CRF backends see the same kernel.
Everything is vectorised, with no Python loop over points.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import Tensor

_INT64_LIMIT = 2**62


class PermutohedralLattice:
    """A permutohedral lattice built from a batch of per-point features, ready to filter values.

    Filtering is

    1. *splat*: each point scatters its value onto the ``d+1`` vertices of its simplex with barycentric
       weights;
    2. *blur*: the lattice values are convolved with ``[1/2, 1, 1/2]`` along each of the ``d+1`` lattice
       directions in turn (neighbours found through the integer lattice keys);
    3. *slice*: each point gathers the blurred values back with the same barycentric weights.

    The integer keys of the lattice vertices are encoded as one int64 each (mixed radix, the image index
    included), one stable sort of the codes finds the distinct vertices (the "hash table"), and since the
    code is linear in the key, the neighbour along a lattice direction is a constant offset away, found
    with ``torch.searchsorted``. A batch of images is one lattice.

    The three stages are stored as sparse CSR matrices, built once: ``splat`` (M, B*P) with the ``d+1``
    barycentric weights of each point, ``blurs`` (d+1 matrices (M, M), ``[1/2, 1, 1/2]`` along one lattice
    direction each), and ``slice`` (B*P, M), the transposed weights times the reference's ``alpha``. Every
    :meth:`filter` call applies them with ``torch.addmm``, multi-threaded on the CPU (MKL) and on the GPU
    (cuSPARSE), without host syncs.

    Args:
        features: Float tensor ``(B, P, d)``: ``B`` independent point sets (images) of ``P`` points with
            ``d``-dimensional features, already divided by the Gaussian's standard deviations.

    Raises:
        ValueError: If ``features`` is not a 3-D floating tensor with ``B, P, d >= 1``, or if its range is
            too wide for the int64 key encoding.
    """

    def __init__(self, features: Tensor) -> None:
        if features.dim() != 3 or not features.is_floating_point():
            raise ValueError(
                f"PermutohedralLattice expects float features of shape (B, P, d), got "
                f"{tuple(features.shape)} of dtype {features.dtype}"
            )
        batch, points, d = features.shape
        if d < 1 or points < 1 or batch < 1:
            raise ValueError(f"PermutohedralLattice needs B, P, d >= 1, got shape {tuple(features.shape)}")
        self.batch, self.points, self.d = batch, points, d
        weights, rem0, rank = _simplex_vertices(features.reshape(batch * points, d).float())
        code, strides = _vertex_codes(rem0, rank, batch, points)
        # Sort the (point, vertex) codes once: runs of equal codes are the lattice vertices (the hash), and
        # the vertices are numbered in code order (faster blurs than the reference's order of appearance).
        entries = code.numel()
        sorted_code, order = torch.sort(code.reshape(-1), stable=True)
        is_new = torch.ones_like(sorted_code, dtype=torch.bool)
        is_new[1:] = sorted_code[1:] != sorted_code[:-1]
        label = torch.cumsum(is_new, 0) - 1  # vertex of every sorted entry
        vertex_code = sorted_code[is_new]
        num_vertices = vertex_code.numel()
        self.num_vertices = num_vertices
        vertex = torch.empty_like(label)
        vertex[order] = label
        vertex, within = torch.sort(vertex.reshape(batch * points, d + 1), dim=1)
        alpha = 1.0 / (1.0 + 2.0 ** (-d))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            self.splat = _csr(
                _row_pointers(label, num_vertices),
                order // (d + 1),
                weights.reshape(-1)[order],
                (num_vertices, batch * points),
            )
            pointers = torch.arange(0, entries + 1, d + 1, device=vertex.device)
            slice_weights = torch.gather(weights, 1, within).reshape(-1) * alpha
            self.slice = _csr(pointers, vertex.reshape(-1), slice_weights, (batch * points, num_vertices))
            self.blurs = [_blur_matrix(vertex_code, _direction_step(j, d, strides)) for j in range(d + 1)]

    def filter(
        self, values: Tensor, out: Tensor | None = None, buffers: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Gaussian-filter per-point values through the lattice (splat, blur, slice).

        Args:
            values: ``(B, P, C)`` float32 values at the points the lattice was built from.
            out: Optional ``(B, P, C)`` contiguous float32 tensor to write the result to.
            buffers: Optional pair of flat float32 tensors of at least ``num_vertices * C`` elements for
                the lattice values, reused across calls so that the iteration loop allocates nothing.

        Returns:
            ``(B, P, C)`` filtered values, ``out_i ~= sum_j exp(-|f_i - f_j|^2 / 2) v_j`` including ``j = i``
            (the unnormalised kernel of the reference implementation).
        """
        if values.shape[:2] != (self.batch, self.points) or values.dim() != 3:
            raise ValueError(
                f"values must have shape (B, P, C) = ({self.batch}, {self.points}, C), "
                f"got {tuple(values.shape)}"
            )
        channels, size = values.shape[-1], self.num_vertices * values.shape[-1]
        if buffers is None:
            buffers = (values.new_empty(size), values.new_empty(size))
        current, spare = (b[:size].view(self.num_vertices, channels) for b in buffers)
        _product(self.splat, values.reshape(self.batch * self.points, channels), current)
        for blur in self.blurs:
            _product(blur, current, spare)
            current, spare = spare, current
        result = values.new_empty(values.shape) if out is None else out
        _product(self.slice, current, result.view(self.batch * self.points, channels))
        return result

    def scaled(self, before: Tensor, after: Tensor) -> PermutohedralLattice:
        """Return a copy whose :meth:`filter` computes ``after * K(before * values)``, at no extra cost.

        Used for the CRF's symmetric normalisation, ``D^-1/2 K D^-1/2``, folded into the splat and slice.

        Args:
            before: ``(B, P)`` per-point factors applied to the values before splatting.
            after: ``(B, P)`` per-point factors applied to the result after slicing.
        """
        out = copy.copy(self)
        before, after = before.reshape(-1), after.reshape(-1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            s = self.splat
            out.splat = _csr(
                s.crow_indices(), s.col_indices(), s.values() * before[s.col_indices().long()], s.shape
            )
            t = self.slice
            rows = torch.arange(t.shape[0], device=t.device).repeat_interleave(self.d + 1)
            out.slice = _csr(t.crow_indices(), t.col_indices(), t.values() * after[rows], t.shape)
        return out

    def transposed(self) -> PermutohedralLattice:
        """Return a copy whose :meth:`filter` is the exact transpose (adjoint) of this one's.

        The filter is ``slice @ blur_d ... blur_0 @ splat`` with ``slice = alpha * splat^T`` and every blur
        symmetric, so its transpose is the same product with the blurs in reverse order (the blurs along
        different lattice directions do not commute where vertices are missing, so the filter itself is
        not exactly symmetric). A copy made by :meth:`scaled` has its factors swapped in the transpose:
        take the transpose before scaling. Used by the differentiable CRF's backward pass.
        """
        out = copy.copy(self)
        out.blurs = self.blurs[::-1]
        return out

    def to(self, dtype: torch.dtype) -> PermutohedralLattice:
        """Return a copy whose matrices hold ``dtype`` values (float64 for gradient checks); same indices."""
        out = copy.copy(self)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            out.splat, out.slice = self.splat.to(dtype), self.slice.to(dtype)
            out.blurs = [blur.to(dtype) for blur in self.blurs]
        return out


def _product(sparse: Tensor, dense: Tensor, out: Tensor) -> None:
    """Compute ``out = sparse @ dense`` in place.

    ``addmm`` with ``beta=0`` into ``out`` skips the zero-fill and the copy that ``torch.mm(..., out=)``
    makes, about half the time of a blur on the CPU.
    """
    torch.addmm(out, sparse, dense, beta=0, out=out)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int] | torch.Size) -> Tensor:
    """Make a CSR matrix, with int32 indices when they fit (the sparse kernels' own: no copy per product)."""
    if col.numel() < 2**31 - 1 and max(shape) < 2**31 - 1:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return torch.sparse_csr_tensor(crow, col, values, size=tuple(shape), check_invariants=False)


def _row_pointers(sorted_rows: Tensor, num_rows: int) -> Tensor:
    """CSR row pointers for non-decreasing row indices."""
    counts = torch.bincount(sorted_rows, minlength=num_rows)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _vertex_codes(rem0: Tensor, rank: Tensor, batch: int, points: int) -> tuple[Tensor, list[int]]:
    """Encode the lattice keys of the ``d+1`` simplex vertices of every point as one int64 each.

    The key of vertex ``r`` on coordinate ``i < d`` is ``rem0_i + r - (d+1) [rank_i > d - r]`` (the
    canonical simplex of Adams et al. permuted by ``rank``; the last coordinate is implied). The code is the
    mixed-radix number of the keys with a margin of ``d+1`` per coordinate, plus the image index, so it is
    linear in the key: moving to a neighbouring vertex adds a constant (see :func:`_direction_step`).

    Returns:
        ``(B*P, d+1)`` codes and the radix strides of the ``d`` coordinates.
    """
    d = rem0.shape[1] - 1
    rem0 = rem0[:, :d]
    lo = rem0.amin(0) - 2 * (d + 1)
    span = (rem0.amax(0) + 2 * (d + 1) - lo + 1).tolist()  # one host sync per build, not per filter
    strides = [1] * d
    for i in range(d - 2, -1, -1):
        strides[i] = strides[i + 1] * span[i + 1]
    per_image = strides[0] * span[0]
    if per_image * batch >= _INT64_LIMIT:
        raise ValueError(
            f"the lattice features span {span} key values per coordinate, too wide to encode in int64; "
            "the Gaussian standard deviations are probably far too small for these features"
        )
    stride = torch.tensor(strides, dtype=torch.int64, device=rem0.device)
    image = torch.arange(batch, device=rem0.device).repeat_interleave(points) * per_image
    base = ((rem0 - lo) * stride).sum(1) + image
    # sum_i stride_i [rank_i > d - r] over r = 0..d: strides binned by rank, summed from the top rank down.
    by_rank = torch.zeros(rem0.shape[0], d + 1, dtype=torch.int64, device=rem0.device)
    by_rank.scatter_(1, rank[:, :d], stride.expand(rem0.shape[0], d))
    above = by_rank.flip(1).cumsum(1)  # column m: strides of the coordinates with rank >= d - m
    wrapped = torch.cat([above.new_zeros(rem0.shape[0], 1), above[:, :d]], 1)
    remainder = torch.arange(d + 1, device=rem0.device) * sum(strides)
    return base[:, None] + remainder - (d + 1) * wrapped, strides


def _direction_step(j: int, d: int, strides: list[int]) -> int:
    """Code offset to the neighbour along lattice direction ``j``: key - 1 everywhere, + d on coordinate j.

    For ``j = d`` (the implied last coordinate) every stored coordinate moves by -1.
    """
    total = sum(strides)
    return -total + (d + 1) * strides[j] if j < d else -total


def _blur_matrix(codes: Tensor, step: int) -> Tensor:
    """Sparse ``(M, M)`` matrix of ``v_i + (v_{i-step} + v_{i+step}) / 2`` over the existing vertices.

    Args:
        codes: ``(M,)`` vertex codes in increasing order.
        step: Code offset to the neighbour along one lattice direction (:func:`_direction_step`).
    """
    num_vertices = codes.numel()
    index = torch.arange(num_vertices, device=codes.device)
    pos = torch.searchsorted(codes, codes + step).clamp_(max=num_vertices - 1)
    has_up = codes[pos] == codes + step
    up = torch.where(has_up, pos, num_vertices)  # num_vertices = "no neighbour" (a dump slot below)
    # Vertex i has neighbour pos[i] at +step exactly when pos[i] has neighbour i at -step: one search.
    down = torch.full((num_vertices + 1,), num_vertices, device=codes.device).scatter_(0, up, index)
    down = down[:num_vertices]
    has_down = down < num_vertices
    # Codes are sorted, so for step > 0 the columns (down, i, up) of row i are in increasing order.
    first, last, has_first, has_last = (
        (down, up, has_down, has_up) if step > 0 else (up, down, has_up, has_down)
    )
    counts = 1 + has_first.long() + has_last.long()
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    nnz = int(crow[-1])  # one host sync per matrix, at build time
    start = crow[:-1]
    dump = torch.full_like(start, nnz)
    columns = codes.new_empty(nnz + 1)
    weights = torch.full((nnz + 1,), 0.5, dtype=torch.float32, device=codes.device)
    columns[torch.where(has_first, start, dump)] = first
    middle = start + has_first.long()
    columns[middle] = index
    weights[middle] = 1.0
    columns[torch.where(has_last, middle + 1, dump)] = last
    return _csr(crow, columns[:nnz], weights[:nnz], (num_vertices, num_vertices))


def _simplex_vertices(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Find the enclosing simplex of every point (Adams et al. 2010, Sec. 3-4).

    Args:
        features: ``(P, d)`` float32 features.

    Returns:
        ``weights`` (P, d+1), the barycentric weights of the simplex vertices, ``rem0`` (P, d+1) int64, the
        nearest remainder-0 lattice point, and ``rank`` (P, d+1) int64, the position of each coordinate of
        the residual in decreasing order, which fixes the simplex.
    """
    points, d = features.shape
    device = features.device
    # Diagonal of the elevation matrix E scaled to the filter's expected standard deviation (p.5-6), in
    # float64 then float32 as the reference does.
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = torch.tensor(
        [1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)],
        dtype=torch.float32,
        device=device,
    )
    scaled = features * scale
    # Elevate onto the hyperplane (y = E p), accumulating from the last coordinate like the reference.
    elevated = features.new_empty(points, d + 1)
    running = features.new_zeros(points)
    for j in range(d, 0, -1):
        elevated[:, j] = running - j * scaled[:, j - 1]
        running = running + scaled[:, j - 1]
    elevated[:, 0] = running
    # Nearest remainder-0 point by rounding (ties to even, as SSE's _mm_cvtps_epi32 does).
    down = torch.tensor(1.0 / (d + 1), dtype=torch.float32)
    rounded = torch.round(elevated * down)
    rem0 = rounded * (d + 1)
    # Rank of each residual coordinate in a stable descending order (the reference's pairwise loop:
    # ties go to the lower index first).
    order = torch.sort(elevated - rem0, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(d + 1, device=device).expand(points, d + 1)
    )
    rank = rank + rounded.sum(1, keepdim=True).long()
    # Bring the point back onto the plane where the rounded coordinates do not sum to zero.
    below, above = rank < 0, rank > d
    rank = rank + (d + 1) * below.long() - (d + 1) * above.long()
    rem0 = rem0 + (d + 1) * below.float() - (d + 1) * above.float()
    # Barycentric coordinates (p.10).
    v = (elevated - rem0) * down
    bary = features.new_zeros(points, d + 2)
    bary.scatter_add_(1, d - rank, v)
    bary.scatter_add_(1, d - rank + 1, -v)
    bary[:, 0] += 1.0 + bary[:, d + 1]
    return bary[:, : d + 1].contiguous(), rem0.long(), rank
