"""A checkpoint written through the Python API records no module class: ``--model`` names it."""

from __future__ import annotations

import lightning
import pytest
import torch

from deeplab_lit.cli.restore import read_training_checkpoint, reconcile_model


@pytest.fixture
def python_api_checkpoint(tmp_path):
    """A Lightning checkpoint's shape without LightningCLI's ``_class_path`` (as ``trainer.fit`` writes)."""
    path = tmp_path / "api.ckpt"
    hparams = {"num_classes": 3, "backbone": "resnet18", "output_stride": 8}
    torch.save({"pytorch-lightning_version": lightning.__version__, "hyper_parameters": hparams}, path)
    return path


def test_the_class_given_with_model_builds_a_python_api_checkpoint(python_api_checkpoint):
    saved = read_training_checkpoint(python_api_checkpoint)
    assert saved.model_class is None
    class_path, init_args, taken = reconcile_model(saved, "deeplab_lit.DeepLabV3", {})
    assert class_path == "deeplab_lit.modules.deeplab.DeepLabV3"
    assert (init_args["num_classes"], init_args["backbone"], init_args["output_stride"]) == (3, "resnet18", 8)
    assert taken == {"num_classes": 3, "backbone": "resnet18", "output_stride": 8}


def test_a_python_api_checkpoint_without_a_class_asks_for_model(python_api_checkpoint):
    saved = read_training_checkpoint(python_api_checkpoint)
    with pytest.raises(ValueError, match="does not record which module wrote it.*--model"):
        reconcile_model(saved, None, {})


def test_options_left_at_their_default_take_the_checkpoints_even_in_parsed_form(tmp_path):
    """The parser hands ``inference`` over as a dict; at its default it must not hide the saved TTA."""
    tta = {"scales": [0.75, 1.0], "flip": True, "window": None, "overlap": 0.25, "max_pixels": None}
    path = tmp_path / "tta.ckpt"
    hparams = {
        "_class_path": "deeplab_lit.DeepLabV3",
        "num_classes": 3,
        "backbone": "resnet18",
        "inference": tta,
    }
    torch.save({"pytorch-lightning_version": lightning.__version__, "hyper_parameters": hparams}, path)
    saved = read_training_checkpoint(path)
    parsed_default = {
        "scales": [1.0],
        "flip": False,
        "window": None,
        "overlap": 1 / 3,
        "max_pixels": 12_582_912,
    }
    _, init_args, _ = reconcile_model(saved, None, {"inference": parsed_default})
    assert init_args["inference"] == tta
    _, init_args, _ = reconcile_model(saved, None, {"inference": {**parsed_default, "flip": True}})
    assert init_args["inference"]["flip"] is True and init_args["inference"]["scales"] == [1.0]  # the user's
