"""PredictionGallery with W&B: interactive masks with class names, read back from an offline run's files."""

import numpy as np
import pytest
from PIL import Image

from deeplab_lit.callbacks import PredictionGallery
from deeplab_lit.loggers import WandbLogger
from tests.callbacks.test_gallery import fit_with_gallery

wandb = pytest.importorskip("wandb")
from tests.test_loggers import read_offline_run  # noqa: E402  # needs wandb's protobuf records


def test_wandb_gets_truth_prediction_and_crf_masks_with_the_class_names(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(name="gallery", save_dir=str(tmp_path))
    gallery = PredictionGallery(num_images=2, crf=True)
    try:
        trainer, data = fit_with_gallery(tmp_path, gallery, epochs=1, logger=logger)
    finally:
        wandb.finish()  # Lightning leaves the run open; close and flush it
    run_dir, _, history, config = read_offline_run(tmp_path)
    (entry,) = [h for h in history if h.get("val/gallery/_type") == "images/separated"]
    assert entry["val/gallery/count"] == 2 and entry["val/gallery/captions"] == ["val_00000", "val_00001"]
    layers = entry["val/gallery/all_masks"]
    assert [set(masks) for masks in layers] == [{"ground_truth", "prediction", "crf"}] * 2
    for index, masks in enumerate(layers):  # the mask files hold the labels, void (255) included
        truth = np.asarray(Image.open(run_dir / "files" / masks["ground_truth"]["path"]))
        assert (truth == data.val_dataset[index]["mask"].numpy()).all()
        prediction = np.asarray(Image.open(run_dir / "files" / masks["prediction"]["path"]))
        assert prediction.shape == truth.shape and prediction.max() < data.num_classes
    expected = {str(i): name for i, name in enumerate(data.class_names)} | {"255": "void"}
    labels = config["_wandb"]["mask/class_labels"]  # wandb keeps each layer's class names in the config
    for layer in ("ground_truth", "prediction", "crf"):
        assert labels[f"val/gallery_wandb_delimeter_{layer}"]["value"] == expected
    assert gallery.last_picture == tmp_path / "gallery" / "epoch_000.png"  # the pictures as PNG too
    assert gallery.last_picture.is_file()
