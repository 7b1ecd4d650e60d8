"""Versions section: every DeepLab version of ours, training and inference images/s, parameters, GFLOPs.

v1 (VGG-16 LargeFOV, ResNet-101), v2 (ASPP-L, + MSC), v3 (output stride 16 and 8), v3+ (ResNet-101,
Xception-65 separable, MobileNetV2), each with our recipes (no ablations), training at
``--versions-batch`` x 3 x ``--versions-size``² and inference of one image of that size, timed in
alternating rounds; on a GPU also the peak memory of a training step. A version that does not fit in
memory gets "out of memory" and the rest still run.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.contenders import NUM_CLASSES, VERSIONS, Model
from benchmarks.harness import Runner, gflops_per_image, interleaved_rates, log
from benchmarks.memory import step_memory_mib
from benchmarks.recipes import Recipe, infer_recipes, train_recipes
from benchmarks.runners import InferRunner, TrainRunner
from benchmarks.settings import Settings

HEADER = [
    "| version | params (M) | GFLOPs | train images/s | infer images/s | peak train step memory (MiB) |",
    "|---|---:|---:|---:|---:|---:|",
]


def _time_version(model: Model, train_recipe: Recipe, infer_recipe: Recipe, s: Settings, label: str) -> str:
    """Train and infer images/s and peak train step memory of one version, as row cells."""
    hw = (s.versions_size, s.versions_size)
    runners: dict[str, Runner] = {
        "train": TrainRunner(model, train_recipe, s.versions_batch, hw, s),
        "infer": InferRunner(model, infer_recipe, 1, hw, s),
    }
    rates = interleaved_rates(runners, 1, s.warmup, s.rounds, label)
    memory = "-"
    if s.cuda and s.memory:
        memory = f"{step_memory_mib(runners['train'], model, train_recipe, hw, s):.0f}"
    train, infer = statistics.median(rates["train"]), statistics.median(rates["infer"])
    return f"{train:.2f} | {infer:.2f} | {memory}"


def version_row(label: str, model: Model, train_recipe: Recipe, infer_recipe: Recipe, s: Settings) -> str:
    """One version's table row: parameters, GFLOPs, then its timings (or "out of memory")."""
    torch.manual_seed(0)
    params = sum(p.numel() for p in model.build().parameters()) / 1e6
    gflops = gflops_per_image(model.build, model.logits, (s.flops_size, s.flops_size))
    try:
        timings = _time_version(model, train_recipe, infer_recipe, s, label)
    except torch.OutOfMemoryError:
        timings = "out of memory | |"
    if s.cuda:
        torch.cuda.empty_cache()  # the runners are gone with _time_version's frame
    return f"| {label} | {params:.1f} | {gflops:.1f} | {timings} |"


def timing_note(s: Settings, train_recipe: Recipe, infer_recipe: Recipe) -> str:
    """What the rows of a versions-style table measure (sizes, recipes, rounds), as one sentence."""
    size = s.versions_size
    return (
        f"Training: batch {s.versions_batch} x 3 x {size} x {size} ({train_recipe.label}); inference: "
        f"batch 1 at the same size ({infer_recipe.label}); {s.rounds} alternating rounds after {s.warmup} "
        f"warm-up. GFLOPs: one {s.flops_size}x{s.flops_size} image's forward pass. {NUM_CLASSES} classes, "
        "random weights."
    )


def versions_section(s: Settings, versions: tuple[tuple[str, Model], ...] = VERSIONS) -> list[str]:
    """The table of every version in ``versions`` ((label, model) pairs); printed and returned as lines."""
    train_recipe = train_recipes(s, False)["ours"]
    infer_recipe = infer_recipes(s, False)["ours"]
    lines = ["### Every DeepLab version (ours)", "", timing_note(s, train_recipe, infer_recipe), "", *HEADER]
    for label, model in versions:
        log(f"[versions] {label}")
        lines.append(version_row(label, model, train_recipe, infer_recipe, s))
    print("\n".join(lines), flush=True)
    return [*lines, ""]
