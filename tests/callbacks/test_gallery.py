"""PredictionGallery: its picture files, IoU table and confusion matrix, and what TensorBoard gets."""

import csv
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.callbacks import PredictionGallery
from deeplab_lit.data import SyntheticDataModule
from deeplab_lit.metrics import scores_from_confusion
from deeplab_lit.visualize import LEGEND_CELL, TEXT_HEIGHT, overlay

SIZE, GAP = 32, 4  # the tiny images' side; pixels between panels and between rows


def tiny_data(root) -> SyntheticDataModule:
    return SyntheticDataModule(root=str(root), num_train=4, num_val=5, image_size=SIZE, batch_size=2,
                               crop_size=SIZE, val_batch_size=2, num_workers=0)  # fmt: skip


def fit_with_gallery(tmp_path, gallery, epochs=2, logger=False, callbacks=(), **trainer_options):
    data = tiny_data(tmp_path / "data")
    module = DeepLabV3Plus(num_classes=data.num_classes, backbone="resnet18", class_names=data.class_names)
    options = {"limit_train_batches": 1, **trainer_options}
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[gallery, *callbacks], **options,
    )  # fmt: skip
    trainer.fit(module, data)
    return trainer, data


def grid_size(num_images: int, panels: int, num_classes: int) -> tuple[int, int]:
    """(height, width) of a run's picture of ``num_images`` SIZE x SIZE images (see render_grid)."""
    width = panels * SIZE + (panels - 1) * GAP
    legend_lines = math.ceil((num_classes + 1) / max(1, width // LEGEND_CELL))  # + void
    return num_images * (TEXT_HEIGHT + SIZE + GAP) + legend_lines * TEXT_HEIGHT, width


def panel_row(picture: np.ndarray, row: int) -> np.ndarray:
    top = row * (TEXT_HEIGHT + SIZE + GAP) + TEXT_HEIGHT
    return picture[top : top + SIZE]


def test_one_picture_per_epoch_shows_the_same_images_with_truth_and_prediction(tmp_path):
    gallery = PredictionGallery(num_images=3, confusion_matrix=False, iou_table=False, crf=False)
    trainer, data = fit_with_gallery(tmp_path, gallery, epochs=2)
    folder = tmp_path / "gallery"  # logger=False: under default_root_dir
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000.png", "epoch_001.png"]  # no sanity check
    assert gallery.output_folder == folder and gallery.last_picture == folder / "epoch_001.png"
    first, second = (np.asarray(Image.open(folder / f"epoch_00{e}.png")) for e in (0, 1))
    assert first.shape == second.shape == (*grid_size(3, 3, data.num_classes), 3)
    for index in range(3):
        row = panel_row(first, index)
        assert (row[:, :SIZE] == panel_row(second, index)[:, :SIZE]).all()  # the same image both epochs
        item = data.val_dataset[index]  # the first images of the validation loader, in order
        image = data.normalization.denormalize(item["image"]).permute(1, 2, 0).numpy()
        assert (row[:, :SIZE] == image).all()
        truth = row[:, SIZE + GAP : 2 * SIZE + GAP]
        assert (truth == overlay(image, item["mask"].numpy(), data.palette, 0.5)).all()


def test_gallery_indices_crf_panel_and_every_n(tmp_path):
    gallery = PredictionGallery(indices=[4], every_n_val_epochs=2, crf=True, confusion_matrix=False,
                                iou_table=False)  # fmt: skip
    _, data = fit_with_gallery(tmp_path, gallery, epochs=3)
    files = sorted((tmp_path / "gallery").glob("*.png"))
    assert [f.name for f in files] == ["epoch_000.png", "epoch_002.png"]  # runs 1 and 3 of 3
    assert np.asarray(Image.open(files[0])).shape == (*grid_size(1, 4, data.num_classes), 3)  # + CRF panel


def test_a_second_validation_in_one_epoch_gets_its_own_picture(tmp_path):
    gallery = PredictionGallery(num_images=1, confusion_matrix=False, iou_table=False, crf=False)
    fit_with_gallery(tmp_path, gallery, epochs=1, limit_train_batches=2, val_check_interval=1)
    names = sorted(p.name for p in (tmp_path / "gallery").iterdir())
    assert names == ["epoch_000.png", "epoch_000_step0000002.png"]  # validations after steps 1 and 2


class KeepConfusion(Callback):
    """Copy the module's validation confusion matrix at the same hook as the gallery reads it."""

    def __init__(self):
        self.confmat = None

    def on_validation_epoch_end(self, trainer, pl_module):
        self.confmat = pl_module.metrics["val"].confmat.clone()


def test_iou_table_is_the_metrics_modules_from_the_same_confusion_matrix(tmp_path):
    gallery, keep = PredictionGallery(num_images=1, crf=False), KeepConfusion()
    trainer, data = fit_with_gallery(tmp_path, gallery, epochs=1, callbacks=[keep])
    header, *rows = list(csv.reader((tmp_path / "gallery" / "epoch_000_iou.csv").open()))
    assert header == ["class", "IoU", "gt_pixels", "pred_pixels"]
    assert [r[0] for r in rows] == data.class_names
    expected = scores_from_confusion(keep.confmat)["iou"]
    assert torch.tensor([float(r[1]) for r in rows]).allclose(expected, equal_nan=True)
    assert [int(r[2]) for r in rows] == keep.confmat.sum(dim=1).tolist()
    assert [int(r[3]) for r in rows] == keep.confmat.sum(dim=0).tolist()
    labelled = sum(int((data.val_dataset[i]["mask"] != 255).sum()) for i in range(len(data.val_dataset)))
    assert keep.confmat.sum() == labelled  # all 5 images, 3 batches
    for name, iou, *_ in rows:  # the figures the module logged
        if f"val/IoU/{name}" in trainer.callback_metrics:
            assert float(iou) == pytest.approx(float(trainer.callback_metrics[f"val/IoU/{name}"]), abs=1e-6)
    confusion = Image.open(tmp_path / "gallery" / "epoch_000_confusion_matrix.png")
    assert confusion.mode == "RGB" and min(confusion.size) > 100


def test_gallery_writes_to_tensorboard_and_to_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    gallery = PredictionGallery(num_images=2, crf=False)
    fit_with_gallery(tmp_path, gallery, epochs=1, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {"val/gallery/0", "val/gallery/1", "val/confusion_matrix/0"} <= set(events.Tags()["images"])
    assert "val/iou_table/text_summary" in events.Tags()["tensors"]
    assert gallery.last_picture == tmp_path / "tb" / "run" / "version_0" / "gallery" / "epoch_000.png"
    assert gallery.last_picture.is_file()  # the run's folder, whatever the logger


def test_callbacks_import_without_wandb():
    """wandb is an optional extra: block it and import the callbacks (the gallery among them)."""
    code = (
        "import sys; sys.modules['wandb'] = None\n"  # `import wandb` now raises ImportError
        "import deeplab_lit.callbacks, deeplab_lit.callbacks.gallery_output\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


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
