"""Time and memory of the trainable CRF layer (CRFasRNN) against the offline dense CRF.

    python -m benchmarks.crf_rnn_speed                         # 321 and 513 px, batch 1 and 8, 21 classes
    python -m benchmarks.crf_rnn_speed --sizes 65 --batches 1 2 --repeats 1   # seconds: checks that it runs

For each image size and batch: the offline ``dense_crf`` (torch backend, same iterations) forward, the
layer's forward (no gradient) and forward + backward (gradients of the logits, the kernel weights and the
compatibility), in seconds per call, the best of ``--repeats``; and the peak memory of forward + backward.
Memory on CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. On a CPU, in
a fresh process per row, the growth of the peak resident set (VmHWM, reset after the inputs are built and
one tiny call has loaded the libraries: ``/proc/self/clear_refs``) over the resident set at that point.
The issue's targets are printed beside:
forward + backward at most 3x the forward, and peak memory at most ``(iterations + 2)`` x the logits plus
one lattice (the bilateral lattice's matrices, measured on the same images). The tensors autograd keeps
between forward and backward are also counted exactly (``saved_tensors_hooks``): the part of the memory
that grows with the iterations; the rest of the peak is the lattice's construction, transient. Inputs are
the synthetic photo-like scenes of ``deeplab_lit.crf.synthetic`` with their blurred classifier's
log-probabilities.
"""

from __future__ import annotations

import argparse
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


def _inputs(batch: int, size: int, classes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, images, probs = synthetic_scene(batch, classes, size, size, seed=0)
    return probs.clamp(min=1e-5).log().to(device), images.to(device)


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


def _forward_backward(layer: CRFasRNN, logits: torch.Tensor, images: torch.Tensor) -> None:
    x = logits.detach().requires_grad_(True)
    layer(x, images).square().mean().backward()
    layer.zero_grad(set_to_none=True)


def saved_mib(layer: CRFasRNN, logits: torch.Tensor, images: torch.Tensor) -> float:
    """MiB that autograd keeps between the forward and the backward pass of the layer (exact)."""
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _forward_backward(layer, logits, images)
    return sum(sizes) / MIB


def _cpu_peak_mib(batch: int, size: int, classes: int, iterations: int, threads: int) -> float:
    """In a fresh process: peak RSS growth of one forward + backward over the RSS after building inputs."""
    torch.set_num_threads(threads)
    logits, images = _inputs(batch, size, classes, "cpu")
    layer = CRFasRNN(classes, iterations=iterations)
    # Load the libraries and thread pools first, on a tiny image: their memory is no part of the layer's peak.
    _forward_backward(layer, *_inputs(1, 9, classes, "cpu"))
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM to the current RSS
    before = proc_status_mib("VmRSS")
    _forward_backward(layer, logits, images)
    return proc_status_mib("VmHWM") - before


def peak_mib(batch: int, size: int, classes: int, iterations: int, device: str) -> float | None:
    """Peak memory of one forward + backward above what was there before, in MiB (None if unmeasurable)."""
    if device == "cuda":
        logits, images = _inputs(batch, size, classes, device)
        layer = CRFasRNN(classes, iterations=iterations).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _forward_backward(layer, logits, images)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        args = (batch, size, classes, iterations, torch.get_num_threads())
        return pool.submit(_cpu_peak_mib, *args).result()


def row(size: int, batch: int, classes: int, iterations: int, repeats: int, device: str) -> str:
    """One table row: times, memory and the targets' figures for ``batch`` images of ``size`` x ``size``."""
    cuda = device == "cuda"
    logits, images = _inputs(batch, size, classes, device)
    layer = CRFasRNN(classes, iterations=iterations).to(device)
    probs = logits.softmax(1)
    params = replace(CRFParams.from_preset("deeplab_v2"), iterations=iterations)
    dense_crf(probs[:1], images[:1], params, backend="torch")  # warm-up (caches, allocator)
    offline = _best(lambda: dense_crf(probs, images, params, backend="torch"), repeats, cuda)
    with torch.no_grad():
        forward = _best(lambda: layer(logits, images), repeats, cuda)
    both = _best(lambda: _forward_backward(layer, logits, images), repeats, cuda)
    logits_mib = logits.numel() * 4 / MIB
    lattice = _lattice_mib(images, "deeplab_v2")
    saved = saved_mib(layer, logits, images)
    peak = peak_mib(batch, size, classes, iterations, device)
    target = (iterations + 2) * logits_mib + lattice
    shown = "-" if peak is None else f"{peak:.0f}"
    return (
        f"| {size} | {batch} | {offline:.3f} | {forward:.3f} | {both:.3f} | {both / forward:.2f} | "
        f"{logits_mib:.1f} | {saved:.1f} | {lattice:.1f} | {shown} | {target:.1f} |"
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
        "saved for backward MiB | lattice MiB | peak MiB | target MiB |"
    )
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    for size in args.sizes:
        for batch in args.batches:
            print(row(size, batch, args.classes, args.iterations, args.repeats, args.device), flush=True)


if __name__ == "__main__":
    main()
