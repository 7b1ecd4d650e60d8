"""The ``pydensecrf`` backend: Krähenbühl's C++ dense CRF, one image per worker process.

pydensecrf (PyPI ``pydensecrf2``) is single-threaded, so the images of a batch are spread over a pool of
worker processes: a machine with ``k`` cores refines ``k`` images at once. The pool is created lazily on
the first batch that needs it, reused by every later call with the same size, rebuilt after a fork (a
child process never uses its parent's workers) and shut down at interpreter exit. With one worker, or one
image, the work runs in this process and no pool is started. A worker never outlives its parent and
leaves signals to it (:func:`_init_worker`). Only numpy arrays and the parameters cross the process
boundary.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import numpy as np

from deeplab_lit.crf.params import CRFParams

#: How the pool's workers are started (a ``multiprocessing`` start method). Forked on Linux: workers start at
#: once, and they only run numpy and pydensecrf (never torch, CUDA or OpenMP), so a parent holding CUDA
#: contexts or thread pools is no danger to them. With ``"spawn"`` or ``"forkserver"`` each worker imports
#: ``deeplab_lit`` first, which costs the import time of the package once per pool.
MP_CONTEXT = "fork" if sys.platform.startswith("linux") else "spawn"
#: Seconds between a worker's checks that its parent is still alive.
PARENT_CHECK_INTERVAL = 0.5

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_workers = 0


def is_available() -> bool:
    """Whether the ``pydensecrf`` module (from ``pip install pydensecrf2``) can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def require_pydensecrf() -> None:
    """Raise a clear ImportError if pydensecrf is missing."""
    if not is_available():
        raise ImportError(
            "the 'pydensecrf' CRF backend needs the pydensecrf module: `pip install pydensecrf2` "
            "(or `pip install deeplab-lit[crf]`), or use backend='torch'"
        )


def default_num_workers() -> int:
    """Count the CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def refine_one(unary: np.ndarray, image: np.ndarray, params: CRFParams) -> np.ndarray:
    """Run pydensecrf on one image.

    Args:
        unary: ``(C, H, W)`` float32 unary energies ``-log p``.
        image: ``(H, W, 3)`` uint8 RGB image, C-contiguous.
        params: CRF parameters.

    Returns:
        ``(C, H, W)`` float32 marginals.
    """
    import pydensecrf.densecrf as dcrf

    c, h, w = unary.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, h * w), dtype=np.float32))
    if params.pos_w > 0:
        crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    if params.bi_w > 0:
        crf.addPairwiseBilateral(
            sxy=params.bi_xy_std,
            srgb=params.bi_rgb_std,
            rgbim=np.ascontiguousarray(image),
            compat=params.bi_w,
        )
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return q.reshape(c, h, w)


def refine_batch(
    unary: np.ndarray, images: np.ndarray, params: CRFParams, num_workers: int | None = None
) -> np.ndarray:
    """Run pydensecrf on every image of a batch, in parallel over worker processes.

    Args:
        unary: ``(N, C, H, W)`` float32 unary energies.
        images: ``(N, H, W, 3)`` uint8 RGB images.
        params: CRF parameters.
        num_workers: Pool size; None means :func:`default_num_workers`. 1 runs in this process.

    Returns:
        ``(N, C, H, W)`` float32 marginals.
    """
    require_pydensecrf()
    workers = default_num_workers() if num_workers is None else num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"num_workers must be a positive int or None, got {num_workers!r}")
    n = unary.shape[0]
    if workers == 1 or n <= 1:
        results = [refine_one(unary[i], images[i], params) for i in range(n)]
    else:
        pool = _get_pool(workers)
        try:
            results = list(pool.map(refine_one, list(unary), list(images), [params] * n))
        except BrokenProcessPool as error:
            shutdown_pool()
            raise RuntimeError(
                f"a pydensecrf worker process died ({error}); the pool will be restarted"
            ) from error
    return np.stack(results) if results else np.zeros_like(unary, dtype=np.float32)


def _get_pool(workers: int) -> ProcessPoolExecutor:
    global _pool, _pool_workers
    with _lock:
        if _pool is not None and _pool_workers != workers:
            _pool.shutdown(wait=True, cancel_futures=True)
            _pool = None
        if _pool is None:
            _pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=get_context(MP_CONTEXT),
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
            _pool_workers = workers
        return _pool


def _init_worker(parent_pid: int) -> None:
    """Reset inherited signal handlers and start the orphan watchdog (runs once in each worker).

    The watchdog thread exits the worker once the parent is gone, even when the parent was killed with
    SIGKILL and had no chance to shut the pool down. Workers ignore SIGINT (Ctrl+C reaches the whole
    process group; the parent alone decides what to do) and take the default action on SIGTERM, whatever
    handlers the parent had installed before forking.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(
        target=_exit_when_orphaned, args=(parent_pid,), name="crf-orphan-watchdog", daemon=True
    ).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit this worker as soon as its parent process is gone (re-parented workers see another ppid)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL)
    os._exit(1)


def shutdown_pool() -> None:
    """Stop the worker processes (called at exit; a later call starts a new pool)."""
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
            _pool = None


def _forget_pool_in_child() -> None:
    """After a fork the parent's executor is not ours to use: start afresh if needed."""
    global _pool, _lock
    _pool = None
    _lock = threading.Lock()


atexit.register(shutdown_pool)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)
