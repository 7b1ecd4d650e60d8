"""Time the dense-CRF backends per image at VOC size and measure their agreement.

    python benchmarks/crf_speed.py                      # 500x375, 21 classes, 10 iterations, batch of 8
    python benchmarks/crf_speed.py --batch 4 --repeats 1 --workers 2

Rows: pydensecrf in one process; pydensecrf over the process pool (and its speed-up over one process);
the torch backend on the CPU; the torch backend on the GPU when one is present (warm-up + CUDA
synchronisation around the timed region). Times are wall-clock seconds per image, the best of
``--repeats`` runs, with the CPU seconds that run used (this process's threads, or the pool's workers): on
a machine shared with other jobs the wall-clock figures and the pool's speed-up suffer, the CPU figures
much less. Agreement of the torch backend with pydensecrf: % of pixels with the same label after
CRF, and max / mean |dQ| over all pixels and classes. Inputs are synthetic photo-like scenes with sharp
edges and a blurred, noisy softmax (``deeplab_lit.crf.synthetic``).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable

import torch

from deeplab_lit.crf import CRFParams, dense_crf
from deeplab_lit.crf import pydensecrf_backend as pdc
from deeplab_lit.crf.synthetic import synthetic_scene


def best_time(
    fn: Callable[[], torch.Tensor], repeats: int, cuda: bool = False, children: bool = False
) -> tuple[float, float, torch.Tensor]:
    """Best wall-clock time over ``repeats`` runs, the CPU time of that run, and the output.

    The CPU time is this process's (all its threads), or with ``children`` that of the pool's worker
    processes, which are shut down after each run so that their usage is counted.
    """
    best, best_cpu, out = float("inf"), float("nan"), None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if children:
            pdc.shutdown_pool()
        after = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
        if seconds < best:
            best = seconds
            best_cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return best, best_cpu, out


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.float().cpu(), b.float().cpu()
    same = (a.argmax(1) == b.argmax(1)).float().mean().item() * 100
    diff = (a - b).abs()
    return f"{same:.3f}% same labels, max |dQ| {diff.max().item():.2e}, mean |dQ| {diff.mean().item():.2e}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="images per call (pool and torch rows)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row; the best is reported")
    parser.add_argument("--workers", type=int, default=None, help="pool size (default: cores available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torch-cpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = CRFParams(iterations=args.iterations)
    labels, images, probs = synthetic_scene(args.batch, args.classes, args.height, args.width, seed=args.seed)
    workers = args.workers or pdc.default_num_workers()
    n = args.batch
    print(
        f"CPU: {cpu_name()}, {pdc.default_num_workers()} cores available, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(
        f"{n} images {args.width}x{args.height}, {args.classes} classes, {args.iterations} iterations, "
        f"params {params}\n"
    )
    rows: list[tuple[str, float, float, str]] = []
    results: dict[str, torch.Tensor] = {}
    single = None
    if pdc.is_available():
        single, cpu, results["pydensecrf"] = best_time(
            lambda: dense_crf(probs, images, params, backend="pydensecrf", num_workers=1), args.repeats
        )
        single /= n
        rows.append(("pydensecrf, 1 process", single, cpu / n, "1.00x"))
        # The pool's workers are forked on Linux (started in milliseconds), so each run starts a fresh one.
        pooled, cpu, out = best_time(
            lambda: dense_crf(probs, images, params, backend="pydensecrf", num_workers=workers),
            args.repeats,
            children=True,
        )
        assert torch.equal(out, results["pydensecrf"]), "pool and in-process results differ"
        rows.append((f"pydensecrf, pool of {workers}", pooled / n, cpu / n, f"{single / (pooled / n):.2f}x"))
    else:
        print("pydensecrf is not installed (pip install pydensecrf2): reference rows skipped\n")
    if not args.skip_torch_cpu:
        dense_crf(probs[:1], images[:1], params, backend="torch")  # warm-up
        seconds, cpu, results["torch-cpu"] = best_time(
            lambda: dense_crf(probs, images, params, backend="torch"), args.repeats
        )
        speed = f"{single / (seconds / n):.2f}x" if single else "-"
        rows.append((f"torch, CPU ({torch.get_num_threads()} threads)", seconds / n, cpu / n, speed))
    if torch.cuda.is_available():
        gpu_probs, gpu_images = probs.cuda(), images.cuda()
        dense_crf(gpu_probs, gpu_images, params, backend="torch")  # warm-up
        seconds, cpu, out = best_time(
            lambda: dense_crf(gpu_probs, gpu_images, params, backend="torch"), args.repeats, cuda=True
        )
        results["torch-gpu"] = out.cpu()
        speed = f"{single / (seconds / n):.1f}x" if single else "-"
        rows.append((f"torch, GPU batch of {n}", seconds / n, cpu / n, speed))
        seconds, cpu, _ = best_time(
            lambda: dense_crf(gpu_probs[:1], gpu_images[:1], params, backend="torch"), args.repeats, cuda=True
        )
        speed = f"{single / seconds:.1f}x" if single else "-"
        rows.append(("torch, GPU batch of 1", seconds, cpu, speed))
    print(f"{'backend':<32}{'s / image':>12}{'CPU s / image':>16}{'vs 1 process':>16}")
    for name, seconds, cpu, speed in rows:
        print(f"{name:<32}{seconds:>12.3f}{cpu:>16.3f}{speed:>16}")
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f} on {pdc.default_num_workers()} cores)")
    print()
    before = (probs.argmax(1) == labels).float().mean().item() * 100
    print(f"pixel accuracy on the synthetic labels: {before:.2f}% before CRF")
    for name, q in results.items():
        after = (q.argmax(1) == labels).float().mean().item() * 100
        print(f"  after CRF ({name}): {after:.2f}%")
    if "pydensecrf" in results:
        for name in ("torch-cpu", "torch-gpu"):
            if name in results:
                print(f"agreement {name} vs pydensecrf: {agreement(results[name], results['pydensecrf'])}")


if __name__ == "__main__":
    main()
