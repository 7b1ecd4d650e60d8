"""Time the data preflight on a VOC-sized data set: the first run (nothing cached) and the next (cached).

    python benchmarks/preflight_speed.py                      # 10,582 train + 1,449 val pairs, 2 workers
    python benchmarks/preflight_speed.py --train 500 --val 100 --workers 4 --root /tmp/pf

Writes VOC-layout pairs (random 500x375 RGB JPEGs at quality 90 - random pixels are the costliest
JPEGs to decode - and palette PNG masks with a few rectangles and a void line) under ``--root`` (a new
temporary folder by default; an existing one with the same counts is reused), then runs
:func:`deeplab_lit.data.preflight.check_splits` on ``train`` + ``val`` twice with an empty cache folder
of its own: the cold figure is what the first run on a data set pays, the warm one every later run.
The files stay in the page cache after writing, so "cold" means "not cached by the preflight", not
"read from disk". Wall-clock and CPU seconds (this process and the workers) are printed with the load
average, since other jobs on the machine slow the figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deeplab_lit.data.preflight import check_splits
from deeplab_lit.data.voc import VOC_SUBDIR, voc_palette, voc_split


def write_pairs(root: Path, train: int, val: int, seed: int = 0) -> None:
    """Write ``train + val`` JPEG/PNG pairs and the two split files in the VOC layout under ``root``."""
    voc = root / VOC_SUBDIR
    splits = voc / "ImageSets" / "Segmentation"
    if (splits / "val.txt").is_file() and len((splits / "train.txt").read_text().split()) == train:
        if len((splits / "val.txt").read_text().split()) == val:
            return
    for folder in (voc / "JPEGImages", voc / "SegmentationClass", splits):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = voc_palette().tobytes()
    ids = [f"{2000 + i // 100000}_{i % 100000:06d}" for i in range(train + val)]
    for image_id in ids:
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        mask = np.zeros((375, 500), np.uint8)
        for value in rng.integers(1, 21, 3):
            y, x = rng.integers(0, 250), rng.integers(0, 350)
            mask[y : y + 120, x : x + 150] = value
        mask[187, :] = 255
        image = Image.fromarray(mask, mode="P")
        image.putpalette(palette)
        image.save(voc / "SegmentationClass" / f"{image_id}.png")
    (splits / "train.txt").write_text("".join(f"{i}\n" for i in ids[:train]))
    (splits / "val.txt").write_text("".join(f"{i}\n" for i in ids[train:]))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=None, help="data folder (default: a new temp folder)")
    parser.add_argument("--train", type=int, default=10582, help="training pairs (VOC train_aug: 10,582)")
    parser.add_argument("--val", type=int, default=1449, help="validation pairs (VOC val: 1,449)")
    parser.add_argument("--workers", type=int, default=2, help="preflight worker processes")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="preflight-voc-"))
    start = time.perf_counter()
    write_pairs(root, args.train, args.val)
    print(
        f"data: {args.train} + {args.val} pairs under {root} "
        f"(written or reused in {time.perf_counter() - start:.0f} s)"
    )
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="preflight-cache-")
    splits = {"train": voc_split(root, "train"), "val": voc_split(root, "val")}
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}), workers: {args.workers}")
    for run in ("cold (nothing cached)", "warm (cached)"):
        wall, cpu = time.perf_counter(), cpu_seconds()
        check_splits(splits, args.workers)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        pairs = args.train + args.val
        print(f"{run}: {wall:.2f} s wall, {cpu:.1f} CPU s, {pairs / wall:.0f} pairs/s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
