"""Inference section: images/s of whole-image inference, for each pair at each ``--infer-size``.

VOC's size (500x375; the smp pair padded to 512x384) and, on a GPU, Cityscapes' (2048x1024), batch
``--infer-batch``. Ours folds BatchNorm into the convolutions and runs under ``torch.inference_mode``.
"""

from __future__ import annotations

from benchmarks.contenders import PAIRS, Pair
from benchmarks.report import Target
from benchmarks.sections.pairs import pair_table
from benchmarks.settings import Settings

#: Least ours / theirs ratio per pair, (CPU, GPU); pairs not listed: :data:`DEFAULT_GOAL`.
GOALS = {"v3": (1.5, 2.0)}
DEFAULT_GOAL = 1.5


def infer_section(s: Settings, targets: list[Target], pairs: tuple[Pair, ...] = PAIRS) -> list[str]:
    """Time every pair's inference at every size; append their targets; return the markdown lines."""
    lines: list[str] = []
    for hw in s.infer_sizes:
        for pair in pairs:
            goal = GOALS.get(pair.name, (DEFAULT_GOAL, DEFAULT_GOAL))[s.cuda]
            lines += pair_table("infer", pair, pair.image(hw), goal, s, targets).markdown()
    return lines
