"""Training section: images/s of forward + backward + SGD step (momentum 0.9), and peak step memory.

Our DeepLabV3 (ResNet-50, output stride 8, rates 12/24/36, aux head) against torchvision's
``deeplabv3_resnet50(aux_loss=True)``, and our DeepLabV3+ (ResNet-50, output stride 16) against smp's
``DeepLabV3Plus``, on square crops of ``--train-size`` (the smp pair: the multiple of 16 below it).
The same loss for all: cross-entropy ignoring 255, + 0.5 x the auxiliary head's where there is one.
"""

from __future__ import annotations

from benchmarks.contenders import PAIRS, Pair
from benchmarks.report import Target
from benchmarks.sections.pairs import pair_table
from benchmarks.settings import Settings

#: Least ours / theirs ratio per pair, (CPU, GPU); pairs not listed: :data:`DEFAULT_GOAL`.
GOALS = {"v3": (1.0, 1.3)}
DEFAULT_GOAL = 1.5


def train_section(
    s: Settings, targets: list[Target], pairs: tuple[Pair, ...] = PAIRS
) -> tuple[list[str], dict[str, float]]:
    """Time every pair's training step; append their targets.

    Returns:
        The section's markdown lines, and our training-step images/s per pair ("ours v3": rate), which
        the data section compares the loader with.
    """
    lines: list[str] = []
    step_rates: dict[str, float] = {}
    for pair in pairs:
        size = pair.crop(s.train_size)
        goal = GOALS.get(pair.name, (DEFAULT_GOAL, DEFAULT_GOAL))[s.cuda]
        table = pair_table("train", pair, (size, size), goal, s, targets)
        lines += table.markdown()
        step_rates[f"ours {pair.name}"] = table.row("ours").median
    return lines, step_rates
