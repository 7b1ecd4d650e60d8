"""What the datamodules' DataLoaders are made of: workers (count, start), DDP evaluation sampler, collate.

Kept apart from :mod:`deeplab_lit.data.datamodules` (which says which files each data set has) because these
decide how batches are formed, for every data set alike.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, default_collate

from deeplab_lit.data.transforms import seed_worker


def default_num_workers() -> int:
    """Return the usable CPU cores shared among the node's GPUs (one process each), 1 to 12; no GPU: <= 4.

    On a 16-core H100 machine 4 workers delivered too little headroom over the ResNet-50 DeepLabs'
    training step (BENCHMARKS.md, "Models on the GPU machine (third session)"). On a CPU-only
    machine the training step is far slower than even one worker, and more workers would only hold
    memory, so at most 4 there.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = torch.cuda.device_count()
    return max(1, min(12, cores // gpus)) if gpus else min(4, cores)


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM to the main process, then seed the augmentation.

    A scheduler's SIGTERM reaches every process of the job (``scancel``, ``kill -TERM -<pgid>``, a
    container stop). torch's workers install a handler that ends them on it, and the main process then
    fails on their death ("DataLoader worker ... is killed by signal: Terminated") before
    :class:`~deeplab_lit.callbacks.InterruptCheckpoint` has written its checkpoint. Here a worker ignores
    a SIGTERM from anyone but its main process and still exits on the main process's own (which ends
    leftover workers with it at exit: ignoring every SIGTERM would hang that exit). Where signals cannot
    be waited for with their sender (no ``sigwaitinfo``: Windows, macOS), torch's handler stays.
    """
    if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        _only_the_parents_sigterm(os.getppid())
    seed_worker(worker_id)


def _only_the_parents_sigterm(parent: int) -> None:
    """Block SIGTERM in this process and take it in a thread: exit if ``parent`` sent it, else ignore it."""

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)  # as torch's worker handler does for its parent's SIGTERM

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=wait, name="sigterm-from-main-only", daemon=True).start()


class UnrepeatedDistributedSampler(DistributedSampler[int]):
    """In-order DDP shards with no image twice: process ``r`` of ``n`` gets images ``r, r + n, r + 2n, ...``.

    torch's ``DistributedSampler`` pads the shards to equal length with repeated images; here the shards
    differ by at most one image. Being a ``DistributedSampler``, Lightning keeps it instead of putting its
    own in. Without shuffling, this is what Lightning's ``UnrepeatedDistributedSampler`` (in its
    undocumented ``overrides`` module) does, also refusing a process without any image.
    """

    def __init__(
        self, dataset: Dataset[Any], num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        """``num_replicas`` and ``rank`` default to the process group's, as in ``DistributedSampler``."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        if not isinstance(dataset, Sized):
            raise TypeError(f"The evaluation set {type(dataset).__name__} has no length (no __len__).")
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))  # what len() returns
        if self.num_samples == 0 and self.total_size > 0:
            raise ValueError(
                f"The evaluation set has {self.total_size} images for {self.num_replicas} processes: process "
                f"{self.rank} would get none. Evaluate on at most {self.total_size} devices."
            )

    def __iter__(self) -> Iterator[int]:
        """Yield this process's indices, in order."""
        return iter(range(self.rank, self.total_size, self.num_replicas))


def unrepeated_eval_sampler(dataset: Dataset[Any]) -> Sampler[int] | None:
    """Under DDP, a sampler that gives each process its share of ``dataset`` with no image twice.

    Lightning's default DistributedSampler pads the last shard with repeated images so every process
    has as many batches, and those repeats would be counted twice in the summed confusion matrix: a
    mIoU that depends on the number of GPUs. Evaluation runs no per-step collective, so uneven shards
    are safe. Lightning keeps any DistributedSampler it finds. Returns None (in-order sampling) when
    not distributed.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return UnrepeatedDistributedSampler(dataset)


#: Side of the image tensor of a predict batch whose every file was unreadable: ``(0, 3, 32, 32)``, large
#: enough for every inference mode (multi-scale at 0.25 still leaves 8 pixels), and no image to run.
_EMPTY_BATCH_SIDE = 32


def _check_one_size(items: list[dict[str, Any]], stage: str) -> None:
    """Raise one ValueError naming every image and its size when ``items`` differ in size."""
    sizes = [tuple(item["image"].shape[-2:]) for item in items]
    if len(set(sizes)) <= 1:
        return
    listed = ", ".join(
        f"{item.get('path', item.get('name'))} ({w}x{h})" for item, (h, w) in zip(items, sizes, strict=True)
    )
    raise ValueError(
        f"Cannot batch {len(items)} {stage} images of different sizes (WxH): {listed}. Evaluation and "
        "predict run on whole images, and a batch is one tensor, so a batch size above 1 needs images of "
        "one size. Set `val_batch_size: 1` (--data.init_args.val_batch_size=1)."
    )


def eval_collate(items: list[dict[str, Any]], stage: str = "validate") -> dict[str, Any]:
    """Collate whole images for validate/test/predict, with clear errors instead of torch's raw ones.

    Images of different sizes raise one ValueError naming each image, its size and the remedy
    (``val_batch_size: 1``), where torch would say "stack expects each tensor to be equal size".
    Predict items that could not be read (``"image": None``, see
    :class:`~deeplab_lit.data.images.ImageFileDataset`) leave the batch and are listed under
    ``batch["skipped"]`` as ``{"path", "error"}`` dicts; every predict batch has that key. A batch whose
    every file was unreadable has an image tensor of zero images, ``(0, 3, 32, 32)``, and empty name and
    path lists: it runs through the model and writes nothing.

    Args:
        items: Dataset items of one batch.
        stage: ``"validate"``, ``"test"`` or ``"predict"``, named in the error.

    Returns:
        The collated batch.
    """
    readable = [item for item in items if item["image"] is not None]
    skipped = [{"path": item["path"], "error": item["error"]} for item in items if item["image"] is None]
    _check_one_size(readable, stage)
    if readable:
        batch = default_collate(readable)
    else:
        side = _EMPTY_BATCH_SIDE
        batch = {"image": torch.zeros(0, 3, side, side), "name": [], "path": []}
    if stage == "predict":
        batch["skipped"] = skipped
    return batch
