"""Recipes: which speed tricks each contender uses, and applying them to a model and its optimiser.

"ours" is what our LightningModule does: channels-last weights, fused SGD (foreach under fp16 loss
scaling, where torch's fused step mishandles skipped steps), AMP on a GPU; for inference BatchNorm folded
into the convolutions and ``torch.inference_mode``. The other library runs "plain" (fp32, default SGD,
``torch.no_grad``), "+AMP" on a GPU, and "+same tricks as ours". ``--compile MODE`` adds "ours + compile:
MODE" (the module's ``compile`` option); ablation rows "ours, no X" turn one trick off each.

The module's acceleration helpers are imported here and nowhere else in ``benchmarks/``, so the suite
times exactly what training uses, and moving those helpers is a one-line change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from benchmarks.settings import Settings
from deeplab_lit.acceleration import COMPILE_MODES, compile_in_place, compile_mode, fast_sgd_options

__all__ = ["COMPILE_MODES", "Recipe", "apply_layout_and_compile", "infer_recipes", "sgd", "train_recipes"]


@dataclass(frozen=True)
class Recipe:
    """The tricks of one contender; ``label`` is the recipe column of its row."""

    label: str
    channels_last: bool = False
    amp: bool = False
    fast_sgd: bool = False
    fold_bn: bool = False
    inference_mode: bool = False
    drop_aux: bool = False  # inference: do not compute torchvision's aux head (ours never does)
    compile: str | None = None  # torch.compile mode of the module's `compile` option


def _recipe_table(
    s: Settings,
    ours: Recipe,
    plain_label: str,
    tricks_label: str,
    without: dict[str, Recipe],
    ablations: bool,
) -> dict[str, Recipe]:
    """Contenders of one table: ours, the reference plain (+AMP on CUDA), with our tricks, and ablations.

    Keys starting with "ours" are rows of our model; the others are rows of the other library's.
    """
    recipes = {"ours": ours, "plain": Recipe(plain_label)}
    if s.cuda:
        recipes["amp"] = Recipe("+AMP", amp=True)
    recipes["tricks"] = replace(ours, label=tricks_label)
    if s.compile:
        recipes["ours-compiled"] = replace(ours, label=f"ours + compile: {s.compile}", compile=s.compile)
    return {**recipes, **without} if ablations else recipes


def train_recipes(s: Settings, ablations: bool) -> dict[str, Recipe]:
    """The training table's recipes; ``ablations`` adds "ours, no channels-last" and "ours, default SGD"."""
    loss_scaling = s.cuda and s.amp_dtype == "float16"  # then foreach, not fused (see fast_sgd_options)
    step = "foreach SGD" if loss_scaling else "fused SGD"
    ours = Recipe(f"ours: channels-last, {step}" + (", AMP" if s.cuda else ""), True, s.cuda, True)
    without = {
        "ours-no-cl": replace(ours, label="ours, no channels-last", channels_last=False),
        "ours-no-fused": replace(ours, label="ours, default SGD", fast_sgd=False),
    }
    return _recipe_table(s, ours, "plain (fp32, default SGD)", "+same tricks as ours", without, ablations)


def infer_recipes(s: Settings, ablations: bool) -> dict[str, Recipe]:
    """The inference table's recipes; ``ablations`` adds "ours, BN not folded" and "no channels-last"."""
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


def apply_layout_and_compile(model: nn.Module, recipe: Recipe) -> None:
    """Channels-last weights and ``torch.compile`` in place, as the module's options do (in that order)."""
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.compile:
        compile_in_place(model, compile_mode(recipe.compile))


def sgd(params: list[Tensor], recipe: Recipe, loss_scaling: bool) -> torch.optim.SGD:
    """SGD (momentum 0.9, weight decay 1e-4) for every contender; fused/foreach when the recipe says so.

    As the module: no fused step under fp16 loss scaling (see ``fast_sgd_options``).
    """
    options = fast_sgd_options(params, fused_allowed=not loss_scaling) if recipe.fast_sgd else {}
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4, **options)
