"""Preflight: read every image/mask pair of the splits a run will use, before its first step.

A bad file found by the loader stops a run mid-epoch or at its first validation, thousands of steps
in, with nothing saved. The preflight reads each pair exactly as training will - through the split's
own ``__getitem__`` (so :func:`~deeplab_lit.data.images.read_image`, the dataset's ``load_mask``, the
size check, the label map and the class-range check are the same code, and a truncated JPEG or PNG
fails the same way) - with only the transform swapped for one that records the image size. Every
bad pair is collected, and one :class:`PreflightError` lists them all.

A pair costs what the loader pays for it before augmentation (BENCHMARKS.md, "Evaluation memory and
the data preflight"), so the pairs are spread over ``num_workers`` processes and those an earlier run
found good are cached (:func:`cache_file`): only the first run on a data set pays. Pillow's JPEG draft
mode saves too little for a second reading path that training does not take (same section). Under DDP
the processes share the pairs and all raise the same error (:func:`check_splits`).
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch.distributed
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import ConcatDataset, Dataset

from deeplab_lit.data.images import SegmentationDataset
from deeplab_lit.data.transforms import IGNORE_INDEX

#: Bump when the checks change in a way the source hashes of the readers do not show.
PREFLIGHT_VERSION = 2  # 2: entries hold each mask's class pixel counts
#: Fewer pairs to read than this are read in this process: a pool would cost more than it saves.
POOL_MIN_PAIRS = 64
#: Bad pairs named in the error message; a longer list is written to a file the message names.
MAX_LISTED = 50
#: Cache files of other data sets not written for this many days are deleted when a cache is written.
STALE_DAYS = 60

#: ``(height, width)`` of an image.
Size = tuple[int, int]
#: What reading a good pair tells: the image's size and its mask's pixels per class id (void excluded).
Facts = tuple[Size, list[int]]
#: One pair's verdict: ``(part index, item index, facts or None, problem or None, fingerprint or None,
#: whether it came from the cache)``.
Verdict = tuple[int, int, "Facts | None", "str | None", "list[int] | None", bool]
#: Exchanges one picklable object with every process and returns all of them, in rank order.
Gather = Callable[[object], list[Any]]


class PreflightError(ValueError):
    """Some files of the data set cannot be read as training will read them."""


@dataclass
class ClassCounts:
    """Class statistics of a split, for median-frequency class weights (:mod:`deeplab_lit.losses`).

    Attributes:
        pixels: Labelled pixels of each class id.
        image_pixels: Labelled pixels of the images in which each class id appears.
    """

    pixels: list[int]
    image_pixels: list[int]


@dataclass
class SplitCheck:
    """What the preflight learned about one split.

    Attributes:
        role: ``"train"``, ``"val"`` or ``"test"``.
        sizes: ``(height, width)`` of every image, in the split's order (None where the pair is bad).
        paths: Image file of every item, same order.
        problems: One message per bad pair, naming its file(s) and what is wrong.
        cached: Pairs whose good verdict came from the cache.
        class_counts: Class statistics of the good pairs.
    """

    role: str
    sizes: list[Size | None] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    cached: int = 0
    class_counts: ClassCounts = field(default_factory=lambda: ClassCounts([], []))

    def add_mask_counts(self, counts: list[int]) -> None:
        """Add one mask's pixels per class to :attr:`class_counts`."""
        total, stats = sum(counts), self.class_counts
        for store in (stats.pixels, stats.image_pixels):
            store.extend([0] * (len(counts) - len(store)))
        for c, n in enumerate(counts):
            stats.pixels[c] += n
            stats.image_pixels[c] += total if n else 0


class _ImageFacts:
    """Stands in for a split's transform: the image's ``(height, width)`` and the mask's class counts."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> tuple[Size, list[int]]:
        labelled = mask[mask != IGNORE_INDEX] if mask is not None else np.zeros(0, np.uint8)
        return (int(image.shape[0]), int(image.shape[1])), np.bincount(labelled.ravel()).tolist()


def pair_datasets(dataset: Dataset[Any]) -> list[SegmentationDataset]:
    """Return the :class:`SegmentationDataset` parts of ``dataset`` (itself, or a ConcatDataset's parts).

    Raises:
        TypeError: a part is another kind of dataset, whose files the preflight cannot know.
    """
    parts = list(dataset.datasets) if isinstance(dataset, ConcatDataset) else [dataset]
    pairs = []
    for part in parts:
        if not isinstance(part, SegmentationDataset):
            raise TypeError(
                f"The preflight reads SegmentationDataset splits; got {type(part).__name__}. Build the "
                "split from deeplab_lit.data.images.SegmentationDataset, or set preflight: false."
            )
        pairs.append(part)
    return pairs


def _probe(dataset: SegmentationDataset) -> SegmentationDataset:
    """Copy ``dataset`` (shallow) so that its items are sizes and class counts: every read and check."""
    probe = copy.copy(dataset)
    probe.transform = _ImageFacts()
    return probe


def check_pair(probe: SegmentationDataset, index: int) -> tuple[Facts | None, str | None]:
    """Read item ``index`` of a probe as training would; return its facts, or the reason it fails."""
    try:
        item = probe[index]
        return (item["image"], item["mask"]), None
    except Exception as err:  # every failure is a finding to list, not a crash of the check
        message = str(err) if isinstance(err, (FileNotFoundError, ValueError)) else repr(err)
        image, mask = str(probe.images[index]), str(probe.masks[index])
        return None, message if image in message or mask in message else f"{image} / {mask}: {message}"


def fingerprint(probe: SegmentationDataset, index: int) -> list[int] | None:
    """Size and modification time (ns) of the image and the mask of item ``index``; None if one is missing."""
    try:
        image, mask = os.stat(probe.images[index]), os.stat(probe.masks[index])
    except OSError:
        return None
    return [image.st_size, image.st_mtime_ns, mask.st_size, mask.st_mtime_ns]


_PROBES: list[SegmentationDataset] = []


def _init_worker(probes: list[SegmentationDataset]) -> None:
    global _PROBES
    _PROBES = probes


def _check_chunk(chunk: Sequence[tuple[int, int]]) -> list[tuple[Facts | None, str | None]]:
    return [check_pair(_PROBES[d], i) for d, i in chunk]


def read_pairs(
    probes: list[SegmentationDataset], todo: list[tuple[int, int]], num_workers: int
) -> list[tuple[Facts | None, str | None]]:
    """Check the pairs ``todo`` (``(probe index, item index)``), over ``num_workers`` processes."""
    if num_workers < 1 or len(todo) < POOL_MIN_PAIRS:
        return [check_pair(probes[d], i) for d, i in todo]
    chunk = max(8, math.ceil(len(todo) / (num_workers * 16)))
    chunks = [todo[start : start + chunk] for start in range(0, len(todo), chunk)]
    executor = concurrent.futures.ProcessPoolExecutor(
        num_workers, multiprocessing.get_context(), initializer=_init_worker, initargs=(probes,)
    )
    try:
        return [verdict for part in executor.map(_check_chunk, chunks) for verdict in part]
    finally:
        executor.shutdown(cancel_futures=True)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/deeplab_lit/preflight``, or ``~/.cache/deeplab_lit/preflight``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deeplab_lit" / "preflight"


def _reader_sources(dataset: SegmentationDataset) -> str:
    """Hash the source files that read and check this dataset's items (its class and bases, this module)."""
    files = {
        inspect.getsourcefile(cls)
        for cls in type(dataset).__mro__
        if cls.__module__.startswith("deeplab_lit")
    }
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(f for f in files if f):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def cache_file(dataset: SegmentationDataset, folder: Path) -> Path:
    """Return the cache file of one split: keyed by all but the files that can change a verdict.

    A pair whose two files have not changed (same path, size and modification time) since a run that
    found it good is taken from this file. The verdict also depends on the number of classes, the label
    map, the reader (the source of the dataset class and its bases), Pillow's version and this module's
    :data:`PREFLIGHT_VERSION`: all of them key the file. It lives under :func:`cache_dir`, never in the
    data root, which may be read-only.
    """
    label_map = dataset.label_map
    context = {
        "preflight": PREFLIGHT_VERSION,
        "reader": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "reader_sources": _reader_sources(dataset),
        "pillow": PIL.__version__,
        "num_classes": dataset.num_classes,
        "label_map": None if label_map is None else label_map.fingerprint(),
        "source": dataset.source,
    }
    key = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:24]
    return folder / f"{key}.json"


def pair_keys(probe: SegmentationDataset) -> list[str]:
    """Cache keys of every item: its image and mask paths, made absolute (cheaply: no normalisation)."""
    cwd = os.getcwd()
    return [
        f"{os.path.join(cwd, image)}\t{os.path.join(cwd, mask)}"
        for image, mask in zip(probe.images, probe.masks)
    ]


def load_cache(path: Path) -> dict[str, list[int]]:
    """Read the entries ``pair key -> [fingerprint..., height, width]``; empty if absent or unreadable."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def save_cache(path: Path, entries: dict[str, list[int]]) -> None:
    """Write a cache file atomically, and delete other cache files unused for :data:`STALE_DAYS` days.

    A folder that cannot be written is a warning: the check still ran, only the next run pays again.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            json.dump(entries, tmp, separators=(",", ":"))
        os.replace(tmp.name, path)
    except OSError as err:
        rank_zero_warn(
            f"Preflight results not cached ({err}); the next run checks every file again. Set XDG_CACHE_HOME "
            "to a writable folder to cache them."
        )
        return
    stale = time.time() - STALE_DAYS * 86400
    for other in path.parent.glob("*.json"):
        try:
            if other != path and other.stat().st_mtime < stale:
                other.unlink()
        except OSError:
            pass  # another process removed or holds it: nothing to clean


def _my_verdicts(
    probes: list[SegmentationDataset],
    keys: list[list[str]],
    caches: list[dict[str, Any]],
    rank: int,
    world_size: int,
    num_workers: int,
) -> list[Verdict]:
    """Verdicts of the pairs this process answers for (``index % world_size == rank``): cached or read."""
    verdicts: list[Verdict] = []
    todo: list[tuple[int, int]] = []
    prints: dict[tuple[int, int], list[int] | None] = {}
    for d, probe in enumerate(probes):
        for i in range(rank, len(probe), world_size):
            prints[d, i] = fingerprint(probe, i)
            entry = caches[d].get(keys[d][i])
            if prints[d, i] is not None and entry is not None and entry[:4] == prints[d, i]:
                verdicts.append((d, i, ((entry[4], entry[5]), entry[6:]), None, prints[d, i], True))
            else:
                todo.append((d, i))
    if len(todo) >= 1000:
        rank_zero_info(f"Preflight: reading {len(todo)} image/mask pairs not checked before ...")
    for (d, i), (facts, problem) in zip(todo, read_pairs(probes, todo, num_workers)):
        verdicts.append((d, i, facts, problem, prints[d, i], False))
    return verdicts


def _all_gather(obj: object) -> list[Any]:
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def process_group() -> tuple[int, int, Gather | None]:
    """Return ``(rank, world size, gather)`` of torch.distributed's group, or ``(0, 1, None)`` without one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1, None
    world_size = torch.distributed.get_world_size()
    return torch.distributed.get_rank(), world_size, _all_gather if world_size > 1 else None


def check_splits(
    splits: Mapping[str, Dataset[Any]],
    num_workers: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    write_cache: bool = True,
) -> dict[str, SplitCheck]:
    """Read every pair of ``splits`` as training would, and raise one error listing every bad pair.

    Under DDP every process calls it: process ``r`` of ``n`` checks pairs ``r, r + n, ...``, the verdicts
    are exchanged (``all_gather_object``), and every process raises the same error or goes on, so none
    waits forever for one that stopped. Each node's local rank 0 writes the cache.

    Args:
        splits: Role (``"train"``, ``"val"``, ``"test"``) -> dataset of image/mask pairs.
        num_workers: Worker processes that read pairs (0: read in this process).
        rank: This process's rank among ``world_size`` (DDP); it reads its share of the pairs.
        world_size: Number of processes checking together.
        gather: Exchanges the verdicts between the processes (required when ``world_size > 1``).
        write_cache: Write the cache file (one process per machine does).

    Returns:
        Role -> :class:`SplitCheck` (sizes and paths of every item).

    Raises:
        PreflightError: some pairs are bad; the message lists each (the first :data:`MAX_LISTED`, the
            rest in a file it names).
    """
    start = time.perf_counter()
    roles = [(role, part) for role, dataset in splits.items() for part in pair_datasets(dataset)]
    probes = [_probe(part) for _, part in roles]
    folder = cache_dir()
    files = [cache_file(probe, folder) for probe in probes]
    caches = [load_cache(path) for path in files]
    keys = [pair_keys(probe) for probe in probes]
    verdicts = _my_verdicts(probes, keys, caches, rank, world_size, num_workers)
    if world_size > 1:
        if gather is None:
            raise ValueError("check_splits needs gather to exchange verdicts when world_size > 1")
        verdicts = [v for part in gather(verdicts) for v in part]
    checks = _collect(splits, roles, probes, verdicts)
    if write_cache:
        _update_caches(keys, files, caches, verdicts)
    _report(checks, time.perf_counter() - start, world_size)
    return checks


def _collect(
    splits: Mapping[str, Dataset[Any]],
    roles: list[tuple[str, SegmentationDataset]],
    probes: list[SegmentationDataset],
    verdicts: list[Verdict],
) -> dict[str, SplitCheck]:
    """Arrange the verdicts by split, in each split's item order."""
    checks = {role: SplitCheck(role) for role in splits}
    offsets = [0] * len(probes)
    for d in range(1, len(probes)):  # a ConcatDataset's parts follow each other in one split
        offsets[d] = offsets[d - 1] + len(probes[d - 1]) if roles[d][0] == roles[d - 1][0] else 0
    for role in splits:
        checks[role].sizes = [None] * sum(len(probes[d]) for d, (r, _) in enumerate(roles) if r == role)
        checks[role].paths = [p for d, (r, _) in enumerate(roles) if r == role for p in probes[d].images]
    for d, i, facts, problem, _, cached in sorted(verdicts, key=lambda v: (v[0], v[1])):
        check = checks[roles[d][0]]
        if facts is not None:
            check.sizes[offsets[d] + i] = facts[0]
            check.add_mask_counts(facts[1])
        check.cached += cached
        if problem is not None:
            check.problems.append(problem)
    return checks


def _update_caches(
    keys: list[list[str]], files: list[Path], caches: list[dict[str, Any]], verdicts: list[Verdict]
) -> None:
    """Rewrite each split's cache with its good pairs (kept entries and new ones), if anything changed."""
    fresh: list[dict[str, list[int]]] = [{} for _ in keys]
    for d, i, facts, problem, fp, _ in verdicts:
        if problem is None and fp is not None and facts is not None:
            fresh[d][keys[d][i]] = [*fp, *facts[0], *facts[1]]
    for path, old, new in zip(files, caches, fresh):
        if new != old:
            save_cache(path, new)


def _report(checks: dict[str, SplitCheck], seconds: float, world_size: int) -> None:
    """Print the one-line summary, or raise the error that lists every bad pair."""
    counts = " + ".join(f"{len(c.sizes)} {c.role}" for c in checks.values())
    cached = sum(c.cached for c in checks.values())
    problems = [f"[{c.role}] {p}" for c in checks.values() for p in c.problems]
    if not problems:
        over = f" over {world_size} processes" if world_size > 1 else ""
        rank_zero_info(
            f"Preflight: all {counts} image/mask pairs good ({cached} cached) in {seconds:.1f} s{over}"
        )
        return
    listed = "\n  ".join(problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        listed += f"\n  ... and {len(problems) - MAX_LISTED} more, all listed in {_write_list(problems)}"
    raise PreflightError(
        f"The preflight found {len(problems)} bad image/mask pair(s) among {counts}; nothing was trained. "
        f"Fix or remove them (every file is read again after a change), or set the datamodule's "
        f"preflight: false to skip this check:\n  {listed}"
    )


def _write_list(problems: list[str]) -> Path:
    """Write every problem to a text file (in the cache folder, else the temp folder); return its path."""
    text = "\n".join(problems) + "\n"
    for folder in (cache_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=folder, prefix="bad-files-", suffix=".txt", delete=False
            ) as f:
                f.write(text)
            return Path(f.name)
        except OSError:
            continue
    raise PreflightError(f"The preflight found {len(problems)} bad pairs:\n" + text)


def check_equal_sizes(check: SplitCheck, batch_size: int, option: str = "val_batch_size") -> None:
    """Raise if batches of ``batch_size`` whole images of this split would mix image sizes.

    Evaluation stacks whole images into one tensor, so a batch of more than one image needs equal sizes;
    the error names the sizes found and an image of each, before the run starts.
    """
    if batch_size <= 1:
        return
    examples: dict[Size, tuple[int, Path]] = {}
    for size, path in zip(check.sizes, check.paths):
        if size is not None:
            count, first = examples.get(size, (0, path))
            examples[size] = (count + 1, first)
    if len(examples) <= 1:
        return
    ranked = sorted(examples.items(), key=lambda item: -item[1][0])
    shown = ", ".join(f"{w}x{h} ({n} images, e.g. {p})" for (h, w), (n, p) in ranked[:5])
    more = f" and {len(ranked) - 5} more sizes" if len(ranked) > 5 else ""
    raise ValueError(
        f"{option}={batch_size}, but the {check.role} images differ in size (WxH): {shown}{more}. Whole "
        f"images of one batch must share a size: set {option}: 1, or give the {check.role} images one size."
    )


def check_crop_size(check: SplitCheck, crop_size: int, scale_range: tuple[float, float]) -> None:
    """Warn if the training crop is larger than every image of ``check``, even at the largest scale.

    The augmentation pads an image smaller than the crop (the image with the mean pixel, the mask with the
    ignore label), so such crops are partly padding on every step, and nothing else says so.
    """
    sizes = [size for size in check.sizes if size is not None]
    high = scale_range[1]
    if not sizes or any(max(h, w) * high >= crop_size for h, w in sizes):
        return
    h, w = max(sizes, key=lambda size: size[0] * size[1])
    filled = min(1.0, h * high / crop_size) * min(1.0, w * high / crop_size)
    fits = math.ceil(max(max(size) for size in sizes) * high)
    rank_zero_warn(
        f"crop_size={crop_size} is larger than every {check.role} image, even scaled by {high} (the top of "
        f"scale_range): the largest, {w}x{h} (WxH), fills at most {filled:.0%} of a crop, and the rest of "
        f"every crop is padding (ignored in the loss). Lower crop_size to at most {fits}, "
        "or raise scale_range's top."
    )
