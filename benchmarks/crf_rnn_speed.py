"""Time and memory of the trainable CRF layer (CRFasRNN) against the offline dense CRF.

    python -m benchmarks.crf_rnn_speed                         # 321 and 513 px, batch 1 and 8, 21 classes
    python -m benchmarks.crf_rnn_speed --sizes 65 --batches 1 2 --repeats 1   # seconds: checks that it runs

Per size and batch (synthetic scenes of ``deeplab_lit.crf.synthetic``): seconds per call, best of
``--repeats``, of the offline ``dense_crf`` forward (torch backend), the layer's forward and its forward +
backward (from an output gradient made beforehand: no loss's own backward); what autograd keeps between
the passes (``saved_tensors_hooks``, each storage once, not the input logits'); the peak memory of one
forward + backward. On CUDA the allocator's peak; on a CPU, in a fresh process per figure, the peak-RSS
growth (VmHWM reset by ``/proc/self/clear_refs`` after a tiny call loaded the libraries), once with
glibc's mmap threshold fixed so that freed blocks go back at once (the layer's memory) and once with the
default malloc (what a process sees, freed blocks kept in its heaps included). Beside them the targets:
forward + backward at most 3x the forward, peak at most ``(iterations + 2)`` x the logits + one lattice.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context

import torch

from benchmarks.crf_speed import cpu_name
from benchmarks.memory import proc_status_mib
from deeplab_lit.crf import CRFasRNN, CRFParams, PermutohedralLattice, dense_crf
from deeplab_lit.crf.mean_field import pixel_features
from deeplab_lit.crf.synthetic import synthetic_scene

MIB = 2**20
#: ``mallopt`` parameter number of glibc's mmap threshold (setting it also stops its adaptive growth).
_M_MMAP_THRESHOLD = -3


def _inputs(
    batch: int, size: int, classes: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, images and a gradient for the layer's output (made beforehand, like the inputs)."""
    _, images, probs = synthetic_scene(batch, classes, size, size, seed=0)
    grad = torch.randn(probs.shape, generator=torch.Generator().manual_seed(1))
    return probs.clamp(min=1e-5).log().to(device), images.to(device), grad.to(device)


def _best(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _lattice_mib(images: torch.Tensor, preset: str) -> float:
    """Bytes of the bilateral lattice's sparse matrices (splat, blurs, slice) on these images, in MiB."""
    params = CRFParams.from_preset(preset)
    lattice = PermutohedralLattice(pixel_features(images, params.bi_xy_std, params.bi_rgb_std))
    matrices = [lattice.splat, lattice.slice, *lattice.blurs]
    parts = [t for m in matrices for t in (m.crow_indices(), m.col_indices(), m.values())]
    return sum(t.numel() * t.element_size() for t in parts) / MIB


def _forward_backward(
    layer: CRFasRNN, logits: torch.Tensor, images: torch.Tensor, grad: torch.Tensor
) -> None:
    """The layer's forward and its backward from ``grad``: no loss, whose own backward is not the layer's."""
    layer(logits.detach().requires_grad_(True), images).backward(grad)
    layer.zero_grad(set_to_none=True)


def saved_mib(layer: CRFasRNN, logits: torch.Tensor, images: torch.Tensor, grad: torch.Tensor) -> float:
    """MiB that autograd keeps between the forward and the backward pass of the layer (exact).

    Each storage counted once, and none of the input logits' own (the caller holds them anyway).
    """
    x = logits.detach().requires_grad_(True)
    sizes = {x.untyped_storage().data_ptr(): 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sizes.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        refined = layer(x, images)
    refined.backward(grad)
    layer.zero_grad(set_to_none=True)
    return sum(sizes.values()) / MIB


def _return_freed_memory() -> None:
    """Make glibc serve every block of 128 KiB or more by mmap, unmapped at its free (fixed threshold).

    By default the threshold grows to the largest block freed so far (up to 32 MiB), after which such
    blocks come from the heap and stay resident when freed: the peak RSS then counts freed memory too.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")


def _cpu_peak_mib(
    batch: int, size: int, classes: int, iterations: int, threads: int, default_malloc: bool
) -> float:
    """In a fresh process: peak RSS growth of one forward + backward over the RSS after building inputs."""
    if not default_malloc:
        _return_freed_memory()
    torch.set_num_threads(threads)
    inputs = _inputs(batch, size, classes, "cpu")
    layer = CRFasRNN(classes, iterations=iterations)
    # Load the libraries and thread pools first, on a tiny image: their memory is no part of the layer's peak.
    _forward_backward(layer, *_inputs(1, 9, classes, "cpu"))
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM to the current RSS
    before = proc_status_mib("VmRSS")
    _forward_backward(layer, *inputs)
    return proc_status_mib("VmHWM") - before


def peak_mib(
    batch: int, size: int, classes: int, iterations: int, device: str, default_malloc: bool = False
) -> float | None:
    """Peak memory of one forward + backward above what was there before, in MiB (None if unmeasurable).

    On a CPU with ``default_malloc`` the figure includes what glibc keeps of the freed memory (see
    :func:`_return_freed_memory`); on CUDA it is the caching allocator's allocated peak either way.
    """
    if device == "cuda":
        inputs = _inputs(batch, size, classes, device)
        layer = CRFasRNN(classes, iterations=iterations).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _forward_backward(layer, *inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    if not os.path.exists("/proc/self/clear_refs") or ctypes.util.find_library("c") is None:
        return None
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        args = (batch, size, classes, iterations, torch.get_num_threads(), default_malloc)
        return pool.submit(_cpu_peak_mib, *args).result()


def row(size: int, batch: int, classes: int, iterations: int, repeats: int, device: str) -> str:
    """One table row: times, memory and the targets' figures for ``batch`` images of ``size`` x ``size``."""
    cuda = device == "cuda"
    logits, images, grad = _inputs(batch, size, classes, device)
    layer = CRFasRNN(classes, iterations=iterations).to(device)
    probs = logits.softmax(1)
    params = replace(CRFParams.from_preset("deeplab_v2"), iterations=iterations)
    dense_crf(probs[:1], images[:1], params, backend="torch")  # warm-up (caches, allocator)
    offline = _best(lambda: dense_crf(probs, images, params, backend="torch"), repeats, cuda)
    with torch.no_grad():
        forward = _best(lambda: layer(logits, images), repeats, cuda)
    both = _best(lambda: _forward_backward(layer, logits, images, grad), repeats, cuda)
    logits_mib = logits.numel() * 4 / MIB
    lattice = _lattice_mib(images, "deeplab_v2")
    saved = saved_mib(layer, logits, images, grad)
    peaks = [peak_mib(batch, size, classes, iterations, device, default) for default in (False, True)]
    target = (iterations + 2) * logits_mib + lattice
    peak, default_peak = ("-" if p is None else f"{p:.0f}" for p in peaks)
    return (
        f"| {size} | {batch} | {offline:.3f} | {forward:.3f} | {both:.3f} | {both / forward:.2f} | "
        f"{logits_mib:.1f} | {saved:.1f} | {lattice:.1f} | {peak} | {default_peak} | {target:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[321, 513])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(
        f"{device_name}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}; "
        f"{args.classes} classes, {args.iterations} iterations, preset deeplab_v2\n"
    )
    header = (
        "| size | batch | offline fwd s | layer fwd s | fwd+bwd s | fwd+bwd / fwd (<= 3) | logits MiB | "
        "saved for backward MiB | lattice MiB | peak MiB | peak MiB, default malloc | target MiB |"
    )
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    for size in args.sizes:
        for batch in args.batches:
            print(row(size, batch, args.classes, args.iterations, args.repeats, args.device), flush=True)


if __name__ == "__main__":
    main()
