from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from deeplab_lit.crf import PROB_EPS, CRFParams, dense, dense_crf
from deeplab_lit.crf import pydensecrf_backend as backend_module
from deeplab_lit.crf.mean_field import mean_field
from deeplab_lit.crf.synthetic import synthetic_scene

BOTH = [
    "torch",
    pytest.param(
        "pydensecrf",
        marks=pytest.mark.skipif(not backend_module.is_available(), reason="pydensecrf not installed"),
    ),
]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    same = (a.argmax(1) == b.argmax(1)).float().mean().item()
    return same, (a - b).abs().max().item()


def _two_regions(height: int = 40, width: int = 50, edge: int = 25, shift: int = 5):
    """A sharp vertical colour edge at ``edge``; the classifier's boundary is blurred and ``shift`` px off."""
    labels = torch.zeros(1, height, width, dtype=torch.int64)
    labels[..., edge:] = 1
    images = torch.empty(1, 3, height, width, dtype=torch.uint8)
    images[:, :, :, :edge] = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None, None]
    images[:, :, :, edge:] = torch.tensor([40, 60, 200], dtype=torch.uint8)[:, None, None]
    noise = torch.randint(-4, 5, images.shape, generator=torch.Generator().manual_seed(0))
    images = (images.int() + noise).clamp(0, 255).to(torch.uint8)
    x = torch.arange(width, dtype=torch.float32)
    logit = ((x - edge - shift + 0.5) / 4).expand(1, height, width)
    probs = torch.stack([torch.sigmoid(-logit), torch.sigmoid(logit)], 1)
    return labels, images, probs


@pytest.mark.parametrize("params", [CRFParams(), CRFParams.from_preset("deeplab_v1_largefov")])
def test_backends_agree(params):
    pytest.importorskip("pydensecrf.densecrf")
    _, images, probs = synthetic_scene(2, 5, 40, 50, seed=1)
    reference = dense_crf(probs, images, params, backend="pydensecrf", num_workers=1)
    ours = dense_crf(probs, images, params, backend="torch")
    same, max_dq = _agreement(reference, ours)
    assert same >= 0.995
    assert max_dq < 1e-4, max_dq
    # and the CRF did something: the labels moved away from the input's
    assert (reference.argmax(1) != probs.argmax(1)).any()


@pytest.mark.parametrize("backend", BOTH)
def test_crf_fixes_a_blurred_boundary(backend):
    labels, images, probs = _two_regions()
    before = (probs.argmax(1) == labels).float().mean().item()
    refined = dense_crf(probs, images, backend=backend, num_workers=1)
    after = (refined.argmax(1) == labels).float().mean().item()
    assert before == pytest.approx(0.9)  # 5 of 50 columns wrong
    assert after > before + 0.05
    assert after >= 0.98


@pytest.mark.parametrize("backend", BOTH)
def test_output_is_a_float32_distribution_of_the_input_shape(backend):
    _, images, probs = synthetic_scene(2, 4, 20, 24, seed=2)
    refined = dense_crf(probs.double(), images, CRFParams(iterations=3), backend=backend, num_workers=1)
    assert refined.shape == probs.shape and refined.dtype == torch.float32 and refined.device == probs.device
    torch.testing.assert_close(refined.sum(1), torch.ones(2, 20, 24), atol=1e-5, rtol=0)
    assert refined.min() >= 0


def test_batched_and_per_image_mean_field_agree():
    """The batched path (the GPU's: one bilateral lattice, the spatial one shared) equals image by image."""
    _, images, probs = synthetic_scene(3, 4, 24, 30, seed=10)
    unary = -probs.clamp(min=PROB_EPS).log()
    params = CRFParams(iterations=4)
    batched = mean_field(unary, images, params, per_image=False)
    single = mean_field(unary, images, params, per_image=True)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert (batched.argmax(1) != probs.argmax(1)).any()


def test_requires_grad_inputs_are_accepted():
    _, images, probs = synthetic_scene(1, 3, 12, 14, seed=11)
    logits = probs.log().requires_grad_()
    for backend in ["torch"] + (["pydensecrf"] if backend_module.is_available() else []):
        refined = dense_crf(logits.softmax(1), images, backend=backend, num_workers=1)
        assert not refined.requires_grad


def test_pool_gives_the_same_result_as_in_process():
    pytest.importorskip("pydensecrf.densecrf")
    _, images, probs = synthetic_scene(3, 4, 30, 36, seed=6)
    try:
        pooled = dense_crf(probs, images, backend="pydensecrf", num_workers=2)
        again = dense_crf(probs, images, backend="pydensecrf", num_workers=2)  # the pool is reused
        assert backend_module._pool is not None and backend_module._pool_workers == 2
    finally:
        backend_module.shutdown_pool()
    assert backend_module._pool is None
    serial = dense_crf(probs, images, backend="pydensecrf", num_workers=1)
    torch.testing.assert_close(pooled, serial, rtol=0, atol=0)
    torch.testing.assert_close(again, serial, rtol=0, atol=0)


def _pool_state_in_child(queue) -> None:
    queue.put(backend_module._pool is None)


def test_a_forked_child_does_not_inherit_the_pool():
    pytest.importorskip("pydensecrf.densecrf")
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    _, images, probs = synthetic_scene(2, 3, 12, 14, seed=6)
    context = multiprocessing.get_context("fork")
    try:
        dense_crf(probs, images, backend="pydensecrf", num_workers=2)
        assert backend_module._pool is not None
        queue = context.Queue()
        child = context.Process(target=_pool_state_in_child, args=(queue,))
        child.start()
        forgotten = queue.get(timeout=60)
        child.join(timeout=60)
    finally:
        backend_module.shutdown_pool()
    assert forgotten is True


_PARENT_SCRIPT = """
import sys, time
from deeplab_lit.crf import dense_crf
from deeplab_lit.crf import pydensecrf_backend as backend
from deeplab_lit.crf.synthetic import synthetic_scene
_, images, probs = synthetic_scene(2, 3, 12, 14, seed=6)
dense_crf(probs, images, backend="pydensecrf", num_workers=2)
print(*backend._pool._processes, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_exit_when_the_parent_is_killed():
    pytest.importorskip("pydensecrf.densecrf")
    parent = subprocess.Popen([sys.executable, "-c", _PARENT_SCRIPT], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), f"orphaned CRF workers still running: {workers}"
    finally:
        parent.kill()
        for pid in filter(_alive, workers):  # leave no orphans behind when the test fails
            os.kill(pid, signal.SIGKILL)


def test_auto_picks_torch_with_several_threads_and_pydensecrf_with_one(monkeypatch):
    _, _, probs = synthetic_scene(1, 3, 10, 12, seed=7)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert dense._resolve_backend("auto", probs) == "torch"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert dense._resolve_backend("auto", probs) == (
        "pydensecrf" if backend_module.is_available() else "torch"
    )
    assert dense.auto_backend(torch.device("cuda")) == "torch"


def test_auto_with_one_thread_falls_back_to_torch_with_one_warning(monkeypatch):
    _, images, probs = synthetic_scene(1, 3, 10, 12, seed=7)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(backend_module, "is_available", lambda: False)
    monkeypatch.setattr(dense, "_warned_fallback", False)
    with pytest.warns(UserWarning, match="pip install pydensecrf2"):
        first = dense_crf(probs, images, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = dense_crf(probs, images, backend="auto")
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, dense_crf(probs, images, backend="torch"))


def test_missing_pydensecrf_is_a_clear_import_error(monkeypatch):
    _, images, probs = synthetic_scene(1, 3, 10, 12, seed=7)
    monkeypatch.setattr(backend_module, "is_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install pydensecrf2"):
        dense_crf(probs, images, backend="pydensecrf")


def test_empty_batch():
    out = dense_crf(torch.empty(0, 3, 8, 8), torch.empty(0, 3, 8, 8, dtype=torch.uint8), backend="torch")
    assert out.shape == (0, 3, 8, 8)


@pytest.fixture
def inputs():
    _, images, probs = synthetic_scene(2, 3, 10, 12, seed=8)
    return probs, images


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda p, i: (p[0], i),
            ValueError,
            r"probs must be \(N, C, H, W\) softmax probabilities, got shape \(3, 10, 12\)",
        ),
        (
            lambda p, i: (p.log(), i),
            ValueError,
            r"non-negative and summing to 1.*pass softmax\(logits, dim=1\)",
        ),
        (lambda p, i: (p * 2, i), ValueError, r"max \|sum - 1\| = 1.*pass softmax"),
        (
            lambda p, i: (p.clone().fill_(float("nan")), i),
            ValueError,
            "probability distribution over the C=3",
        ),
        (lambda p, i: ((p * 100).long(), i), TypeError, "probs must be floating-point"),
        (
            lambda p, i: (p, i.float()),
            TypeError,
            r"uint8.*got dtype torch.float32.*Normalization.denormalize",
        ),
        (
            lambda p, i: (p, i[:, :, :8]),
            ValueError,
            r"image size \(8, 12\) differs from the probabilities' size \(10, 12\)",
        ),
        (lambda p, i: (p, i[:1]), ValueError, "batch sizes differ: probs has 2 images, images has 1"),
        (
            lambda p, i: (p, i[:, :1]),
            ValueError,
            r"images must be \(N, 3, H, W\) uint8 RGB, got shape \(2, 1, 10, 12\)",
        ),
        (lambda p, i: (p.numpy(), i), TypeError, "dense_crf expects torch tensors"),
    ],
)
def test_bad_inputs_raise_clear_errors(inputs, make, error, message):
    probs, images = make(*inputs)
    with pytest.raises(error, match=message):
        dense_crf(probs, images, backend="torch")


def test_unknown_backend_and_bad_params(inputs):
    probs, images = inputs
    expected = r"unknown CRF backend 'cuda'; expected one of \('auto', 'pydensecrf', 'torch'\)"
    with pytest.raises(ValueError, match=expected):
        dense_crf(probs, images, backend="cuda")
    with pytest.raises(TypeError, match="params must be a CRFParams, got dict"):
        dense_crf(probs, images, {"iterations": 5}, backend="torch")  # type: ignore[arg-type]


def test_bad_num_workers(inputs):
    pytest.importorskip("pydensecrf.densecrf")
    probs, images = inputs
    with pytest.raises(ValueError, match="num_workers must be a positive int or None, got 0"):
        dense_crf(probs, images, backend="pydensecrf", num_workers=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_gpu_agrees():
    _, images, probs = synthetic_scene(2, 5, 40, 50, seed=9)
    on_gpu = dense_crf(probs.cuda(), images.cuda(), backend="auto")
    assert on_gpu.is_cuda and on_gpu.dtype == torch.float32
    on_cpu = dense_crf(probs, images, backend="torch")
    same, max_dq = _agreement(on_gpu.cpu(), on_cpu)
    assert same >= 0.995 and max_dq < 1e-4
    if backend_module.is_available():
        same, max_dq = _agreement(on_gpu.cpu(), dense_crf(probs, images, backend="pydensecrf", num_workers=1))
        assert same >= 0.995 and max_dq < 1e-4
