"""PredictionGallery: its panels, IoU table and confusion matrix, in files and in TensorBoard."""

import csv

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.callbacks import PredictionGallery
from deeplab_lit.data import SyntheticDataModule
from deeplab_lit.visualize import overlay


def tiny_data(root) -> SyntheticDataModule:
    return SyntheticDataModule(root=str(root), num_train=4, num_val=5, image_size=32, batch_size=2,
                               crop_size=32, val_batch_size=2, num_workers=0)  # fmt: skip


def fit_with_gallery(tmp_path, gallery, epochs=2, logger=False):
    data = tiny_data(tmp_path / "data")
    module = DeepLabV3Plus(num_classes=data.num_classes, backbone="resnet18", class_names=data.class_names)
    trainer = Trainer(
        max_epochs=epochs, limit_train_batches=1, accelerator="cpu", logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[gallery],
    )  # fmt: skip
    trainer.fit(module, data)
    return trainer, data


def pictures(folder):
    return sorted(folder.glob("*.png")) if folder.exists() else []


def test_gallery_shows_the_same_images_with_truth_and_prediction_in_the_palette(tmp_path):
    gallery = PredictionGallery(num_images=3, confusion_matrix=False, iou_table=False, crf=False)
    trainer, data = fit_with_gallery(tmp_path, gallery, epochs=2)
    files = pictures(tmp_path / "gallery" / "val_gallery")
    # 2 validation runs x 3 images; the sanity check logs nothing
    assert [f.name for f in files] == [f"step{s:07d}_{i:02d}.png" for s in (1, 2) for i in range(3)]
    width = 32
    for index in range(3):
        first, second = (np.asarray(Image.open(files[run * 3 + index])) for run in (0, 1))
        assert first.shape == (32, 3 * width + 2 * 4, 3)  # image | ground truth | prediction
        assert (first[:, :width] == second[:, :width]).all()  # the same image both times
        item = data.val_dataset[index]  # the first images of the validation loader, in order
        image = data.normalization.denormalize(item["image"]).permute(1, 2, 0).numpy()
        assert (first[:, :width] == image).all()
        truth = first[:, width + 4 : 2 * width + 4]
        assert (truth == overlay(image, item["mask"].numpy(), data.palette, 0.5)).all()


def test_gallery_indices_crf_panel_and_every_n(tmp_path):
    gallery = PredictionGallery(indices=[4], every_n_val_epochs=2, crf=True, confusion_matrix=False,
                                iou_table=False)  # fmt: skip
    fit_with_gallery(tmp_path, gallery, epochs=3)
    files = pictures(tmp_path / "gallery" / "val_gallery")
    assert [f.name for f in files] == ["step0000001_00.png", "step0000003_00.png"]  # runs 1 and 3 of 3
    assert np.asarray(Image.open(files[0])).shape == (32, 4 * 32 + 3 * 4, 3)  # + CRF panel


def test_iou_table_and_confusion_matrix_cover_the_whole_validation_set(tmp_path):
    gallery = PredictionGallery(num_images=1, crf=False)
    trainer, data = fit_with_gallery(tmp_path, gallery, epochs=1)
    (table,) = sorted((tmp_path / "gallery" / "val_iou_table").glob("*.csv"))
    header, *rows = list(csv.reader(table.open()))
    assert header == ["class", "IoU", "accuracy", "gt_pixels", "pred_pixels"]
    assert [r[0] for r in rows] == data.class_names
    labelled = sum(int((data.val_dataset[i]["mask"] != 255).sum()) for i in range(len(data.val_dataset)))
    assert sum(int(r[3]) for r in rows) == labelled == sum(int(r[4]) for r in rows)  # all 5 images, 3 batches
    logged = trainer.callback_metrics
    for name, iou, *_ in rows:  # read before the module reset its confusion matrix: same figures
        if f"val/IoU/{name}" in logged:
            assert float(iou) == pytest.approx(float(logged[f"val/IoU/{name}"]), abs=1e-6)
    assert len(pictures(tmp_path / "gallery" / "val_confusion_matrix")) == 1


def test_gallery_writes_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    fit_with_gallery(tmp_path, PredictionGallery(num_images=2, crf=False), epochs=1, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {"val/gallery/0", "val/gallery/1", "val/confusion_matrix/0"} <= set(events.Tags()["images"])
    assert "val/iou_table/text_summary" in events.Tags()["tensors"]
    assert not (tmp_path / "gallery").exists()  # no PNG fallback when the logger takes images


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_images": 0}, "num_images"), ({"alpha": 2.0}, "alpha"), ({"indices": []}, "indices"),
     ({"every_n_val_epochs": 0}, "every_n_val_epochs")],
)  # fmt: skip
def test_bad_gallery_options_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PredictionGallery(**kwargs)


def test_gallery_without_palette_or_normalization_says_what_it_needs(tmp_path):
    module = DeepLabV3Plus(num_classes=3, backbone="resnet18")
    trainer = Trainer(
        accelerator="cpu", logger=False, callbacks=[PredictionGallery()], enable_progress_bar=False
    )
    loader = torch.utils.data.DataLoader(
        [{"image": torch.zeros(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.long)}], batch_size=1
    )
    with pytest.raises(ValueError, match="palette and a normalization"):
        trainer.validate(module, loader)
