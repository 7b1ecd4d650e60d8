"""The dense CRF as a trainable layer: mean-field inference unrolled as a recurrent network (CRF-as-RNN).

Zheng et al., "Conditional Random Fields as Recurrent Neural Networks" (ICCV 2015), Sec. 4: each mean-field
iteration of the fully-connected CRF is a stack of differentiable operations, so ``T`` unrolled iterations
can be trained with the network, learning the kernels' weights and a class-compatibility matrix instead of
grid-searching them. Here the Gaussian filtering of every iteration is the *exact* permutohedral lattice of
the offline ``torch`` backend (:mod:`~deeplab_lit.crf.permutohedral`, equal to pydensecrf's), on the CPU or
the GPU, for a whole batch at once.

:class:`CRFasRNN` is the layer (one iteration's equations, and how it matches the offline CRF);
:class:`_MeanField` is its memory-lean backward; :meth:`NormalisedKernel.log_bandwidth_grads` the optional
gradient of the bandwidths.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deeplab_lit.crf.mean_field import grid_features, pixel_features
from deeplab_lit.crf.params import CRFParams
from deeplab_lit.crf.permutohedral import PermutohedralLattice

#: Gaussian filters: ``"lattice"`` (permutohedral, linear in the pixels) or ``"exact"`` (the dense
#: ``P x P`` Gaussian: a reference for tiny images, and for checking the bandwidth gradients).
FILTERS = ("lattice", "exact")
#: Names of the kernels, in the order of :attr:`CRFasRNN.kernel_weights`.
KERNELS = ("spatial", "bilateral")
#: Names of the bandwidths, in the order of :attr:`CRFasRNN.log_bandwidths`.
BANDWIDTHS = ("pos_xy_std", "bi_xy_std", "bi_rgb_std")

#: The bandwidth (index in :data:`BANDWIDTHS`) that divides each group of feature dimensions.
SPATIAL_GROUPS = ((0, (0, 1)),)
BILATERAL_GROUPS = ((1, (0, 1)), (2, (2, 3, 4)))

RawFilter = Callable[[Tensor, bool], Tensor]


class CRFasRNN(nn.Module):
    """Differentiable fully-connected CRF: ``layer(logits, images)`` -> refined logits (CRF-as-RNN).

    One iteration, for network logits ``L`` (``N, C, H, W``; ``Q_0 = softmax(L)``)::

        m_t     = sum_k w_k D_k^-1/2 K_k D_k^-1/2 Q_t     (k: spatial and bilateral kernel, Sec. 4.1)
        Z_t+1   = L - m_t mu^T                           (compatibility transform, mu is C x C)
        Q_t+1   = softmax(Z_t+1)

    and the layer returns ``Z_T``: logits whose softmax is the CRF's marginals. Initialised with a preset's
    weights and the Potts compatibility ``mu = 1 - I``, ``Z_T`` differs from the offline backend's energy
    by a per-pixel constant, so the marginals are the same (:func:`~deeplab_lit.crf.dense_crf` clamps the
    probabilities at ``PROB_EPS`` before ``-log``; where every probability is above it, the two agree).

    Args:
        num_classes: Classes ``C`` of the logits.
        preset: Named parameters the layer starts from (:data:`~deeplab_lit.crf.PRESETS`): the kernels'
            weights and bandwidths. The preset's iteration count is not used (see ``iterations``).
        iterations: Unrolled mean-field iterations in training (5 in Zheng et al., Sec. 5).
        eval_iterations: Iterations in eval mode; None = ``iterations``. More iterations at test time
            converge further (the offline CRF runs 10).
        learn_bandwidths: Learn the logarithms of the three bandwidths (spatial ``xy``, bilateral ``xy``
            and ``rgb``) as well. Off by default: the bandwidth gradient is that of the exact Gaussian
            (see :meth:`NormalisedKernel.log_bandwidth_grads`) and costs extra filtering.
        filter: ``"lattice"`` (default) or ``"exact"``, the dense Gaussian, ``O((H W)^2)``: only for tiny
            images (tests, references).

    Attributes:
        kernel_weights: ``(2,)`` weights of the spatial and the bilateral kernel (:data:`KERNELS`).
        compatibility: ``(C, C)`` label compatibility ``mu``; initialised to the Potts model ``1 - I``.
        log_bandwidths: ``(3,)`` logarithms of the bandwidths (:data:`BANDWIDTHS`); a parameter that
            requires a gradient only with ``learn_bandwidths``.

    Shapes:
        ``logits`` ``(N, C, H, W)`` float; ``images`` ``(N, 3, H, W)`` uint8 RGB, the raw pixels as
        :func:`~deeplab_lit.crf.dense_crf` takes them; output ``(N, C, H, W)`` float32 (float64 for float64
        logits). Under autocast the layer runs in float32.
    """

    def __init__(
        self,
        num_classes: int,
        preset: str = "deeplab_v2",
        iterations: int = 5,
        eval_iterations: int | None = None,
        learn_bandwidths: bool = False,
        filter: str = "lattice",
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"CRFasRNN needs num_classes >= 2, got {num_classes!r}")
        for name, value in (("iterations", iterations), ("eval_iterations", eval_iterations)):
            if value is None and name == "eval_iterations":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CRFasRNN {name} must be a positive int, got {value!r}")
        if filter not in FILTERS:
            raise ValueError(f"unknown CRFasRNN filter {filter!r}; expected one of {FILTERS}")
        params = CRFParams.from_preset(preset)
        self.num_classes = num_classes
        self.preset = preset
        self.iterations = iterations
        self.eval_iterations = eval_iterations
        self.filter = filter
        self.kernel_weights = nn.Parameter(torch.tensor([params.pos_w, params.bi_w]))
        self.compatibility = nn.Parameter(1.0 - torch.eye(num_classes))
        stds = [params.pos_xy_std, params.bi_xy_std, params.bi_rgb_std]
        self.log_bandwidths = nn.Parameter(torch.tensor(stds).log(), requires_grad=learn_bandwidths)

    @property
    def bandwidths(self) -> dict[str, float]:
        """The current bandwidths by name (:data:`BANDWIDTHS`), in pixels and 0-255 intensity units."""
        return dict(zip(BANDWIDTHS, self.log_bandwidths.detach().exp().tolist()))

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        learned = "learned" if self.log_bandwidths.requires_grad else "fixed"
        return (
            f"num_classes={self.num_classes}, preset={self.preset!r}, iterations={self.iterations}, "
            f"eval_iterations={self.eval_iterations}, bandwidths {learned}, filter={self.filter!r}"
        )

    def forward(self, logits: Tensor, images: Tensor, iterations: int | None = None) -> Tensor:
        """Refine ``logits`` on ``images``: ``softmax`` of the result is the CRF's marginals.

        Args:
            logits: ``(N, C, H, W)`` float class scores at the images' resolution.
            images: ``(N, 3, H, W)`` uint8 RGB images.
            iterations: Override the number of iterations (default: ``iterations`` in training mode,
                ``eval_iterations`` in eval mode).

        Raises:
            TypeError: ``logits`` not floating point or ``images`` not uint8.
            ValueError: Wrong shapes or class count, non-finite logits, or ``iterations`` below 1.
        """
        self._check(logits, images)
        if iterations is None:
            iterations = self.iterations if self.training else (self.eval_iterations or self.iterations)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"CRFasRNN iterations must be a positive int, got {iterations!r}")
        n, c, h, w = logits.shape
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.autocast(logits.device.type, enabled=False):
            if n == 0:
                return logits.to(dtype)
            log_bandwidths = self.log_bandwidths.to(dtype)
            stds = log_bandwidths.detach().exp().tolist()
            weights, compatibility = self.kernel_weights.to(dtype), self.compatibility.to(dtype)
            # On the CPU one image at a time, as the offline backend: a smaller working set stays in cache
            # (faster: BENCHMARKS.md, "The trainable CRF layer").
            chunks = [slice(i, i + 1) for i in range(n)] if logits.device.type == "cpu" else [slice(0, n)]
            # The marginals are kept for a backward only where one can come: not under no_grad (the
            # Function's forward runs with grad mode off, so this is decided here).
            grad_mode = torch.is_grad_enabled()

            def build(part: slice) -> list[NormalisedKernel]:
                return self._kernels(images[part], stds, dtype)

            args = (weights, compatibility, log_bandwidths, build, chunks, iterations, grad_mode)
            refined: Tensor = _MeanField.apply(logits.to(dtype), *args)
        return refined

    def _kernels(self, images: Tensor, stds: Sequence[float], dtype: torch.dtype) -> list[NormalisedKernel]:
        """The spatial and the bilateral kernel of this batch, their features divided by ``stds``."""
        pos_xy, bi_xy, bi_rgb = stds
        h, w = images.shape[-2:]
        if self.filter == "exact":  # in dtype: float64 features for gradient checks of the bandwidths
            raw = pixel_features(images, 1.0, 1.0).to(dtype)
            spatial = raw[:1, :, :2] / pos_xy
            bilateral = torch.cat([raw[..., :2] / bi_xy, raw[..., 2:] / bi_rgb], -1)
            return [
                NormalisedKernel(_exact_filter(spatial), spatial, SPATIAL_GROUPS),
                NormalisedKernel(_exact_filter(bilateral), bilateral, BILATERAL_GROUPS),
            ]
        # Features as the offline backend computes them (float32), so that both build the same lattices.
        bilateral = pixel_features(images, bi_xy, bi_rgb)
        learn = self.log_bandwidths.requires_grad  # the features serve only the bandwidths' gradient
        lattice = _lattice_filter(bilateral, dtype)
        return [
            _spatial_kernel(h, w, pos_xy, images.device, dtype),
            NormalisedKernel(lattice, bilateral.to(dtype), BILATERAL_GROUPS, keep_features=learn),
        ]

    def _check(self, logits: Tensor, images: Tensor) -> None:
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 4:
            raise TypeError(
                "CRFasRNN expects float logits of shape (N, C, H, W), got "
                f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"CRFasRNN was built for {self.num_classes} classes, the logits have {logits.shape[1]}"
            )
        with torch.no_grad():  # a check: no graph (isfinite's abs would keep the logits for a backward)
            non_finite = int((~torch.isfinite(logits)).sum())
        if non_finite:
            # one NaN pixel would spread through the kernels' messages to its neighbourhood, every iteration
            raise ValueError(
                f"CRFasRNN got {non_finite} non-finite (NaN or inf) logits of {logits.numel()}: the network "
                "before the CRF diverged or its input was bad; lower the learning rate or check the images"
            )
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            raise TypeError(
                f"CRFasRNN expects the raw uint8 RGB images, got {getattr(images, 'dtype', type(images))}; "
                "use Normalization.denormalize on the normalised model input"
            )
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != logits.shape[0]:
            raise ValueError(
                f"images must be (N, 3, H, W) with N = {logits.shape[0]} like the logits, "
                f"got {tuple(images.shape)}"
            )
        if images.shape[-2:] != logits.shape[-2:]:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} differs from the logits' {tuple(logits.shape[-2:])}: "
                "upsample the logits to the image's resolution first"
            )


class NormalisedKernel:
    """One Gaussian kernel with the CRF's symmetric normalisation, ``D^-1/2 K D^-1/2`` (``D = K 1``).

    Args:
        raw: The unnormalised filter, ``raw(values, transpose) -> K values`` (or ``K^T values``), for
            ``(B, P, C)`` values; a filter built on one point set (``B = 1``) filters every image of the
            batch (the spatial kernel, the same for all images).
        features: ``(B or 1, P, d)`` the features the filter was built on (divided by the bandwidths).
        groups: ``(bandwidth index, feature dimensions)`` of each bandwidth that scales some features.
        keep_features: Keep ``features`` for :meth:`log_bandwidth_grads`; without it they are dropped once
            the normalisation is computed (a ``P x d`` tensor less per kernel while the batch is refined).
    """

    def __init__(
        self,
        raw: RawFilter,
        features: Tensor,
        groups: Sequence[tuple[int, Sequence[int]]],
        keep_features: bool = True,
    ) -> None:
        self.raw, self.groups = raw, groups
        self.features = features if keep_features else None
        ones = features.new_ones(features.shape[0], features.shape[1], 1)
        self.norm = (raw(ones, False) + 1e-20).rsqrt()  # (B or 1, P, 1)

    def __call__(self, values: Tensor, transpose: bool = False) -> Tensor:
        """``D^-1/2 K D^-1/2 values`` (or the transpose: ``K^T`` in the middle) for ``(B, P, C)`` values."""
        return self.raw(self.norm * values, transpose).mul_(self.norm)  # in place: one temporary fewer

    def log_bandwidth_grads(self, q: Tensor, grad: Tensor) -> dict[int, Tensor]:
        """``<grad, d(D^-1/2 K D^-1/2 q) / d log(bandwidth)>`` for each bandwidth of :attr:`groups`.

        With ``y = n K(n q)``, ``n = (K 1)^-1/2`` and ``B(x, y) = <x, (dK / d log s) y>``, the product rule
        gives ``B(n g, n q) - B(n^3 h, 1) / 2`` where ``h = sum_c (g K(n q) + q K^T(n g))``. For the Gaussian
        ``K_ij = exp(-|f_i - f_j|^2 / 2)`` with the features of group ``G`` divided by ``s``,
        ``dK_ij / d log s = K_ij |f_iG - f_jG|^2``, so ``B(x, y) = <x |f_G|^2, K y> - 2 sum_{d in G}
        <x f_d, K(f_d y)> + <x, K(|f_G|^2 y)>``: filters of ``y`` times powers of the features.

        The lattice stands for the Gaussian here: its own output is piecewise linear in the features, so
        this is the gradient of what it approximates, not of its interpolation. It costs the bilateral
        filter on ``d + 3`` times the channels per iteration of the backward pass.
        """
        n = self.norm
        nq, ng = n * q, n * grad
        h = (grad * self.raw(nq, False) + q * self.raw(ng, True)).sum(-1, keepdim=True)
        first = self._bilinear(ng, nq)
        second = self._bilinear(n**3 * h, torch.ones_like(h))
        return {index: first[index] - second[index] / 2 for index, _ in self.groups}

    def _bilinear(self, x: Tensor, y: Tensor) -> dict[int, Tensor]:
        # Centred per point set: |f_i - f_j|^2 is unchanged, and its expansion below no longer cancels
        # large terms (features up to the image size over the bandwidth) in float32.
        if self.features is None:
            raise RuntimeError("this kernel was built without keep_features: no bandwidth gradient")
        f = self.features - self.features.mean(-2, keepdim=True)
        dims = sorted({d for _, group in self.groups for d in group})
        squares = [(f[..., list(group)] ** 2).sum(-1, keepdim=True) for _, group in self.groups]
        channels = y.shape[-1]
        stacked = torch.cat([y] + [f[..., d : d + 1] * y for d in dims] + [s * y for s in squares], -1)
        filtered = self.raw(stacked, False).split(channels, -1)
        k_y, k_fy, k_sy = filtered[0], dict(zip(dims, filtered[1:])), filtered[1 + len(dims) :]
        out = {}
        for (index, group), square, k_square_y in zip(self.groups, squares, k_sy):
            # per pixel first, (K |f_i - f_G|^2 y)_i, small where the terms are large: then the sum
            distance = square * k_y + k_square_y
            for d in group:
                distance = distance - 2 * f[..., d : d + 1] * k_fy[d]
            out[index] = (x * distance).sum()
        return out


class _MeanField(torch.autograd.Function):
    """``T`` mean-field iterations with a backward that stores only the marginals.

    One custom ``autograd.Function`` over all iterations. It keeps the marginals ``Q_1 .. Q_T-1`` (``T - 1``
    tensors the size of the logits; none under ``no_grad``; ``Q_0 = softmax(L)`` is recomputed from the
    logits, which the caller holds anyway) and no lattice buffers: the filter's transpose is the same
    lattice with its blurs in reverse order (:meth:`PermutohedralLattice.transposed`), so the gradient of
    ``K Q`` is one more filtering of the incoming gradient. Per iteration the backward filters twice per
    kernel (the transposed filter, and the forward one again when the compatibility learns): forward plus
    backward costs about three forward passes. The batch goes in ``chunks`` (one image each on the CPU),
    each chunk's kernels built just before its iterations, its pixels-by-classes copies made per chunk and
    its results written straight into the ``(N, C, H, W)`` output (and gradient): no batch-sized copy.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        weights: Tensor,
        compatibility: Tensor,
        log_bandwidths: Tensor,
        build: Callable[[slice], list[NormalisedKernel]],
        chunks: list[slice],
        iterations: int,
        grad_mode: bool,
    ) -> Tensor:
        keep = grad_mode and any(ctx.needs_input_grad)  # nothing to keep for a backward that cannot come
        refined = torch.empty_like(logits, memory_format=torch.contiguous_format)
        marginals: list[Tensor] = []
        ctx.kernels = []
        for part in chunks:
            kernels = build(part)
            args = (kernels, weights, compatibility, iterations, _pixels(refined[part]), keep)
            marginals += _iterate(_pixels(logits[part]), *args)
            if keep:
                ctx.kernels.append(kernels)
        ctx.save_for_backward(logits, weights, compatibility, *marginals)
        ctx.chunks, ctx.iterations = chunks, iterations
        return refined

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_refined: Tensor) -> tuple[Tensor | None, ...]:
        logits, weights, compatibility, *marginals = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]
        grads = (
            torch.zeros_like(weights),
            torch.zeros_like(compatibility),
            weights.new_zeros(len(BANDWIDTHS)),
        )
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        kept = ctx.iterations - 1
        for i, (part, kernels) in enumerate(zip(ctx.chunks, ctx.kernels)):
            qs = marginals[i * kept : (i + 1) * kept]
            args = (_pixels(logits[part]), qs, kernels, weights, compatibility, needs, grads)
            _iterate_backward(_pixels(grad_refined[part]), *args, _pixels(grad_logits[part]))
        parameters = (grad if need else None for grad, need in zip(grads, needs))
        return (grad_logits, *parameters, None, None, None, None)


def _pixels(maps: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``, a view where the layout allows (a writable window into it)."""
    return maps.permute(0, 2, 3, 1).flatten(1, 2)


def _iterate(
    unary: Tensor,
    kernels: list[NormalisedKernel],
    weights: Tensor,
    compatibility: Tensor,
    iterations: int,
    out: Tensor,
    keep: bool,
) -> list[Tensor]:
    """Run one chunk's mean-field iterations, ``Z_T`` into ``out``; return ``Q_1 .. Q_T-1`` if ``keep``.

    ``unary`` ``(B, P, C)`` may be a strided view of the logits: only elementwise ops and the softmax read
    it. ``Q_0`` is not kept (the backward recomputes it from the logits).
    """
    q = torch.softmax(unary, -1)
    marginals = []
    for t in range(iterations):
        if keep and t > 0:
            marginals.append(q)
        last = t == iterations - 1
        refined = _refine(unary, kernels, weights, compatibility, q, out if last else None)
        if not last:  # Q_T is not needed
            q = torch.softmax(refined, -1)
    return marginals


def _refine(
    unary: Tensor,
    kernels: Sequence[NormalisedKernel],
    weights: Tensor,
    compatibility: Tensor,
    q: Tensor,
    out: Tensor | None,
) -> Tensor:
    """``Z = unary - m mu^T`` for the marginals ``q``, in place after the product (into ``out`` if given).

    ``-(m mu^T) + unary`` equals ``unary - m mu^T`` exactly (IEEE ``a - b`` is ``a + (-b)``).
    """
    product = torch.matmul(_message(kernels, weights, q), compatibility.T)  # not out=: another GEMM path
    return product.neg_().add_(unary) if out is None else torch.sub(unary, product, out=out)


def _iterate_backward(
    grad_refined: Tensor,
    unary: Tensor,
    marginals: Sequence[Tensor],
    kernels: Sequence[NormalisedKernel],
    weights: Tensor,
    compatibility: Tensor,
    needs: Sequence[bool],
    grads: tuple[Tensor, Tensor, Tensor],
    grad_unary: Tensor,
) -> None:
    """Back through one chunk's iterations: the unary's gradient into ``grad_unary``.

    The parameters' gradients are added to ``grads`` (weights, compatibility, bandwidths) where ``needs``
    says so. ``marginals`` are ``Q_1 .. Q_T-1``; ``Q_0`` is recomputed from ``unary`` at its turn. Each
    tensor goes as soon as it is used and the updates are in place: beside the saved tensors and the
    incoming gradient, the working set is ``grad_unary``, two tensors of the chunk's size and one
    filtering's (its input, output and lattice buffers).
    """
    grad_unary.copy_(grad_refined)
    grad_z = grad_refined.contiguous()  # gradient of Z_t+1 = unary - m_t mu^T (a contiguous GEMM: exact)
    for t in reversed(range(len(marginals) + 1)):
        q = marginals[t - 1] if t else torch.softmax(unary, -1)
        if needs[1]:  # the message first, while grad_message does not exist yet
            grads[1].sub_(grad_z.flatten(0, 1).T @ _message(kernels, weights, q).flatten(0, 1))
        grad_message = torch.matmul(grad_z, compatibility).neg_()  # of m_t
        del grad_z
        grad_z = _message_backward(kernels, weights, q, grad_message, needs, grads)  # of Q_t, for now
        del grad_message
        # through Q_t = softmax(Z_t) (or softmax(unary) for t = 0), in place: no name keeps the old one
        grad_z.sub_((grad_z * q).sum(-1, keepdim=True)).mul_(q)
        grad_unary += grad_z


def _message_backward(
    kernels: Sequence[NormalisedKernel],
    weights: Tensor,
    q: Tensor,
    grad_message: Tensor,
    needs: Sequence[bool],
    grads: tuple[Tensor, Tensor, Tensor],
) -> Tensor:
    """The gradient of ``Q_t`` from that of its message ``m_t``; the weights' and bandwidths' added."""
    grad_q = None
    for k, kernel in enumerate(kernels):
        back = kernel(grad_message, transpose=True)
        if needs[0]:
            grads[0][k] += (back * q).sum()
        if needs[2]:
            for index, value in kernel.log_bandwidth_grads(q, grad_message).items():
                grads[2][index] += weights[k] * value
        back.mul_(weights[k])
        grad_q = back if grad_q is None else grad_q.add_(back)
    if grad_q is None:
        raise ValueError("the mean-field message needs at least one kernel")
    return grad_q


def _message(kernels: Sequence[NormalisedKernel], weights: Tensor, q: Tensor) -> Tensor:
    """``sum_k w_k D_k^-1/2 K_k D_k^-1/2 q``: the filtered marginals of one iteration, ``(B, P, C)``.

    Accumulated in place into the first kernel's output: no temporary beyond one filtering's.
    """
    message = kernels[0](q).mul_(weights[0])
    for k in range(1, len(kernels)):
        message += kernels[k](q).mul_(weights[k])
    return message


def _lattice_filter(features: Tensor, dtype: torch.dtype) -> RawFilter:
    """The permutohedral filter on ``features`` ``(B, P, d)`` and its exact transpose, in ``dtype``."""
    lattice = PermutohedralLattice(features)
    return _as_raw(lattice.to(dtype) if dtype != torch.float32 else lattice)


class _SpatialKernelCache:
    """The spatial kernel depends only on the image size and its bandwidth: built once per pair, kept.

    At most one kernel per image size (and device, dtype), the last bandwidth's: with learned bandwidths
    every step has a new one, and a stale kernel is dropped, not kept beside the new (its lattice is the
    size of the image). At most ``sizes`` image sizes, the least recently used dropped first.
    """

    def __init__(self, sizes: int = 8) -> None:
        self.sizes = sizes
        self.kernels: OrderedDict[tuple[int, int, torch.device, torch.dtype], tuple[float, NormalisedKernel]]
        self.kernels = OrderedDict()

    def __call__(
        self, height: int, width: int, std: float, device: torch.device, dtype: torch.dtype
    ) -> NormalisedKernel:
        """The spatial kernel of a ``height x width`` image with bandwidth ``std`` (pixels)."""
        key = (height, width, device, dtype)
        cached = self.kernels.pop(key, None)
        if cached is None or cached[0] != std:
            del cached  # the stale kernel goes before the new one is built
            features = grid_features(height, width, std, device)[None]
            kernel = NormalisedKernel(_lattice_filter(features, dtype), features.to(dtype), SPATIAL_GROUPS)
            cached = (std, kernel)
        self.kernels[key] = cached
        while len(self.kernels) > self.sizes:
            self.kernels.popitem(last=False)
        return cached[1]


_spatial_kernel = _SpatialKernelCache()


def _as_raw(lattice: PermutohedralLattice) -> RawFilter:
    transposed = lattice.transposed()

    def raw(values: Tensor, transpose: bool) -> Tensor:
        chosen = transposed if transpose else lattice
        return _filter_batch(chosen.filter, lattice.batch, values)

    return raw


def _filter_batch(apply: Callable[[Tensor], Tensor], point_sets: int, values: Tensor) -> Tensor:
    """Filter ``(B, P, C)`` values with a filter built on ``point_sets`` point sets (``B``, or 1).

    A filter of one point set (the spatial kernel, the same for every image) filters the images of the
    batch as extra channels, ``(1, P, B*C)``.
    """
    batch, points, channels = values.shape
    if point_sets == batch:
        return apply(values.contiguous())
    if point_sets != 1:
        raise ValueError(f"a filter of {point_sets} point sets cannot filter a batch of {batch}")
    folded = values.transpose(0, 1).reshape(1, points, batch * channels)
    return apply(folded).reshape(points, batch, channels).transpose(0, 1)


def _exact_filter(features: Tensor) -> RawFilter:
    """The dense Gaussian ``exp(-|f_i - f_j|^2 / 2)`` on ``features`` ``(B, P, d)``: symmetric, O(P^2)."""
    squared = (features[:, :, None, :] - features[:, None, :, :]).square().sum(-1)
    kernel = torch.exp(-squared / 2)  # (B, P, P)

    def raw(values: Tensor, transpose: bool) -> Tensor:  # symmetric: the transpose is the same
        return _filter_batch(kernel.matmul, kernel.shape[0], values)

    return raw
