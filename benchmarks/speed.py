"""Speed suite: our DeepLab against torchvision and segmentation_models_pytorch, side by side in one process.

    python benchmarks/speed.py --device cpu                  # CPU settings (see README for the time it takes)
    python benchmarks/speed.py --device cuda                 # GPU settings: 8x3x513x513 training, AMP
    python benchmarks/speed.py --device cpu --quick          # tiny sizes: checks that it runs; no figures
    python benchmarks/speed.py --sections train infer        # a subset of: train, infer, data, versions

Sections:

- train: images/s of forward + backward + SGD step (momentum 0.9) and peak memory, for our DeepLabV3
  (ResNet-50, output stride 8, rates 12/24/36, aux head) against torchvision's ``deeplabv3_resnet50``, and
  our DeepLabV3+ (ResNet-50, output stride 16) against smp's ``DeepLabV3Plus``. The same loss for all
  (cross-entropy ignoring 255, + 0.5 x the aux head's where there is one). smp needs sizes divisible by
  16, so its pair runs at 320/512 instead of 321/513.
- infer: images/s of whole-image inference at VOC size (500x375; the smp pair at 512x384) and, on a GPU,
  Cityscapes size (2048x1024).
- data: images/s out of VOCDataModule's training loader (default workers, DeepLab augmentation) on a
  generated VOC-layout data set of 500x375 JPEGs, against the training step's rate.
- versions: every DeepLab version's training and inference rate, parameters and FLOPs.

Recipes. "ours" is what our module does: channels-last weights, fused SGD, and on a GPU mixed precision;
for inference BatchNorm folded into the convolutions and ``torch.inference_mode``. "plain" is the other
library as a user runs it out of the box (fp32, default SGD, ``torch.no_grad``); on a GPU "+AMP" adds
mixed precision, and "+same tricks" gives it every trick ours has. Rows "ours, no X" switch one trick
off, to show what each is worth.

Method. All contenders of a table are built first, warmed up, then timed in alternating rounds (A B C,
C B A, ...) so that the machine's drift cancels; the median over rounds is reported, with the range.
CUDA timings synchronise before and after. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
during one step above what was allocated before it (activations, gradients, workspace); on the CPU, in
a fresh process per contender, the growth of the peak resident set size (VmHWM, reset after building
the model and batch) over the RSS at that point, during two steps. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add, convolutions and matrix products).

Results are printed and written between markers into ``--out`` (BENCHMARKS.md), other content kept.
A target that is missed gets a ``torch.profiler`` table of the steps involved.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.segmentation import deeplabv3_resnet50

from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus
from deeplab_lit.models.fusion import count_batchnorms, fuse_conv_bn
from deeplab_lit.modules.base import COMPILE_MODES, compile_in_place, compile_mode, fast_sgd_options

CL = torch.channels_last
NUM_CLASSES = 21
BEGIN, END = "<!-- speed.py: begin -->", "<!-- speed.py: end -->"
SECTIONS = ("train", "infer", "data", "versions")
_START = time.perf_counter()


def log(message: str) -> None:
    """Progress line with the seconds since the start."""
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", flush=True)


# ----------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
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
    amp_dtype: str
    memory: bool
    ablations: bool
    threads: int
    profile: bool = False
    compile: str | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}[self.amp_dtype] if self.cuda else None


def default_settings(device: str, quick: bool) -> dict:
    if quick:
        return dict(train_batch=2, train_size=65, infer_sizes=[(49, 65)], infer_batch=1, warmup=1, rounds=2,
                    train_iters=1, infer_iters=1, data_images=8, data_batches=4, versions_batch=1,
                    versions_size=65, flops_size=129)  # fmt: skip
    if device == "cuda":
        return dict(train_batch=8, train_size=513, infer_sizes=[(375, 500), (1024, 2048)], infer_batch=1,
                    warmup=3, rounds=5, train_iters=10, infer_iters=10, data_images=200, data_batches=60,
                    versions_batch=8, versions_size=513, flops_size=513)  # fmt: skip
    return dict(train_batch=2, train_size=321, infer_sizes=[(375, 500)], infer_batch=1, warmup=1, rounds=3,
                train_iters=1, infer_iters=1, data_images=48, data_batches=24, versions_batch=2,
                versions_size=161, flops_size=513)  # fmt: skip


def smp_size(size: int) -> int:
    """The multiple of 16 smp accepts nearest below ``size`` (321 -> 320, 513 -> 512, 375 -> 368)."""
    return max(16, size // 16 * 16)


def smp_hw(hw: tuple[int, int]) -> tuple[int, int]:
    """VOC's 375x500 becomes 384x512 for smp (rounded up: the image is padded, as a user would)."""
    return tuple(-(-s // 16) * 16 for s in hw)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ models
def _smp_deeplabv3plus() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus(
        encoder_name="resnet50", encoder_weights=None, encoder_output_stride=16, classes=NUM_CLASSES
    )


#: key -> (builder, library). Ours: ``forward_train`` / ``forward``; torchvision: dict outputs; smp: logits.
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "ours-v3": (
        lambda: deeplab_v3(
            num_classes=NUM_CLASSES,
            backbone="resnet50",
            output_stride=8,
            atrous_rates=(12, 24, 36),
            multi_grid=None,
            aux_head=True,
        ),
        "ours",
    ),  # fmt: skip
    "torchvision-v3": (
        lambda: deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
        ),
        "torchvision",
    ),
    "ours-v3plus": (
        lambda: deeplab_v3plus(num_classes=NUM_CLASSES, backbone="resnet50", output_stride=16),
        "ours",
    ),
    "ours-v3plus-separable": (
        lambda: deeplab_v3plus(
            num_classes=NUM_CLASSES, backbone="resnet50", output_stride=16, separable=True
        ),
        "ours",
    ),
    "smp-v3plus": (_smp_deeplabv3plus, "smp"),
}

#: Every DeepLab version: (label, builder), for the versions table.
VERSIONS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("v1 VGG-16 LargeFOV", lambda: deeplab_v1(num_classes=NUM_CLASSES)),
    ("v1 ResNet-101", lambda: deeplab_v1(num_classes=NUM_CLASSES, backbone="resnet101")),
    ("v2 ResNet-101 ASPP-L", lambda: deeplab_v2(num_classes=NUM_CLASSES)),
    ("v2 ResNet-101 ASPP-L + MSC", lambda: deeplab_v2(num_classes=NUM_CLASSES, msc_scales=(1.0, 0.75, 0.5))),
    ("v3 ResNet-101 MG OS16", lambda: deeplab_v3(num_classes=NUM_CLASSES, output_stride=16)),
    ("v3 ResNet-101 MG OS8", lambda: deeplab_v3(num_classes=NUM_CLASSES, output_stride=8)),
    ("v3+ ResNet-101 OS16", lambda: deeplab_v3plus(num_classes=NUM_CLASSES)),
    ("v3+ Xception-65 OS16 sep.",
     lambda: deeplab_v3plus(num_classes=NUM_CLASSES, backbone="xception65", separable=True)),
    ("v3+ MobileNetV2 OS16", lambda: deeplab_v3plus(num_classes=NUM_CLASSES, backbone="mobilenet_v2")),
]  # fmt: skip


def forward_train(model: nn.Module, library: str, images: Tensor) -> dict[str, Tensor]:
    if library == "ours":
        return model.forward_train(images)
    if library == "torchvision":
        return dict(model(images))
    return {"out": model(images)}


def forward_infer(model: nn.Module, library: str, images: Tensor) -> Tensor:
    out = model(images)
    return out["out"] if library == "torchvision" else out


def segmentation_loss(outputs: dict[str, Tensor], masks: Tensor) -> Tensor:
    """Cross-entropy ignoring 255 on every output, auxiliary outputs at weight 0.5 (torchvision's recipe)."""
    total = masks.new_zeros((), dtype=torch.float32)
    for name, logits in outputs.items():
        weight = 0.5 if name.startswith("aux") else 1.0
        total = total + weight * F.cross_entropy(logits.float(), masks, ignore_index=255)
    return total


# ----------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    label: str
    channels_last: bool = False
    amp: bool = False
    fast_sgd: bool = False
    fold_bn: bool = False
    inference_mode: bool = False
    drop_aux: bool = False  # inference: do not compute torchvision's aux head (ours never does)
    compile: str | None = None  # ours only: torch.compile mode of the module's `compile` option


def _recipe_table(
    s: Settings,
    ours: Recipe,
    plain_label: str,
    tricks_label: str,
    without: dict[str, Recipe],
    ablations: bool,
) -> dict[str, Recipe]:
    """Contenders of one table: ours, the reference plain (+AMP on CUDA), with our tricks, and ablations."""
    recipes = {"ours": ours, "plain": Recipe(plain_label)}
    if s.cuda:
        recipes["amp"] = Recipe("+AMP", amp=True)
    recipes["tricks"] = replace(ours, label=tricks_label)
    if s.compile:
        recipes["ours-compiled"] = replace(ours, label=f"ours + compile: {s.compile}", compile=s.compile)
    return {**recipes, **without} if ablations else recipes


def train_recipes(s: Settings, ablations: bool) -> dict[str, Recipe]:
    loss_scaling = s.cuda and s.amp_dtype == "float16"  # then foreach, not fused (see fast_sgd_options)
    step = "foreach SGD" if loss_scaling else "fused SGD"
    ours = Recipe(f"ours: channels-last, {step}" + (", AMP" if s.cuda else ""), True, s.cuda, True)
    without = {
        "ours-no-cl": replace(ours, label="ours, no channels-last", channels_last=False),
        "ours-no-fused": replace(ours, label="ours, default SGD", fast_sgd=False),
    }
    return _recipe_table(s, ours, "plain (fp32, default SGD)", "+same tricks as ours", without, ablations)


def infer_recipes(s: Settings, ablations: bool) -> dict[str, Recipe]:
    ours = Recipe(
        "ours: BN folded, channels-last, inference_mode" + (", AMP" if s.cuda else ""),
        channels_last=True, amp=s.cuda, fold_bn=True, inference_mode=True, drop_aux=True,
    )  # fmt: skip
    without = {
        "ours-no-fold": replace(ours, label="ours, BN not folded", fold_bn=False),
        "ours-no-cl": replace(ours, label="ours, no channels-last", channels_last=False),
    }
    return _recipe_table(
        s, ours, "plain (fp32, no_grad)", "+same tricks as ours (aux head off)", without, ablations
    )


# ----------------------------------------------------------------------------------------- runners
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_masks(batch: int, height: int, width: int, device: str) -> Tensor:
    masks = torch.randint(0, NUM_CLASSES, (batch, height, width), device=device)
    masks[:, ::9] = 255  # some void rows, as VOC's outlines
    return masks


def apply_layout_and_compile(model: nn.Module, recipe: Recipe) -> None:
    """Channels-last weights and ``torch.compile`` in place, as the module's options do (in that order)."""
    if recipe.channels_last:
        model.to(memory_format=CL)
    if recipe.compile:
        compile_in_place(model, compile_mode(recipe.compile))


class Runner:
    """One contender: a model, its input and a ``step``; ``run(n)`` times n steps in seconds."""

    batch: int
    device: str

    def step(self) -> None:
        raise NotImplementedError

    def run(self, iterations: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(iterations):
            self.step()
        synchronize(self.device)
        return time.perf_counter() - start


class TrainRunner(Runner):
    def __init__(
        self, model: nn.Module, library: str, recipe: Recipe, batch: int, hw: tuple[int, int], s: Settings
    ):
        self.device, self.batch, self.library = s.device, batch, library
        self.model = model.to(s.device).train()
        apply_layout_and_compile(self.model, recipe)
        self.images = torch.randn(batch, 3, *hw, device=s.device)
        self.masks = random_masks(batch, *hw, s.device)
        self.dtype = s.autocast_dtype if recipe.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        # as the module: no fused step under fp16 loss scaling (see fast_sgd_options)
        options = fast_sgd_options(params, fused_allowed=self.scaler is None) if recipe.fast_sgd else {}
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4, **options)

    def step(self) -> None:
        context = torch.autocast(self.device, self.dtype) if self.dtype else contextlib.nullcontext()
        with context:
            loss = segmentation_loss(forward_train(self.model, self.library, self.images), self.masks)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


class InferRunner(Runner):
    def __init__(
        self, model: nn.Module, library: str, recipe: Recipe, batch: int, hw: tuple[int, int], s: Settings
    ):
        self.device, self.batch, self.library, self.recipe = s.device, batch, library, recipe
        model = model.to(s.device).eval()
        if recipe.drop_aux and getattr(model, "aux_classifier", None) is not None:
            model.aux_classifier = None
        self.model = fuse_conv_bn(model) if recipe.fold_bn else model
        self.batchnorms_left = count_batchnorms(self.model)
        apply_layout_and_compile(self.model, recipe)
        self.images = torch.randn(batch, 3, *hw, device=s.device)
        self.dtype = s.autocast_dtype if recipe.amp else None

    def step(self) -> None:
        grad = torch.inference_mode() if self.recipe.inference_mode else torch.no_grad()
        context = torch.autocast(self.device, self.dtype) if self.dtype else contextlib.nullcontext()
        with grad, context:
            forward_infer(self.model, self.library, self.images)


def make_runner(kind: str, key: str, recipe: Recipe, batch: int, hw: tuple[int, int], s: Settings) -> Runner:
    torch.manual_seed(0)
    builder, library = MODELS[key]
    runner_class = TrainRunner if kind == "train" else InferRunner
    return runner_class(builder(), library, recipe, batch, hw, s)


def alternate(runners: dict[str, Runner], iterations: int, s: Settings, title: str) -> dict[str, list[float]]:
    """Warm every runner up, then time them in alternating order; images/s per round."""
    for runner in runners.values():
        for _ in range(s.warmup):
            runner.run(1)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for index in range(s.rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            runner = runners[name]
            rates[name].append(iterations * runner.batch / runner.run(iterations))
        summary = ", ".join(f"{n} {r[-1]:.2f}" for n, r in rates.items())
        log(f"  {title} round {index + 1}/{s.rounds} (img/s): {summary}")
    return rates


# ------------------------------------------------------------------------------------------ memory
def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_memory_probe(key: str, recipe: Recipe, batch: int, hw: tuple[int, int], settings: dict) -> float:
    """In a fresh process: peak RSS growth (MiB) during two training steps over the RSS after building.

    The kernel's peak-RSS mark (VmHWM) is reset after building (``/proc/self/clear_refs``, Linux >= 4.0),
    so the peak is the steps' own, not the imports' or the model construction's.
    """
    s = Settings(**settings)
    torch.set_num_threads(s.threads)
    runner = make_runner("train", key, recipe, batch, hw, s)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    before = _proc_status_mib("VmRSS")
    runner.run(2)
    return _proc_status_mib("VmHWM") - before


def step_memory_mib(
    runner: Runner, key: str, recipe: Recipe, hw: tuple[int, int], s: Settings
) -> float | None:
    if not s.memory:
        return None
    if s.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.run(1)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        return None  # not Linux: no resettable peak-RSS mark
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_cpu_memory_probe, key, recipe, runner.batch, hw, asdict(s)).result()


# ----------------------------------------------------------------------------------------- results
@dataclass
class Row:
    name: str
    recipe: str
    rates: list[float]
    memory_mib: float | None = None
    gflops: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> str:
        return f"{min(self.rates):.2f}-{max(self.rates):.2f}"


@dataclass
class Table:
    title: str
    setting: str
    rows: list[Row]
    reference: str = "ours"  # ratios are ours / row
    extra_columns: dict[str, list[str]] = field(default_factory=dict)

    def ratio(self, name: str) -> float:
        ours = next(r for r in self.rows if r.name == self.reference)
        return ours.median / next(r for r in self.rows if r.name == name).median

    def markdown(self) -> list[str]:
        lines = [f"### {self.title}", "", self.setting, ""]
        lines += [
            "| model | recipe | images/s (median) | range | ours / this | peak step memory (MiB) | GFLOPs |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        ours = next(r for r in self.rows if r.name == self.reference).median
        for row in self.rows:
            memory = f"{row.memory_mib:.0f}" if row.memory_mib is not None else "-"
            gflops = f"{row.gflops:.1f}" if row.gflops is not None else "-"
            note = f" ({row.note})" if row.note else ""
            lines.append(
                f"| {row.name} | {row.recipe}{note} | {row.median:.2f} | {row.spread} "
                f"| {ours / row.median:.2f}x | {memory} | {gflops} |"
            )
        return [*lines, ""]


def gflops_per_image(
    builder: Callable[[], nn.Module], library: str, hw: tuple[int, int], train: bool
) -> float:
    """Forward GFLOPs for one image (FlopCounterMode on the meta device: nothing is computed)."""
    with torch.device("meta"):
        model = builder()
    model.eval()  # BatchNorm in eval mode; ``train`` picks forward_train (with aux heads) or forward
    images = torch.empty(1, 3, *hw, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        forward_train(model, library, images) if train else forward_infer(model, library, images)
    return counter.get_total_flops() / 1e9


def profile_runner(runner: Runner, s: Settings, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.cuda else [])
    runner.run(1)
    with profile(activities=activities) as prof:
        runner.run(1)
    sort = "self_device_time_total" if s.cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


# ---------------------------------------------------------------------------------------- sections
@dataclass
class Target:
    what: str
    ratio: float | None
    goal: float
    versus: str
    profiles: list[tuple[str, str]] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        return None if self.ratio is None else self.ratio >= self.goal


def pair_section(kind: str, pair: str, s: Settings, hw: tuple[int, int], targets: list[Target]) -> Table:
    """Time one pair (v3 vs torchvision, or v3+ vs smp) under every recipe, alternating."""
    ours_key, other_key = ("ours-v3", "torchvision-v3") if pair == "v3" else ("ours-v3plus", "smp-v3plus")
    other = "torchvision" if pair == "v3" else "smp"
    batch = s.train_batch if kind == "train" else s.infer_batch
    recipes = (train_recipes if kind == "train" else infer_recipes)(s, s.ablations and pair == "v3")
    plan: list[tuple[str, str, Recipe]] = []  # (row name, model key, recipe)
    for name, recipe in recipes.items():
        if name == "ours" or name.startswith("ours-"):
            plan.append((name, ours_key, recipe))
        else:
            plan.append((f"{other} {name}", other_key, recipe))
    if pair == "v3plus":
        plan.insert(1, ("ours separable", "ours-v3plus-separable", recipes["ours"]))
    log(f"[{kind} {pair}] {batch}x3x{hw[0]}x{hw[1]} on {s.device}: building {len(plan)} contenders")
    runners = {name: make_runner(kind, key, recipe, batch, hw, s) for name, key, recipe in plan}
    log("  built; warming up")
    iterations = s.train_iters if kind == "train" else s.infer_iters
    rates = alternate(runners, iterations, s, f"{kind} {pair}")
    rows = []
    for name, key, recipe in plan:
        measured = kind == "train" and not name.startswith("ours-")  # ablation rows: speed only
        if measured and s.memory:
            log(f"  peak memory of {name} ...")
        memory = step_memory_mib(runners[name], key, recipe, hw, s) if measured else None
        builder, library = MODELS[key]
        gflops = gflops_per_image(builder, library, hw, train=kind == "train")
        runner = runners[name]
        note = (
            f"{runner.batchnorms_left} BN left" if isinstance(runner, InferRunner) and recipe.fold_bn else ""
        )
        rows.append(Row(name, recipe.label, rates[name], memory, gflops, note))
    model_names = {
        "v3": "our DeepLabV3 (ResNet-50, OS 8, aux head) vs torchvision deeplabv3_resnet50 (aux_loss=True)",
        "v3plus": "our DeepLabV3+ (ResNet-50, OS 16) vs smp DeepLabV3Plus (resnet50, output stride 16)",
    }
    what = "training step (forward + backward + SGD)" if kind == "train" else "inference"
    table = Table(
        f"{'Training' if kind == 'train' else 'Inference'}: {model_names[pair]}",
        f"{what}, batch {batch} x 3 x {hw[0]} x {hw[1]}, {NUM_CLASSES} classes, {s.rounds} alternating "
        f"rounds of {iterations} step(s) after {s.warmup} warm-up step(s); GFLOPs: one image's forward pass.",
        rows,
    )
    versus = f"{other} amp" if s.cuda else f"{other} plain"
    goal = {("train", "v3"): 1.3 if s.cuda else 1.0, ("infer", "v3"): 2.0 if s.cuda else 1.5}.get(
        (kind, pair), 1.5
    )
    target = Target(f"{what}, {pair} vs {other} at {hw[1]}x{hw[0]}", table.ratio(versus), goal, versus)
    if s.profile or not target.met:
        for name in ("ours", versus):
            log(f"  profiling {name} ...")
            target.profiles.append((name, profile_runner(runners[name], s)))
    targets.append(target)
    del runners
    if s.cuda:
        torch.cuda.empty_cache()
    print("\n".join(table.markdown()), flush=True)
    return table


def make_fake_voc(root: Path, count: int, split_length: int | None = None, seed: int = 0) -> float:
    """Write a VOC 2012 layout of ``count`` photo-like 500x375 JPEGs (every 4th 375x500) with palette masks.

    Images are smooth random fields plus noise, so their JPEGs have realistic sizes (noise alone would
    compress far worse and decode slower than photographs). The train split cycles through them up to
    ``split_length`` entries, so that one epoch covers every timed batch: epoch ends drain the workers'
    queues, which a real epoch (VOC train_aug: 10,582 images) does once in 1,300 batches, not every few
    dozen. Returns the mean JPEG size in KiB.
    """
    from deeplab_lit.data.voc import voc_palette

    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids, sizes = [f"2012_{i:06d}" for i in range(count)], []
    for index, image_id in enumerate(ids):
        height, width = (500, 375) if index % 4 == 3 else (375, 500)
        coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        jpeg = voc / "JPEGImages" / f"{image_id}.jpg"
        Image.fromarray(pixels).save(jpeg, quality=90)
        sizes.append(jpeg.stat().st_size)
        labels = rng.choice([0, 0, 0, *rng.integers(1, NUM_CLASSES, 2)], (height // 25 + 1, width // 25 + 1))
        mask = Image.fromarray(labels.astype(np.uint8)).resize((width, height), Image.NEAREST)
        mask.putpalette(voc_palette().tobytes())
        mask.save(voc / "SegmentationClass" / f"{image_id}.png")
    splits = voc / "ImageSets" / "Segmentation"
    train = [ids[i % count] for i in range(max(count, split_length or 0))]
    (splits / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (splits / "val.txt").write_text("".join(f"{i}\n" for i in ids[:2]))
    return statistics.mean(sizes) / 1024


#: Loader variants of the data section: row label -> ``normalize_on_device``.
LOADER_VARIANTS = {
    "data loader (normalised in the workers, default)": False,
    "data loader, normalize_on_device (uint8 batches; normalised after the transfer, not counted)": True,
}


def data_section(s: Settings, step_rates: dict[str, float], targets: list[Target]) -> list[str]:
    from deeplab_lit.data.datamodules import VOCDataModule

    with tempfile.TemporaryDirectory(prefix="speed-voc-") as folder:
        log(f"[data] writing {s.data_images} fake VOC images ...")
        timed_images = (s.rounds + 1) * s.data_batches * s.train_batch
        kib = make_fake_voc(Path(folder), s.data_images, split_length=timed_images + s.train_batch)
        loaders, iterators = {}, {}
        for label, on_device in LOADER_VARIANTS.items():
            datamodule = VOCDataModule(
                folder, train_split="train", batch_size=s.train_batch, crop_size=s.train_size,
                normalize_on_device=on_device,
            )  # fmt: skip
            datamodule.setup("fit")
            loaders[label] = datamodule.train_dataloader()
            iterators[label] = iter(loaders[label])
            next(iterators[label])  # workers started, first batch out
        rates: dict[str, list[float]] = {label: [] for label in loaders}
        for index in range(s.rounds):  # alternating, as the model tables
            for label in list(loaders) if index % 2 == 0 else list(loaders)[::-1]:
                start, count = time.perf_counter(), 0
                while count < s.data_batches:
                    try:
                        next(iterators[label])
                    except StopIteration:
                        iterators[label] = iter(loaders[label])
                        continue
                    count += 1
                rates[label].append(count * s.train_batch / (time.perf_counter() - start))
            log(f"  data round {index + 1}/{s.rounds}: " + ", ".join(f"{r[-1]:.1f}" for r in rates.values()))
        some_loader = next(iter(loaders.values()))
        workers, pinned = some_loader.num_workers, some_loader.pin_memory
        del iterators, loaders, some_loader
    default_label = next(iter(LOADER_VARIANTS))
    rate = statistics.median(rates[default_label])
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
            Target("data loading vs the faster training step", rate / step_rates[fastest], 3.0, fastest)
        )
    print("\n".join(lines), flush=True)
    return [*lines, ""]


def versions_section(s: Settings) -> list[str]:
    hw = (s.versions_size, s.versions_size)
    train_recipe = train_recipes(s, False)["ours"]
    infer_recipe = infer_recipes(s, False)["ours"]
    lines = [
        "### Every DeepLab version (ours)",
        "",
        f"Training: batch {s.versions_batch} x 3 x {hw[0]} x {hw[1]} ({train_recipe.label}); inference: "
        f"batch 1 at the same size ({infer_recipe.label}); {s.rounds} alternating rounds after {s.warmup} "
        f"warm-up. GFLOPs: one {s.flops_size}x{s.flops_size} image's forward pass. {NUM_CLASSES} classes, "
        "random weights.",
        "",
        "| version | params (M) | GFLOPs | train images/s | infer images/s | peak train step memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, builder in VERSIONS:
        log(f"[versions] {label}")
        torch.manual_seed(0)
        params = sum(p.numel() for p in builder().parameters()) / 1e6
        gflops = gflops_per_image(builder, "ours", (s.flops_size, s.flops_size), train=False)
        try:
            runners: dict[str, Runner] = {
                "train": TrainRunner(builder(), "ours", train_recipe, s.versions_batch, hw, s),
                "infer": InferRunner(builder(), "ours", infer_recipe, 1, hw, s),
            }
            rates = alternate(runners, 1, s, label)
            memory = "-"
            if s.cuda and s.memory:
                memory = f"{step_memory_mib(runners['train'], '', train_recipe, hw, s):.0f}"
            train, infer = statistics.median(rates["train"]), statistics.median(rates["infer"])
            lines.append(f"| {label} | {params:.1f} | {gflops:.1f} | {train:.2f} | {infer:.2f} | {memory} |")
        except torch.OutOfMemoryError:
            lines.append(f"| {label} | {params:.1f} | {gflops:.1f} | out of memory | | |")
        runners = {}
        if s.cuda:
            torch.cuda.empty_cache()
    print("\n".join(lines), flush=True)
    return [*lines, ""]


# -------------------------------------------------------------------------------------------- report
def _version_of(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def environment(s: Settings, load_start: tuple[float, ...]) -> list[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f"CPU {cpu_name()}, {cores} cores available, torch threads {torch.get_num_threads()}"
    if s.cuda:
        device = (
            f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark on, AMP {s.amp_dtype}); {device}"
        )
    packages = ", ".join(
        f"{name} {_version_of(dist)}"
        for name, dist in (("torch", "torch"), ("torchvision", "torchvision"),
                           ("smp", "segmentation-models-pytorch"), ("timm", "timm"),
                           ("lightning", "lightning"), ("albumentations", "albumentations"))
    )  # fmt: skip
    load_end = os.getloadavg()
    busy = []
    if load_start[0] > 0.5 * (cores or 1):  # before our own work: others' load
        busy = [
            f"- **Warning: the machine was busy at the start (load average {load_start[0]:.1f} on {cores} "
            "cores): these timings are not trustworthy. With more runnable threads than cores, torch's "
            "multi-threaded kernels wait on descheduled threads; `--threads 1` suffers least.**"
        ]
    return [
        *busy,
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"- Device: {device}",
        f"- Software: Python {platform.python_version()}, {packages}",
        f"- Load average (1/5/15 min) at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
        f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f}",
        f"- Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`",
        "",
    ]


def targets_markdown(targets: list[Target]) -> list[str]:
    lines = ["### Targets", "", "| what | ours / theirs | goal | met |", "|---|---:|---:|---|"]
    for target in targets:
        ratio = "-" if target.ratio is None else f"{target.ratio:.2f}x"
        met = {True: "yes", False: "**no**", None: "-"}[target.met]
        lines.append(f"| {target.what} (vs {target.versus}) | {ratio} | {target.goal:.1f}x | {met} |")
    lines.append("")
    profiled = [t for t in targets if t.profiles]
    if profiled:
        lines += ["### Where the time goes", ""]
        for target in profiled:
            for name, table in target.profiles:
                lines += [
                    f"{target.what}: **{name}**, one step (torch.profiler, top ops by self time)",
                    "",
                    "```",
                ]
                lines += [table, "```", ""]
    return lines


def write_report(path: Path, lines: list[str]) -> None:
    block = "\n".join([BEGIN, *lines, END])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and counts: a smoke test, not figures"
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--train-batch", type=int)
    parser.add_argument(
        "--train-size", type=int, help="square training crop (the smp pair: nearest multiple of 16)"
    )
    parser.add_argument(
        "--infer-size", type=int, nargs=2, action="append", metavar=("H", "W"), dest="infer_sizes"
    )
    parser.add_argument("--infer-batch", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--train-iters", type=int, help="steps per timed run")
    parser.add_argument("--infer-iters", type=int, help="forward passes per timed run")
    parser.add_argument("--data-images", type=int)
    parser.add_argument("--data-batches", type=int, help="batches per timed round of the loader")
    parser.add_argument("--versions-batch", type=int)
    parser.add_argument("--versions-size", type=int)
    parser.add_argument("--flops-size", type=int)
    parser.add_argument(
        "--amp-dtype",
        choices=("float16", "bfloat16"),
        default="float16",
        help="GPU mixed precision (float16: Lightning's 16-mixed, as experiments/*.yaml)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    parser.add_argument(
        "--ablations",
        action=argparse.BooleanOptionalAction,
        help="rows 'ours, no X' in the DeepLabV3 tables (default: on for cuda, off for the slow cpu steps)",
    )
    parser.add_argument("--profile", action="store_true", help="profile every pair, not only missed targets")
    parser.add_argument(
        "--compile", choices=COMPILE_MODES, help="add a row 'ours + compile: MODE' (the module's option)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    values = default_settings(args.device, args.quick)
    ablations = args.device == "cuda" or args.quick if args.ablations is None else args.ablations
    for key in list(values):
        given = getattr(args, key, None)
        if given is not None:
            values[key] = [tuple(hw) for hw in given] if key == "infer_sizes" else given
    settings = Settings(
        device=args.device, quick=args.quick, amp_dtype=args.amp_dtype, memory=not args.no_memory,
        ablations=ablations, threads=args.threads, profile=args.profile, compile=args.compile, **values,
    )  # fmt: skip
    settings.sections = args.sections  # type: ignore[attr-defined]
    settings.out = args.out  # type: ignore[attr-defined]
    return settings


def main(argv: list[str] | None = None) -> None:
    s = parse_args(argv)
    torch.set_num_threads(s.threads)
    if s.cuda:
        torch.backends.cudnn.benchmark = True  # fixed input sizes; the same for every contender
    load_start = os.getloadavg()
    lines = ["## Speed", ""]
    if s.quick:
        lines += [
            "**--quick: tiny sizes and counts, a smoke test of the script; these are not figures.**",
            "",
        ]
    body: list[str] = []
    targets: list[Target] = []
    step_rates: dict[str, float] = {}
    if "train" in s.sections:
        for pair, size in (("v3", s.train_size), ("v3plus", smp_size(s.train_size))):
            table = pair_section("train", pair, s, (size, size), targets)
            body += table.markdown()
            step_rates[f"ours {pair}"] = next(r for r in table.rows if r.name == "ours").median
    if "infer" in s.sections:
        for hw in s.infer_sizes:
            for pair in ("v3", "v3plus"):
                body += pair_section("infer", pair, s, hw if pair == "v3" else smp_hw(hw), targets).markdown()
    if "data" in s.sections:
        body += data_section(s, step_rates, targets)
    if "versions" in s.sections:
        body += versions_section(s)
    lines += environment(s, load_start) + targets_markdown(targets) + body
    print("\n".join(targets_markdown(targets)))
    for target in targets:
        if target.ratio is not None:
            print(f"ratio {target.what}: {target.ratio:.2f}x (goal {target.goal:.1f}x)")
    write_report(s.out, lines)
    print(f"written to {s.out}")


if __name__ == "__main__":
    main()
