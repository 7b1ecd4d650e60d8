"""How a model learns at the quickstart's recipe: train for some steps on the synthetic data, validate once.

The recipe is ``experiments/quickstart.yaml``'s model and data options (DeepLab v3+ ResNet-18, output stride
16, 64-channel ASPP and decoder, random initialisation, SGD lr 0.05 with the poly schedule, batch 16 of
64 px synthetic images), with any option changed and a step budget of one's own. Used by the speed suite's
backbones section for its learning column.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from deeplab_lit.data import SYNTHETIC_CLASSES, SyntheticDataModule
from deeplab_lit.modules import SegmentationModule

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "experiments" / "quickstart.yaml"


@dataclass(frozen=True)
class Learned:
    """What one training run gave: validation mIoU, mean wall time of a training step, parameters."""

    miou: float
    seconds_per_step: float
    parameters: int


def quickstart_recipe() -> tuple[dict[str, Any], dict[str, Any]]:
    """The quickstart's model and data ``init_args``."""
    config = yaml.safe_load(RECIPE.read_text())
    return dict(config["model"]["init_args"]), dict(config["data"]["init_args"])


def learn(
    module_class: type[SegmentationModule],
    options: dict[str, Any],
    *,
    steps: int,
    seed: int = 0,
    root: str = "data/synthetic",
    accelerator: str = "cpu",
) -> Learned:
    """Train ``module_class`` with the quickstart's options updated by ``options`` for ``steps`` steps.

    Seed ``seed`` sets the initialisation and the order of the batches; the data set is the same for all
    (written under ``root`` once). Returns the validation mIoU on the 80 validation images.
    """
    model_args, data_args = quickstart_recipe()
    data_args["root"] = root
    pl.seed_everything(seed, verbose=False)
    module = module_class(num_classes=len(SYNTHETIC_CLASSES), **{**model_args, **options})
    data = SyntheticDataModule(**data_args)
    trainer = pl.Trainer(
        max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = (time.perf_counter() - start) / max(1, steps)
    evaluator = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False)
    scores = evaluator.validate(module, datamodule=data, verbose=False)[0]
    parameters = sum(p.numel() for p in module.parameters())
    return Learned(float(scores["val/mIoU"]), seconds, parameters)
