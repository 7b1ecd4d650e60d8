"""The trainable dense CRF (CRF-as-RNN): exact gradients, the offline CRF at initialisation, bad input."""

from dataclasses import replace

import pytest
import torch
from torch.func import functional_call

from deeplab_lit.crf import CRFParams, PermutohedralLattice, dense_crf
from deeplab_lit.crf.synthetic import synthetic_scene
from deeplab_lit.crf.trainable import CRFasRNN, _spatial_kernel

PARAMETERS = ("kernel_weights", "compatibility", "log_bandwidths")


def _inputs(batch=2, classes=3, height=5, width=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, height, width, generator=gen, dtype=dtype)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.uint8)
    return logits, images


def _perturbed(layer, seed=1):
    """Move the parameters off their initial values so that every gradient term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.compatibility.add_(
            0.3 * torch.randn(layer.compatibility.shape, generator=gen, dtype=torch.float64)
        )
        layer.kernel_weights.mul_(torch.tensor([0.7, 1.3], dtype=torch.float64))
        layer.log_bandwidths.copy_(torch.tensor([1.5, 3.0, 40.0], dtype=torch.float64).log())
    return layer


def _gradcheck(layer, logits, images, names):
    values = {name: getattr(layer, name).detach().clone().requires_grad_(True) for name in names}

    def run(logits, *tensors):
        return functional_call(layer, dict(zip(names, tensors)), (logits, images))

    return torch.autograd.gradcheck(run, (logits.requires_grad_(True), *values.values()), atol=1e-6)


def test_gradients_of_logits_kernel_weights_and_compatibility_equal_finite_differences():
    logits, images = _inputs()
    layer = _perturbed(CRFasRNN(3, iterations=3).double())
    assert _gradcheck(layer, logits, images, ["kernel_weights", "compatibility"])


def test_bandwidth_gradients_equal_finite_differences_of_the_exact_gaussian():
    logits, images = _inputs(batch=2, height=4, width=5)
    layer = _perturbed(CRFasRNN(3, iterations=2, learn_bandwidths=True, filter="exact").double())
    assert _gradcheck(layer, logits, images, list(PARAMETERS))


def test_the_transposed_lattice_is_the_exact_adjoint_of_the_filter():
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(2, 60, 5, generator=gen) * 4
    lattice = PermutohedralLattice(features).to(torch.float64)
    x, y = (torch.randn(2, 60, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    forward = (y * lattice.filter(x)).sum()
    # to the float32 rounding of the slice weights (alpha * the splat weights)
    assert torch.allclose(forward, (lattice.transposed().filter(y) * x).sum(), rtol=1e-6)
    # the blurs do not commute on a sparse lattice: the filter itself is not symmetric, so the order matters.
    # Its matrix (the filter of each unit vector) says so for every input, not one random pair (0.22 here).
    matrix = lattice.filter(torch.eye(60, dtype=torch.float64).expand(2, 60, 60))
    assert (matrix - matrix.transpose(-1, -2)).abs().max() > 0.05 * matrix.abs().max()


@pytest.mark.parametrize("preset", ["deeplab_v2", "deeplab_v1_largefov"])
def test_at_initialisation_it_is_the_offline_crf(preset):
    _, images, probs = synthetic_scene(2, 4, 41, 53, seed=3)
    probs = probs.clamp(min=1e-3)
    probs = probs / probs.sum(1, keepdim=True)  # above the offline clamp, where both must agree exactly
    layer = CRFasRNN(4, preset=preset, iterations=5)
    refined = layer(probs.log(), images).softmax(1)
    offline = dense_crf(probs, images, replace(CRFParams.from_preset(preset), iterations=5), backend="torch")
    assert (refined - offline).abs().max() < 1e-4
    assert torch.equal(refined.argmax(1), offline.argmax(1))
    assert not torch.equal(refined.argmax(1), probs.argmax(1))  # the CRF did change labels


def test_backward_keeps_only_the_marginals_of_each_iteration():
    logits, images = _inputs(batch=2, classes=5, height=24, width=31, dtype=torch.float32)
    layer = CRFasRNN(5, iterations=4)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(logits.requires_grad_(True), images).sum().backward()
    logits_bytes = logits.numel() * 4
    # Q_1 .. Q_3 and the logits (the caller's own tensor: Q_0 is recomputed from it), plus the parameters
    assert sum(saved) <= 4 * logits_bytes + 1024
    assert logits.grad is not None and layer.compatibility.grad is not None


def test_eval_mode_runs_eval_iterations():
    logits, images = _inputs(dtype=torch.float32)
    layer = CRFasRNN(3, iterations=2, eval_iterations=7).eval()
    with torch.no_grad():
        assert torch.equal(layer(logits, images), layer(logits, images, iterations=7))
        assert not torch.equal(layer(logits, images), layer(logits, images, iterations=2))


def test_half_precision_logits_under_autocast_give_float32():
    logits, images = _inputs(dtype=torch.float32)
    layer = CRFasRNN(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(logits.bfloat16(), images)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda crf, x, i: crf(x[:, :2], i), ValueError, "built for 3 classes"),
        (lambda crf, x, i: crf(x, i.float()), TypeError, "raw uint8 RGB"),
        (lambda crf, x, i: crf(x, i[..., :-1]), ValueError, "upsample the logits"),
        (lambda crf, x, i: crf(x.long(), i), TypeError, "float logits"),
        (lambda crf, x, i: crf(x, i[:1]), ValueError, "N = 2"),
        (lambda crf, x, i: crf(x, i, iterations=0), ValueError, "iterations must be a positive int, got 0"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, error, match):
    logits, images = _inputs(dtype=torch.float32)
    with pytest.raises(error, match=match):
        call(CRFasRNN(3), logits, images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes >= 2"),
        ({"num_classes": 3, "iterations": 0}, "iterations must be a positive int"),
        ({"num_classes": 3, "preset": "nope"}, "unknown CRF preset"),
        ({"num_classes": 3, "filter": "box"}, "unknown CRFasRNN filter"),
    ],
)
def test_impossible_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CRFasRNN(**kwargs)


@pytest.mark.gpu
def test_on_the_gpu_it_equals_the_cpu():
    logits, images = _inputs(classes=4, height=33, width=47, dtype=torch.float32)
    layer = CRFasRNN(4)
    cpu = layer(logits.requires_grad_(True), images)
    cpu.square().sum().backward()
    gpu_logits = logits.detach().cuda().requires_grad_(True)
    gpu_layer = CRFasRNN(4).cuda()
    gpu = gpu_layer(gpu_logits, images.cuda())
    gpu.square().sum().backward()
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    assert torch.allclose(gpu_logits.grad.cpu(), logits.grad, atol=1e-4)
    assert torch.allclose(gpu_layer.compatibility.grad.cpu(), layer.compatibility.grad, rtol=1e-3, atol=1e-4)


def test_under_no_grad_nothing_is_kept_for_a_backward(monkeypatch):
    logits, images = _inputs(batch=1, classes=5, height=12, width=15, dtype=torch.float32)
    layer = CRFasRNN(5, iterations=4).eval()  # its parameters require grad: only grad mode says no backward
    saved = []
    keep = torch.autograd.function.FunctionCtx.save_for_backward

    def spy(ctx, *tensors):
        saved.append(len(tensors))
        return keep(ctx, *tensors)

    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward", spy)
    with torch.no_grad():
        layer(logits, images)
    assert saved == [3]  # the logits, the kernel weights and the compatibility, none of the marginals
    layer(logits, images)
    assert saved == [3, 3 + 3]  # with grad mode on, Q_1 .. Q_3 (Q_0 is recomputed from the logits)


@pytest.mark.parametrize("iterations", [1, 3])
def test_a_batch_refined_image_by_image_equals_each_image_alone(iterations):
    # on the CPU the Function refines the batch in one-image chunks, each with its own kernels and kept
    # marginals, written into one output: each image must get its own back, in forward and backward
    logits, images = _inputs(batch=3, classes=4, height=11, width=13, dtype=torch.float32)
    layer = _perturbed(CRFasRNN(4, iterations=iterations))
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    batch = logits.clone().requires_grad_(True)
    refined_batch = layer(batch, images)
    (refined_batch * weights).sum().backward()
    batch_grads = [p.grad.clone() for p in (layer.kernel_weights, layer.compatibility)]
    layer.zero_grad()
    for i in range(3):
        alone = logits[i : i + 1].clone().requires_grad_(True)
        refined = layer(alone, images[i : i + 1])
        (refined * weights[i : i + 1]).sum().backward()
        assert torch.equal(refined, refined_batch[i : i + 1])
        assert torch.equal(alone.grad, batch.grad[i : i + 1])
    for batch_grad, p in zip(batch_grads, (layer.kernel_weights, layer.compatibility)):
        assert torch.allclose(batch_grad, p.grad, rtol=1e-5, atol=1e-6)


def test_learned_bandwidths_keep_one_spatial_kernel_per_image_size():
    logits, images = _inputs(batch=1, height=9, width=11, dtype=torch.float32)
    layer = CRFasRNN(3, iterations=1, learn_bandwidths=True)
    _spatial_kernel.kernels.clear()
    for _ in range(3):
        with torch.no_grad():
            layer.log_bandwidths.add_(0.1)  # a new spatial bandwidth every step, as an optimiser makes
        layer(logits, images).sum().backward()
    kept = [(key[:2], std) for key, (std, _) in _spatial_kernel.kernels.items()]
    assert kept == [((9, 11), pytest.approx(layer.bandwidths["pos_xy_std"]))]  # the last one only


def test_float32_bandwidth_gradients_equal_float64():
    # features are up to the image size over the bandwidth: expanding |f_i - f_j|^2 on them as they are
    # lost 1.4 % of the spatial bandwidth's gradient in float32 here (3.9 % on larger images)
    _, images, probs = synthetic_scene(1, 4, 80, 100, seed=3)
    grads = []
    for dtype in (torch.float32, torch.float64):
        layer = CRFasRNN(4, iterations=3, learn_bandwidths=True).to(dtype)
        (layer(probs.clamp(min=1e-3).log().to(dtype), images).softmax(1)[:, 0] ** 2).sum().backward()
        grads.append(layer.log_bandwidths.grad.double())
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_refused(bad):
    logits, images = _inputs(dtype=torch.float32)
    logits[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="1 non-finite .* logits of 180"):
        CRFasRNN(3)(logits, images)


def test_without_learned_bandwidths_the_bilateral_kernel_drops_its_features():
    logits, images = _inputs(batch=1, classes=3, height=6, width=7, dtype=torch.float32)
    fixed, learned = CRFasRNN(3), CRFasRNN(3, learn_bandwidths=True)
    stds = fixed.bandwidths.values()
    _, bilateral = fixed._kernels(images, list(stds), torch.float32)
    assert bilateral.features is None  # P x 5 floats per image less while the batch is refined
    q = torch.full((1, 42, 3), 1 / 3)
    with pytest.raises(RuntimeError, match="keep_features"):
        bilateral.log_bandwidth_grads(q, q)
    _, kept = learned._kernels(images, list(stds), torch.float32)
    assert set(kept.log_bandwidth_grads(q, q)) == {1, 2}
