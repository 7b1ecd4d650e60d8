"""A checkpoint written through the Python API records no module class: ``--model`` names it."""

from __future__ import annotations

import lightning
import pytest
import torch

from deeplab_lit.modules.restore import read_training_checkpoint, reconcile_model


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
