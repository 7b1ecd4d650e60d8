"""Runners: one contender's training step or inference pass, built with its recipe, ready for the harness.

A training step is forward (every output, auxiliary heads included) + the shared loss + backward + SGD
step, under AMP with loss scaling where the recipe says so. An inference pass is a forward of the main
output under ``torch.inference_mode`` or ``torch.no_grad``, BatchNorm folded where the recipe says so.
Inputs are random images of a fixed size and random masks with some void (255) rows.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from benchmarks.contenders import NUM_CLASSES, Model, segmentation_loss
from benchmarks.harness import Runner
from benchmarks.recipes import Recipe, apply_layout_and_compile, sgd
from benchmarks.settings import Settings
from deeplab_lit.models.fusion import count_batchnorms, fuse_conv_bn


def random_masks(batch: int, height: int, width: int, device: str) -> Tensor:
    """Random labels with every 9th row void (255), as VOC's object outlines are."""
    masks = torch.randint(0, NUM_CLASSES, (batch, height, width), device=device)
    masks[:, ::9] = 255
    return masks


class TrainRunner(Runner):
    """One training step of ``model`` on a fixed random batch of ``batch`` x 3 x ``hw``."""

    def __init__(self, model: Model, recipe: Recipe, batch: int, hw: tuple[int, int], s: Settings) -> None:
        self.device, self.batch, self.model = s.device, batch, model
        self.network = model.build().to(s.device).train()
        apply_layout_and_compile(self.network, recipe)
        self.images = torch.randn(batch, 3, *hw, device=s.device)
        self.masks = random_masks(batch, *hw, s.device)
        self.dtype = s.autocast_dtype if recipe.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        params = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = sgd(params, recipe, loss_scaling=self.scaler is not None)

    def step(self) -> None:
        """Forward, loss, backward and SGD step (scaled under fp16 AMP)."""
        context = torch.autocast(self.device, self.dtype) if self.dtype else contextlib.nullcontext()
        with context:
            loss = segmentation_loss(self.model.outputs(self.network, self.images), self.masks)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


class InferRunner(Runner):
    """One inference pass of ``model`` on a fixed random batch of ``batch`` x 3 x ``hw``."""

    def __init__(self, model: Model, recipe: Recipe, batch: int, hw: tuple[int, int], s: Settings) -> None:
        self.device, self.batch, self.model, self.recipe = s.device, batch, model, recipe
        network = model.build().to(s.device).eval()
        if recipe.drop_aux and getattr(network, "aux_classifier", None) is not None:
            network.aux_classifier = None
        self.network = fuse_conv_bn(network) if recipe.fold_bn else network
        self.batchnorms_left = count_batchnorms(self.network)  # folding missed these (said in the table)
        apply_layout_and_compile(self.network, recipe)
        self.images = torch.randn(batch, 3, *hw, device=s.device)
        self.dtype = s.autocast_dtype if recipe.amp else None

    def step(self) -> None:
        """Forward of the main output, without autograd, under AMP where the recipe says so."""
        grad = torch.inference_mode() if self.recipe.inference_mode else torch.no_grad()
        context = torch.autocast(self.device, self.dtype) if self.dtype else contextlib.nullcontext()
        with grad, context:
            self.model.logits(self.network, self.images)


def make_runner(
    kind: str, model: Model, recipe: Recipe, batch: int, hw: tuple[int, int], s: Settings
) -> Runner:
    """A ``kind`` ("train" or "infer") runner, its random weights seeded alike for every contender."""
    torch.manual_seed(0)
    runner_class = TrainRunner if kind == "train" else InferRunner
    return runner_class(model, recipe, batch, hw, s)
