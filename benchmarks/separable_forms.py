"""How each form of the v3+ atrous separable convolution learns: the quickstart recipe, several seeds.

    python benchmarks/separable_forms.py                          # 300 steps, seeds 0 1 2, every variant
    python benchmarks/separable_forms.py --steps 100 --seeds 0    # a quick look
    python benchmarks/separable_forms.py --variants plain xception
    python benchmarks/separable_forms.py --gradients              # one batch at init: |grad| / |w| by layer

The recipe is ``experiments/quickstart.yaml``'s (DeepLab v3+ ResNet-18, output stride 16, 64-channel ASPP
and decoder, random initialisation, SGD lr 0.05 with the poly schedule, batch 16 of 64 px synthetic images)
for ``--steps`` steps instead of 1050, then one validation on the 80 validation images. The variants
(:data:`VARIANTS`) change only ``separable`` / ``separable_form`` and, for ``deeplab-open-relu``, the
initial bias of the BatchNorms between depthwise and pointwise convolution. Each seed sets the
initialisation and the order of the batches; the data set is the same for all. The table gives each
variant's mean validation mIoU, each seed's, two checks of the trained networks (:func:`diagnose`), the
mean time of a training step (after the first 10, data loading included; only comparable within one run,
on a quiet machine) and the parameter count. Results: BENCHMARKS.md, "Atrous separable convolution".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.data import SYNTHETIC_CLASSES, SyntheticDataModule
from deeplab_lit.metrics import SegmentationMetrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "experiments" / "quickstart.yaml"


def _deeplab_blocks(model: nn.Module) -> list[nn.Sequential]:
    """The ``deeplab``-form separable convolutions: depthwise, BN, ReLU, pointwise, BN, ReLU."""
    return [
        block
        for block in model.modules()
        if isinstance(block, nn.Sequential) and len(block) == 6 and getattr(block[0], "groups", 1) > 1
    ]


class _OpenReLUStart(DeepLabV3Plus):
    """The ``deeplab`` form, its in-between BatchNorms' bias initialised to 3 (the ``deeplab-open-relu`` row).

    The ReLU between depthwise and pointwise convolution then passes 99.9 % of the normalised values at
    the start (it is almost linear: the ``xception`` form's function); the layout, and so any weights
    it loads, are the ``deeplab`` form's.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for block in _deeplab_blocks(self.model):
            nn.init.constant_(block[1].bias, 3.0)


@dataclass(frozen=True)
class Variant:
    """One row: the module class and the options it changes."""

    module: type[DeepLabV3Plus]
    options: dict[str, Any]
    what: str


VARIANTS: dict[str, Variant] = {
    "plain": Variant(DeepLabV3Plus, {"separable": False}, "3x3 conv-BN-ReLU"),
    "deeplab": Variant(
        DeepLabV3Plus, {"separable": True, "separable_form": "deeplab"}, "dw-BN-ReLU-pw-BN-ReLU"
    ),
    "xception": Variant(DeepLabV3Plus, {"separable": True, "separable_form": "xception"}, "dw-pw-BN-ReLU"),
    "deeplab-open-relu": Variant(
        _OpenReLUStart,
        {"separable": True, "separable_form": "deeplab"},
        "dw-BN-ReLU-pw-BN-ReLU, in-between BN bias 3 at init",
    ),
}


@dataclass
class Run:
    """What one training run gave (the last two: see :func:`diagnose`)."""

    miou: float
    seconds_per_step: float
    parameters: int
    miou_batch_stats: float
    dead_between: float | None


class _StepTimer(pl.Callback):
    """Wall time of the training steps after the first ``skip`` (data loading included)."""

    def __init__(self, skip: int = 10) -> None:
        self.skip, self.start, self.steps, self.end = skip, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.skip:
            self.steps, self.end = trainer.global_step - self.skip, time.perf_counter()

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps if self.steps else float("nan")


@torch.no_grad()
def diagnose(module: DeepLabV3Plus, data: SyntheticDataModule) -> tuple[float, float | None]:
    """Two checks of a trained network on the validation images.

    Returns:
        The mIoU with every BatchNorm normalising by the batch's statistics (batches of 16) instead of its
        running ones (a large gain over the evaluated mIoU means the running statistics lag the weights);
        and, for the ``deeplab`` form, the fraction of the channels between depthwise and pointwise
        convolutions that are zero on every validation pixel (None for the other forms).
    """
    model = module.model
    relus = [block[2] for block in _deeplab_blocks(model)]
    peaks: dict[int, Tensor] = {}
    hooks = [
        relu.register_forward_hook(
            lambda m, i, out: peaks.__setitem__(
                id(m), torch.maximum(peaks.get(id(m), out.amax((0, 2, 3))), out.amax((0, 2, 3)))
            )
        )
        for relu in relus
    ]
    metrics = SegmentationMetrics(len(SYNTHETIC_CLASSES))
    data.setup("validate")
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    model.eval()
    for bn in momenta:
        bn.train()
        bn.momentum = 0.0  # batch statistics, running statistics left as they are
    for batch in data.val_dataloader():
        metrics.update(model(batch["image"]).argmax(1), batch["mask"])
    for bn, momentum in momenta.items():
        bn.momentum = momentum
    for hook in hooks:
        hook.remove()
    dead = None
    if relus:
        dead = float(sum((p == 0).sum() for p in peaks.values()) / sum(p.numel() for p in peaks.values()))
    return float(metrics.compute()["mIoU"]), dead


def gradient_ratios(variant: str, seed: int, root: str) -> dict[str, float]:
    """Median ``|grad| / |w|`` per filter at initialisation, one training batch, by layer kind.

    Kinds: ``aspp dw`` / ``aspp pw`` / ``aspp 3x3`` (the atrous branches), ``decoder dw`` / ``pw`` /
    ``3x3`` (the two fusing convolutions). How far one SGD step turns each kind of filter.
    """
    model_args, data_args = recipe()
    data = SyntheticDataModule(**{**data_args, "root": root, "num_workers": 0})
    data.setup("fit")
    pl.seed_everything(seed, verbose=False)
    batch = next(iter(data.train_dataloader()))
    spec = VARIANTS[variant]
    model = spec.module(num_classes=len(SYNTHETIC_CLASSES), **{**model_args, **spec.options}).model.train()
    loss = F.cross_entropy(model.forward_train(batch["image"])["out"], batch["mask"], ignore_index=255)
    loss.backward()
    ratios: dict[str, list[Tensor]] = {}
    parts = {"aspp": model.head.convs[1:-1], "decoder": model.decoder.fuse}
    for part, blocks in parts.items():
        for conv in (m for block in blocks for m in block.modules() if isinstance(m, nn.Conv2d)):
            kind = "dw" if conv.groups > 1 else "pw" if conv.kernel_size == (1, 1) else "3x3"
            ratio = conv.weight.grad.flatten(1).norm(dim=1) / conv.weight.flatten(1).norm(dim=1)
            ratios.setdefault(f"{part} {kind}", []).append(ratio)
    return {kind: float(torch.cat(r).median()) for kind, r in ratios.items()}


def recipe() -> tuple[dict[str, Any], dict[str, Any]]:
    """The quickstart's model and data ``init_args``."""
    config = yaml.safe_load(RECIPE.read_text())
    return dict(config["model"]["init_args"]), dict(config["data"]["init_args"])


def train(variant: str, seed: int, steps: int, root: str, workers: int | None) -> Run:
    """Train one variant for ``steps`` steps from seed ``seed``; validate once."""
    model_args, data_args = recipe()
    data_args["root"] = root
    if workers is not None:
        data_args["num_workers"] = workers
    pl.seed_everything(seed, verbose=False)
    spec = VARIANTS[variant]
    module = spec.module(num_classes=len(SYNTHETIC_CLASSES), **{**model_args, **spec.options})
    data = SyntheticDataModule(**data_args)
    timer = _StepTimer()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    evaluator = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    scores = evaluator.validate(module, datamodule=data, verbose=False)[0]
    parameters = sum(p.numel() for p in module.model.parameters())
    return Run(float(scores["val/mIoU"]), timer.seconds_per_step, parameters, *diagnose(module, data))


def table(results: dict[str, list[Run]], seeds: list[int]) -> list[str]:
    """Markdown rows: variant, form, mean and per-seed mIoU, s/step, parameters."""
    lines = [
        "| variant | form | mean val mIoU | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mIoU, BN batch stats | dead between | s/step | params |",
        "|---|---|---|" + "---|" * len(seeds) + "---|---|---|---|",
    ]
    for name, runs in results.items():
        mious = [r.miou for r in runs]
        lines.append(
            f"| {name} | {VARIANTS[name].what} | **{statistics.mean(mious):.3f}** | "
            + " | ".join(f"{m:.3f}" for m in mious)
            + f" | {statistics.mean(r.miou_batch_stats for r in runs):.3f} | {_dead(runs)}"
            + f" | {statistics.mean(r.seconds_per_step for r in runs):.3f}"
            + f" | {runs[0].parameters / 1e6:.3f} M |"
        )
    return lines


def _dead(runs: list[Run]) -> str:
    dead = [r.dead_between for r in runs if r.dead_between is not None]
    return f"{100 * statistics.mean(dead):.1f} %" if dead else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--root", default="data/synthetic", help="where the synthetic data set is written")
    parser.add_argument("--workers", type=int, default=None, help="data workers (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--gradients", action="store_true", help="print gradient_ratios at initialisation instead of training"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gradients:
        for name in args.variants:
            for seed in args.seeds:
                ratios = gradient_ratios(name, seed, args.root)
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.1e}" for k, v in ratios.items()))
        return
    load_start = os.getloadavg()
    results: dict[str, list[Run]] = {name: [] for name in args.variants}
    for seed in args.seeds:  # seeds outermost: a change of load during the run hits every variant alike
        for name in args.variants:
            run = train(name, seed, args.steps, args.root, args.workers)
            print(
                f"{name} seed {seed}: val mIoU {run.miou:.3f} (BN batch stats {run.miou_batch_stats:.3f}, "
                f"dead between {run.dead_between}), {run.seconds_per_step:.3f} s/step",
                flush=True,
            )
            results[name].append(run)
    print(
        f"\n{args.steps} steps of the quickstart recipe, seeds {args.seeds}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load_start[0]:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end\n"
    )
    print("\n".join(table(results, args.seeds)))


if __name__ == "__main__":
    main()
