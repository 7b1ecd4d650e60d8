"""Data section: images/s out of VOCDataModule's training loader, against the training step's rate.

The loader (default workers, the DeepLab augmentation: decode, random scale 0.5-2, pad, crop, flip,
normalise) reads a generated VOC-layout data set of photo-like 500x375 JPEGs, cycled so that one epoch
spans every timed batch. Two variants alternate in rounds, as the model tables do: normalised in the
workers (the default) and ``normalize_on_device`` (uint8 batches). The loaders run alone; the model's
rate comes from the training section, when it ran.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.contenders import NUM_CLASSES
from benchmarks.harness import log
from benchmarks.report import Target
from benchmarks.settings import Settings

#: Loader variants of the data section: row label -> ``normalize_on_device``.
LOADER_VARIANTS = {
    "data loader (normalised in the workers, default)": False,
    "data loader, normalize_on_device (uint8 batches; normalised after the transfer, not counted)": True,
}
#: Least loader / fastest training step ratio: the loader must not be what a step waits for.
GOAL = 3.0


def _write_pair(voc: Path, image_id: str, height: int, width: int, rng: np.random.Generator) -> int:
    """Write one photo-like JPEG and its palette mask; return the JPEG's size in bytes."""
    from deeplab_lit.data.voc import voc_palette

    coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    jpeg = voc / "JPEGImages" / f"{image_id}.jpg"
    Image.fromarray(pixels).save(jpeg, quality=90)
    labels = rng.choice([0, 0, 0, *rng.integers(1, NUM_CLASSES, 2)], (height // 25 + 1, width // 25 + 1))
    mask = Image.fromarray(labels.astype(np.uint8)).resize((width, height), Image.NEAREST)
    mask.putpalette(voc_palette().tobytes())
    mask.save(voc / "SegmentationClass" / f"{image_id}.png")
    return jpeg.stat().st_size


def make_fake_voc(root: Path, count: int, split_length: int | None = None, seed: int = 0) -> float:
    """Write a VOC 2012 layout of ``count`` photo-like 500x375 JPEGs (every 4th 375x500) with palette masks.

    Images are smooth random fields plus noise, so their JPEGs have realistic sizes (noise alone would
    compress far worse and decode slower than photographs). The train split cycles through them up to
    ``split_length`` entries, so that one epoch covers every timed batch: epoch ends drain the workers'
    queues, which a real epoch (VOC train_aug: 10,582 images) does once in 1,300 batches, not every few
    dozen. Returns the mean JPEG size in KiB.
    """
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2012_{i:06d}" for i in range(count)]
    sizes = [
        _write_pair(voc, image_id, *((500, 375) if index % 4 == 3 else (375, 500)), rng)
        for index, image_id in enumerate(ids)
    ]
    splits = voc / "ImageSets" / "Segmentation"
    train = [ids[i % count] for i in range(max(count, split_length or 0))]
    (splits / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (splits / "val.txt").write_text("".join(f"{i}\n" for i in ids[:2]))
    return statistics.mean(sizes) / 1024


def _loaders(folder: str, s: Settings) -> dict[str, DataLoader]:
    """One training loader per variant of :data:`LOADER_VARIANTS` on the data set in ``folder``."""
    from deeplab_lit.data.datamodules import VOCDataModule

    loaders = {}
    for label, on_device in LOADER_VARIANTS.items():
        datamodule = VOCDataModule(
            folder, train_split="train", batch_size=s.train_batch, crop_size=s.train_size,
            normalize_on_device=on_device,
        )  # fmt: skip
        datamodule.setup("fit")
        loaders[label] = datamodule.train_dataloader()
    return loaders


def _next_batch(iterators: dict[str, Iterator], loaders: dict[str, DataLoader], label: str) -> None:
    """Take one batch from ``label``'s loader, starting a new epoch when one ends."""
    try:
        next(iterators[label])
    except StopIteration:
        iterators[label] = iter(loaders[label])
        next(iterators[label])


def time_loaders(loaders: dict[str, DataLoader], s: Settings) -> dict[str, list[float]]:
    """Images/s of each loader per round, in alternating order, after each has given its first batch."""
    iterators = {label: iter(loader) for label, loader in loaders.items()}
    for iterator in iterators.values():
        next(iterator)  # workers started, first batch out
    rates: dict[str, list[float]] = {label: [] for label in loaders}
    for index in range(s.rounds):
        for label in list(loaders) if index % 2 == 0 else list(loaders)[::-1]:
            start = time.perf_counter()
            for _ in range(s.data_batches):
                _next_batch(iterators, loaders, label)
            rates[label].append(s.data_batches * s.train_batch / (time.perf_counter() - start))
        log(f"  data round {index + 1}/{s.rounds}: " + ", ".join(f"{r[-1]:.1f}" for r in rates.values()))
    return rates


def data_section(s: Settings, step_rates: dict[str, float], targets: list[Target]) -> list[str]:
    """Time the loader variants; compare the default with ``step_rates`` (ours' training images/s by pair).

    Appends a target (loader / fastest step) when there are step rates; returns the markdown lines.
    """
    with tempfile.TemporaryDirectory(prefix="speed-voc-") as folder:
        log(f"[data] writing {s.data_images} fake VOC images ...")
        timed_images = (s.rounds + 1) * s.data_batches * s.train_batch
        kib = make_fake_voc(Path(folder), s.data_images, split_length=timed_images + s.train_batch)
        loaders = _loaders(folder, s)
        rates = time_loaders(loaders, s)
        some_loader = next(iter(loaders.values()))
        workers, pinned = some_loader.num_workers, some_loader.pin_memory
        del loaders, some_loader  # workers stopped before the folder goes
    rate = statistics.median(rates[next(iter(LOADER_VARIANTS))])
    lines = [
        "### Data pipeline",
        "",
        f"VOCDataModule training loader on {s.data_images} generated VOC-layout JPEGs (500x375 and 375x500, "
        f"mean {kib:.0f} KiB; one epoch spans every timed batch; decode, random scale 0.5-2, pad, "
        f"crop {s.train_size}, flip, normalise), "
        f"batch {s.train_batch}, default workers ({workers}), pin_memory={pinned}; {s.rounds} alternating "
        f"rounds of {s.data_batches} batches after the first. The loaders run alone here; the model's rate "
        "is from the training tables above.",
        "",
        "| | images/s | loader / step |",
        "|---|---:|---:|",
    ]
    for label, values in rates.items():
        median = statistics.median(values)
        lines.append(f"| {label} | {median:.1f} (range {min(values):.1f}-{max(values):.1f}) | |")
    for name, step_rate in step_rates.items():
        lines.append(f"| training step, {name} | {step_rate:.2f} | {rate / step_rate:.1f}x |")
    if step_rates:
        fastest = max(step_rates, key=step_rates.get)
        targets.append(
            Target("data loading vs the faster training step", rate / step_rates[fastest], GOAL, fastest)
        )
    print("\n".join(lines), flush=True)
    return [*lines, ""]
