"""Backbones section: every DeepLab head on five encoder families at output stride 16, speed and learning.

For ResNet-50, ConvNeXt-T, EfficientNet-B0, RegNetY-1.6GF (timm encoders, ``timm:<name>``) and
MobileNetV3-Large (torchvision's), each under the v1 (1x1 classifier), v2 (ASPP-L), v3 (ASPP + image
pooling; multi-grid (1, 2, 4) on the ResNet) and v3+ heads: parameters, GFLOPs of one ``--flops-size``
image, training and inference images/s as in the versions section (same sizes, recipes and rounds). Then,
with ``--learn-steps`` > 0, how each encoder learns under the v3+ head at the quickstart's recipe from
random initialisation (:mod:`benchmarks.learning`): one seed, validation mIoU after that many steps.
The section writes its own block of BENCHMARKS.md, so running it alone keeps the other tables.
"""

from __future__ import annotations

from benchmarks.contenders import Model, ours
from benchmarks.harness import log
from benchmarks.learning import learn
from benchmarks.recipes import infer_recipes, train_recipes
from benchmarks.sections.versions import timing_note, version_row
from benchmarks.settings import Settings
from deeplab_lit import DeepLabV3Plus
from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus

#: (label, backbone option) of each encoder family.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("ResNet-50", "resnet50"),
    ("ConvNeXt-T", "timm:convnext_tiny"),
    ("EfficientNet-B0", "timm:efficientnet_b0"),
    ("RegNetY-1.6GF", "timm:regnety_016"),
    ("MobileNetV3-L", "mobilenet_v3_large"),
)


def head_models(backbone: str) -> tuple[tuple[str, Model], ...]:
    """The four heads on ``backbone`` at output stride 16, labelled by version."""
    grid = (1, 2, 4) if backbone.startswith("resnet") else None
    return (
        ("v1", ours(deeplab_v1, backbone=backbone, output_stride=16)),
        ("v2", ours(deeplab_v2, backbone=backbone, output_stride=16)),
        ("v3", ours(deeplab_v3, backbone=backbone, output_stride=16, multi_grid=grid)),
        ("v3+", ours(deeplab_v3plus, backbone=backbone, output_stride=16)),
    )


def backbones_section(
    s: Settings, families: tuple[tuple[str, str], ...] = FAMILIES, root: str = "data/synthetic"
) -> list[str]:
    """The table of every head on every family, then the learning comparison (data set under ``root``)."""
    train_recipe = train_recipes(s, False)["ours"]
    infer_recipe = infer_recipes(s, False)["ours"]
    lines = [
        "### Every head on five backbones (output stride 16)",
        "",
        timing_note(s, train_recipe, infer_recipe),
        "",
        "| backbone | head | params (M) | GFLOPs | train images/s | infer images/s | "
        "peak train step memory (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for family, backbone in families:
        for head, model in head_models(backbone):
            log(f"[backbones] {family} {head}")
            row = version_row(f"{family} | {head}", model, train_recipe, infer_recipe, s)
            lines.append(row)
            print(row, flush=True)
    if s.learn_steps > 0:
        lines += ["", *learning_table(s, families, root)]
    print("\n".join(lines), flush=True)
    return [*lines, ""]


def learning_table(s: Settings, families: tuple[tuple[str, str], ...], root: str) -> list[str]:
    """How each family learns under the v3+ head at the quickstart's recipe (one seed, ``learn_steps``)."""
    lines = [
        f"Learning: DeepLab v3+ (64-channel ASPP and decoder) on each backbone, the quickstart's recipe "
        f"(`experiments/quickstart.yaml`: synthetic data, 64 px, batch 16, SGD lr 0.05, poly) for "
        f"{s.learn_steps} steps from random initialisation, seed 0 (one seed: differences of a few points "
        "are within the seed-to-seed spread), validation mIoU on the 80 validation images.",
        "",
        "| backbone | val mIoU | s / step | params (M) |",
        "|---|---:|---:|---:|",
    ]
    for family, backbone in families:
        log(f"[backbones] learning {family}")
        options = {"backbone": backbone, "multi_grid": None, "output_stride": 16}
        accelerator = "gpu" if s.cuda else "cpu"
        result = learn(DeepLabV3Plus, options, steps=s.learn_steps, root=root, accelerator=accelerator)
        millions = result.parameters / 1e6
        row = f"| {family} | {result.miou:.3f} | {result.seconds_per_step:.3f} | {millions:.1f} |"
        lines.append(row)
        print(row, flush=True)
    return lines
