"""Separable v3+ checkpoints written before ``separable_form`` existed restore with their form ("deeplab").

Such files record ``separable: true`` and no form; their layers are depthwise, BN, ReLU, pointwise, BN,
ReLU. They must build that network again, and compute the same function, by both routes: ``weights:``
(the form read from the keys) and ``--ckpt_path`` (the options reconciled from the hyper-parameters alone).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.classes import class_defaults
from deeplab_lit.cli.restore import read_training_checkpoint, reconcile_model
from deeplab_lit.models import deeplab_v3plus
from deeplab_lit.weights.load import load_weights, read_checkpoint

SMALL = {"num_classes": 3, "backbone": "resnet18", "channels": 8}


def _randomize_bn(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory):
    """A separable v3+ Lightning checkpoint as written before separable_form: the option is absent."""
    torch.manual_seed(0)
    module = DeepLabV3Plus(**SMALL, separable=True, separable_form="deeplab").eval()
    _randomize_bn(module.model)
    hparams = {k: v for k, v in module.hparams.items() if k != "separable_form"}
    hparams["_class_path"] = "deeplab_lit.DeepLabV3Plus"
    folder = tmp_path_factory.mktemp("old")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": "2.6.6"}, folder / "old.ckpt")  # fmt: skip
    torch.save(module.model.state_dict(), folder / "old_plain.pth")
    return module, folder


def _same_logits(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


def test_old_separable_checkpoint_restores_its_form_through_weights(old_checkpoint):
    reference, folder = old_checkpoint
    checkpoint = read_checkpoint(folder / "old.ckpt")
    assert checkpoint.options["separable"] is True and checkpoint.options["separable_form"] == "deeplab"
    restored = DeepLabV3Plus(**SMALL, weights=str(folder / "old.ckpt"))  # separable, form left at defaults
    assert restored.hparams.separable is True and restored.hparams.separable_form == "deeplab"
    _same_logits(restored.model, reference.model)
    # a plain state dict records no options: the model is built as the user says, and loads in its form
    model = deeplab_v3plus(**SMALL, separable=True, separable_form="deeplab")
    load_weights(model, folder / "old_plain.pth")
    _same_logits(model, reference.model)


def test_old_separable_checkpoint_restores_its_form_through_ckpt_path(old_checkpoint):
    reference, folder = old_checkpoint
    saved = read_training_checkpoint(folder / "old.ckpt")
    assert "separable_form" not in saved.hparams
    given = class_defaults(DeepLabV3Plus)
    class_path, init_args, taken = reconcile_model(saved, None, given)
    assert taken["separable_form"] == "deeplab" and init_args["separable_form"] == "deeplab"
    restored = DeepLabV3Plus(**{k: v for k, v in init_args.items() if k != "weights"})
    restored.load_state_dict(torch.load(folder / "old.ckpt", weights_only=True)["state_dict"])
    _same_logits(restored.model, reference.model)


def test_a_model_of_the_other_form_is_refused_naming_the_forms(old_checkpoint):
    _, folder = old_checkpoint
    other = deeplab_v3plus(**SMALL, separable=True, separable_form="xception")
    needs = r"separable_form='deeplab'.*the model is .*separable_form='xception'"
    with pytest.raises(ValueError, match=needs):
        load_weights(other, folder / "old.ckpt")


def test_old_separable_checkpoint_restores_its_form_through_load_from_checkpoint(old_checkpoint):
    """Lightning's own Python call builds from the saved hyper-parameters (no form): the keys then tell."""
    reference, folder = old_checkpoint
    saved = torch.load(folder / "old.ckpt", weights_only=False)
    saved["hyper_parameters"].pop("_class_path")  # as a plain Trainer (no LightningCLI) writes them
    torch.save(saved, folder / "old_trainer.ckpt")
    restored = DeepLabV3Plus.load_from_checkpoint(folder / "old_trainer.ckpt", weights_only=False)
    assert restored.hparams.separable_form == "deeplab"
    _same_logits(restored.model, reference.model)
