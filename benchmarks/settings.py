"""Settings of one speed-suite run: sizes, counts and switches, and the defaults of each device.

The CPU defaults keep the work small (one ResNet-50 output-stride-8 training step at 2x321x321 is about
0.9 TFLOP, tens of seconds on a few cores); the GPU defaults are the figures' sizes (8x3x513x513, AMP);
``--quick`` sizes only check that the suite runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SECTIONS = ("train", "infer", "data", "versions", "backbones")


@dataclass
class Settings:
    """Everything a section needs to know about the run (the command line's options, resolved)."""

    device: str
    quick: bool
    train_batch: int
    train_size: int  # square crop of the torchvision pair; the smp pair uses the multiple of 16 below
    infer_sizes: list[tuple[int, int]]  # (height, width) of whole images
    infer_batch: int
    warmup: int
    rounds: int
    train_iters: int
    infer_iters: int
    data_images: int
    data_batches: int
    versions_batch: int
    versions_size: int
    flops_size: int
    learn_steps: int  # backbones section: training steps of the learning comparison (0: none)
    amp_dtype: str
    memory: bool
    ablations: bool
    threads: int
    profile: bool = False
    compile: str | None = None
    sections: tuple[str, ...] = SECTIONS
    out: Path = Path("BENCHMARKS.md")

    @property
    def cuda(self) -> bool:
        """Whether the run is on a GPU (then AMP, CUDA memory and CUDA profiles)."""
        return self.device == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The mixed-precision dtype of AMP recipes on a GPU; None on a CPU (AMP recipes run fp32)."""
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}[self.amp_dtype] if self.cuda else None


def default_settings(device: str, quick: bool) -> dict:
    """Sizes and counts for ``device`` ("cpu" or "cuda"), or the tiny ones of ``--quick``."""
    if quick:
        return dict(train_batch=2, train_size=65, infer_sizes=[(49, 65)], infer_batch=1, warmup=1, rounds=2,
                    train_iters=1, infer_iters=1, data_images=8, data_batches=4, versions_batch=1,
                    versions_size=65, flops_size=129, learn_steps=2)  # fmt: skip
    if device == "cuda":
        return dict(train_batch=8, train_size=513, infer_sizes=[(375, 500), (1024, 2048)], infer_batch=1,
                    warmup=3, rounds=5, train_iters=10, infer_iters=10, data_images=200, data_batches=60,
                    versions_batch=8, versions_size=513, flops_size=513, learn_steps=1050)  # fmt: skip
    return dict(train_batch=2, train_size=321, infer_sizes=[(375, 500)], infer_batch=1, warmup=1, rounds=3,
                train_iters=1, infer_iters=1, data_images=48, data_batches=24, versions_batch=2,
                versions_size=161, flops_size=513, learn_steps=300)  # fmt: skip
