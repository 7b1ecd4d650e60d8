"""DataModules: metadata at construction, loaders' batches match the contract, predict, bad arguments."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deeplab_lit.data import (
    ADE20KDataModule,
    CityscapesDataModule,
    COCOStuffDataModule,
    FolderDataModule,
    PascalContextDataModule,
    SegmentationDataModule,
    SyntheticDataModule,
    VOCDataModule,
)
from deeplab_lit.normalization import CAFFE_BGR, IMAGENET
from tests.fakes import VOC_TRAIN, VOC_VAL, make_cityscapes, make_folder_dataset, make_voc, make_voc_sbd

SMALL = {"batch_size": 2, "crop_size": 24, "num_workers": 0}
EXPERIMENTS = Path(__file__).parents[2] / "experiments"


@pytest.fixture(autouse=True)
def _preflight_cache(tmp_path, monkeypatch):
    """The preflight caches into the test's folder, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _check_train_batch(batch, batch_size, crop, num_classes):
    assert set(batch) == {"image", "mask", "name"}
    assert batch["image"].shape == (batch_size, 3, crop, crop) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (batch_size, crop, crop) and batch["mask"].dtype == torch.int64
    assert ((batch["mask"] < num_classes) | (batch["mask"] == 255)).all()
    assert len(batch["name"]) == batch_size and isinstance(batch["name"][0], str)


def _check_eval_batch(batch):
    assert batch["image"].shape[:2] == (1, 3) and batch["mask"].shape == (1, *batch["image"].shape[2:])
    assert batch["mask"].dtype == torch.int64


def test_voc_datamodule_train_aug(tmp_path):
    ids = make_voc_sbd(tmp_path)
    dm = VOCDataModule(str(tmp_path), **SMALL)
    assert dm.num_classes == 21 and dm.class_names[0] == "background" and dm.ignore_index == 255
    assert dm.palette.shape == (256, 3) and dm.normalization == IMAGENET
    dm.setup("fit")
    assert len(dm.train_dataset) == len(ids["train_aug"]) and len(dm.val_dataset) == len(VOC_VAL)
    train = dm.train_dataloader()
    assert len(train) == len(ids["train_aug"]) // 2  # drop_last
    _check_train_batch(next(iter(train)), 2, 24, 21)
    for batch in dm.val_dataloader():
        _check_eval_batch(batch)
    dm.setup("test")
    assert dm.test_dataset.names == list(VOC_VAL)  # test = val split


def test_voc_datamodule_train_split(tmp_path):
    make_voc(tmp_path)
    dm = VOCDataModule(str(tmp_path), train_split="train", **SMALL)
    dm.setup("fit")
    assert dm.train_dataset.names == list(VOC_TRAIN)


def test_voc_datamodule_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"train_split must be one of train_aug, train, trainval; got 'val'"):
        VOCDataModule(str(tmp_path), train_split="val")
    missing = VOCDataModule(str(tmp_path / "missing"))  # the root is checked by the stages that read it
    for stage in ("fit", "validate", "test"):
        with pytest.raises(FileNotFoundError, match=r"(?s)PASCAL VOC 2012 not found under .*download=True"):
            missing.setup(stage)
    make_voc(tmp_path)
    dm = VOCDataModule(str(tmp_path), **SMALL)  # train_aug without SBD: fails at setup, before training
    with pytest.raises(FileNotFoundError, match="needs the SBD"):
        dm.setup("fit")
    VOCDataModule(str(tmp_path / "later"), download=True)  # download=True defers the check to prepare_data


def test_cityscapes_datamodule(tmp_path):
    root = make_cityscapes(tmp_path, {"train": 3, "val": 2})
    dm = CityscapesDataModule(str(root), batch_size=2, crop_size=32, num_workers=0)
    assert dm.num_classes == 19 and dm.crop_size == 32
    assert (
        CityscapesDataModule(str(root)).crop_size == 769 and CityscapesDataModule(str(root)).batch_size == 4
    )
    dm.setup("fit")
    _check_train_batch(next(iter(dm.train_dataloader())), 2, 32, 19)
    _check_eval_batch(next(iter(dm.val_dataloader())))
    dm_tv = CityscapesDataModule(str(root), train_split="trainval", **SMALL)
    dm_tv.setup("fit")
    assert len(dm_tv.train_dataset) == 5


def test_folder_datamodule_split_and_lists(tmp_path):
    root = make_folder_dataset(tmp_path, n=10, num_classes=3)
    dm = FolderDataModule(str(root), ["background", "a", "b"], val_fraction=0.2, **SMALL)
    assert dm.num_classes == 3
    dm.setup(None)
    train, val = set(dm.train_dataset.names), set(dm.val_dataset.names)
    assert len(val) == 2 and len(train) == 8 and not train & val
    assert dm.test_dataset.names == dm.val_dataset.names
    _check_train_batch(next(iter(dm.train_dataloader())), 2, 24, 3)
    (root / "tr.txt").write_text("img_000\nimg_001\nimg_002\n")
    (root / "va.txt").write_text("img_009\n")
    dm = FolderDataModule(
        str(root), ["background", "a", "b"], train_list="tr.txt", val_list="va.txt", **SMALL
    )
    dm.setup("fit")
    assert dm.train_dataset.names == ["img_000", "img_001", "img_002"] and dm.val_dataset.names == ["img_009"]


def test_folder_datamodule_bad_arguments(tmp_path):
    root = make_folder_dataset(tmp_path, n=4, num_classes=2)
    with pytest.raises(ValueError, match="both train_list and val_list"):
        FolderDataModule(str(root), ["bg", "fg"], train_list="tr.txt")
    with pytest.raises(ValueError, match="distinct names"):
        FolderDataModule(str(root), ["bg", "bg"])
    with pytest.raises(FileNotFoundError, match=r"Data set folder not found: .*nope"):
        FolderDataModule(str(tmp_path / "nope"), ["bg", "fg"])
    dm = FolderDataModule(str(root), ["bg"], **SMALL)  # masks hold class 1, but only one class declared
    with pytest.raises(ValueError, match=r"holds values \[1\].*expected 0\.\.0"):
        dm.setup("validate")  # the preflight reads every mask
    dm = FolderDataModule(str(root), ["bg"], **SMALL, preflight=False)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"holds values \[1\].*expected 0\.\.0"):
        next(iter(dm.val_dataloader()))


def test_synthetic_datamodule_generates_and_loads(tmp_path):
    dm = SyntheticDataModule(
        str(tmp_path / "syn"),
        num_train=4,
        num_val=2,
        image_size=32,
        batch_size=2,
        crop_size=32,
        num_workers=0,
    )
    assert dm.num_classes == 6 and dm.class_names[4] == "ring"
    dm.prepare_data()
    manifest = tmp_path / "syn" / "synthetic.json"
    written = manifest.stat().st_mtime_ns
    dm.setup("fit")  # generation is not repeated: the manifest matches
    assert manifest.stat().st_mtime_ns == written
    _check_train_batch(next(iter(dm.train_dataloader())), 2, 32, 6)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (2, 3, 32, 32)  # equal sizes: val_batch_size > 1 works


def test_train_split_smaller_than_batch(tmp_path):
    dm = SyntheticDataModule(
        str(tmp_path / "syn"), num_train=3, num_val=1, image_size=32, batch_size=4, num_workers=0
    )
    with pytest.raises(ValueError, match=r"training split has 3 images, fewer than batch_size=4"):
        dm.setup("fit")


def test_predict_over_folder_and_errors(tmp_path):
    make_voc(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, size in enumerate([(20, 31), (25, 18)]):
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(photos / f"p{i}.jpg")
    dm = VOCDataModule(str(tmp_path), train_split="train", predict_path=str(photos / "*.jpg"), num_workers=0)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [b["name"] for b in batches] == [["p0"], ["p1"]]
    assert batches[0]["image"].shape == (1, 3, 20, 31) and batches[0]["path"][0].endswith("p0.jpg")
    with pytest.raises(ValueError, match="predict_path"):
        VOCDataModule(str(tmp_path), train_split="train").setup("predict")
    with pytest.raises(FileNotFoundError, match="No images found"):
        VOCDataModule(str(tmp_path), train_split="train", predict_path=str(photos / "*.png")).setup("predict")


def test_normalization_reaches_the_batches(tmp_path):
    make_voc(tmp_path)
    dm = VOCDataModule(str(tmp_path), train_split="train", normalization=CAFFE_BGR, num_workers=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    raw = np.asarray(
        Image.open(tmp_path / "VOCdevkit/VOC2012/JPEGImages" / f"{VOC_VAL[0]}.jpg").convert("RGB")
    )
    np.testing.assert_array_equal(CAFFE_BGR.denormalize(batch["image"][0]).permute(1, 2, 0).numpy(), raw)


def test_loader_defaults_and_hparams(tmp_path):
    make_voc(tmp_path)
    dm = VOCDataModule(str(tmp_path), train_split="train", batch_size=3)
    assert dm.num_workers >= 1  # None -> the cores per GPU
    assert dm.hparams["batch_size"] == 3 and dm.hparams["root"] == str(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        VOCDataModule(str(tmp_path), batch_size=0)
    with pytest.raises(RuntimeError, match=r"setup\('fit'\) must run"):
        dm.train_dataloader()
    assert issubclass(VOCDataModule, SegmentationDataModule)
    dm.setup("fit")
    assert dm.train_dataloader().persistent_workers  # on by default with workers
    for workers, persistent in ((1, False), (0, True)):
        other = VOCDataModule(
            str(tmp_path), "train", batch_size=2, num_workers=workers, persistent_workers=persistent
        )
        other.setup("fit")
        assert other.train_dataloader().persistent_workers is False, (workers, persistent)


@pytest.mark.parametrize(
    "cls",
    [
        VOCDataModule,
        CityscapesDataModule,
        FolderDataModule,
        SyntheticDataModule,
        ADE20KDataModule,
        PascalContextDataModule,
        COCOStuffDataModule,
    ],
)
def test_lightning_cli_can_configure(cls, tmp_path):
    """jsonargparse (LightningCLI's parser) reads every init argument, Normalization included."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    args = [
        "--data.root",
        str(tmp_path),
        "--data.scale_range",
        "[0.75, 1.25]",
        "--data.normalization.bgr",
        "true",
    ]
    if cls is FolderDataModule:
        args += ["--data.class_names", "[bg, fg]"]
    cfg = parser.parse_args(args)
    assert tuple(cfg.data.scale_range) == (0.75, 1.25) and cfg.data.normalization.bgr is True
    make_voc(tmp_path)
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, cls) and dm.normalization.bgr is True and dm.scale_range == (0.75, 1.25)


def test_datasets_pickle_for_spawned_workers(tmp_path):
    import pickle

    make_voc_sbd(tmp_path)
    dm = VOCDataModule(str(tmp_path), **SMALL)
    dm.setup("fit")
    clone = pickle.loads(pickle.dumps(dm.train_dataset))
    assert clone.names == dm.train_dataset.names and clone[0]["image"].shape == (3, 24, 24)


def test_runs_inside_a_lightning_trainer(tmp_path):
    """prepare_data/setup/loaders through Lightning itself, with a 1x1-conv model (fit, validate, predict)."""
    import lightning.pytorch as pl
    from torch import nn

    class Tiny(pl.LightningModule):
        def __init__(self, num_classes):
            super().__init__()
            self.conv = nn.Conv2d(3, num_classes, 1)
            self.seen = []

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.conv(batch["image"]), batch["mask"], ignore_index=255)

        def validation_step(self, batch, _):
            self.seen.append(tuple(batch["mask"].shape))

        def predict_step(self, batch, _):
            return self.conv(batch["image"]).argmax(1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((20, 28, 3), np.uint8)).save(photos / "p.png")
    dm = SyntheticDataModule(
        str(tmp_path / "syn"), num_train=4, num_val=2, image_size=32, batch_size=2, crop_size=32,
        num_workers=0, predict_path=str(photos),
    )  # fmt: skip
    model = Tiny(dm.num_classes)
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    assert (tmp_path / "syn" / "synthetic.json").is_file() and model.seen == [(2, 32, 32)]
    (prediction,) = trainer.predict(model, datamodule=dm)
    assert prediction.shape == (1, 20, 28)


@pytest.mark.parametrize(
    ("cores", "gpus", "expected"), [(2, 0, 2), (16, 0, 4), (16, 1, 12), (16, 2, 8), (64, 8, 8), (4, 8, 1)]
)
def test_default_workers_share_the_cores_among_gpus_and_stay_few_without(monkeypatch, cores, gpus, expected):
    from deeplab_lit.data.loaders import default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert default_num_workers() == expected


def test_normalize_on_device_hands_over_uint8_and_the_model_sees_the_same_batches(tmp_path):
    from lightning.pytorch import Trainer

    from deeplab_lit import DeepLabV1

    common = dict(
        root=str(tmp_path / "syn"), num_train=4, num_val=3, image_size=32, batch_size=2, crop_size=24,
        num_workers=0, val_batch_size=1,
    )  # fmt: skip
    plain, on_device = SyntheticDataModule(**common), SyntheticDataModule(**common, normalize_on_device=True)
    plain.prepare_data()
    batches = []
    for dm in (plain, on_device):
        torch.manual_seed(0)  # same augmentation seed (drawn from torch at setup) and the same shuffle
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
    assert batches[1]["image"].dtype == torch.uint8 and batches[1]["image"].is_contiguous()
    moved = on_device.on_after_batch_transfer(batches[1], 0)
    torch.testing.assert_close(moved["image"], batches[0]["image"], rtol=0, atol=0)
    assert torch.equal(moved["mask"], batches[0]["mask"])
    # Through a Trainer (the hook runs after the transfer): the same validation scores, exactly.
    module = DeepLabV1(num_classes=6, backbone="resnet18", output_stride=16)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (expected,) = trainer.validate(module, datamodule=plain)
    (result,) = trainer.validate(module, datamodule=on_device)
    assert result == expected


def test_predict_needs_no_voc_on_the_machine(tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 28, 3), np.uint8)).save(photo)
    dm = VOCDataModule(str(tmp_path / "no_voc_here"), predict_path=str(photo), num_workers=0)
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    assert batch["image"].shape == (1, 3, 20, 28)


@pytest.mark.parametrize(
    ("cls", "changed"),
    [
        (VOCDataModule, {}),
        (CityscapesDataModule, {"batch_size": 4, "crop_size": 769}),
        (FolderDataModule, {}),
        (SyntheticDataModule, {"batch_size": 16, "crop_size": 128, "val_batch_size": 16}),
        (ADE20KDataModule, {"crop_size": 512}),
        (PascalContextDataModule, {}),
        (COCOStuffDataModule, {"crop_size": 512}),
    ],
)
def test_subclasses_declare_only_their_own_options_and_the_defaults_they_change(cls, changed, tmp_path):
    """A loader option is declared once, in the base; the rest reaches it by keyword through **kwargs."""
    base = inspect.signature(SegmentationDataModule.__init__).parameters
    own = inspect.signature(cls.__init__).parameters
    assert {name: p.default for name, p in own.items() if name in base and name != "self"} == changed
    assert all(base[name].default != default for name, default in changed.items())
    assert own["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    required = {"root": str(tmp_path)} | ({"class_names": ["bg", "fg"]} if cls is FolderDataModule else {})
    dm = cls(**required, num_workers=1, pin_memory=False, persistent_workers=False, preflight=False)
    assert (dm.num_workers, dm.pin_memory, dm.persistent_workers, dm.preflight) == (1, False, False, False)
    assert (dm.batch_size, dm.crop_size) == (changed.get("batch_size", 8), changed.get("crop_size", 321))


def test_help_and_print_config_show_every_option_through_the_subclasses(capsys):
    from deeplab_lit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXPERIMENTS / "v3.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["num_workers"] is None and data["persistent_workers"] is True and data["preflight"] is True
    assert data["crop_size"] == 513 and data["train_split"] == "train_aug"  # the config's, the subclass's
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model=deeplab_lit.DeepLabV3", "--data=deeplab_lit.data.CityscapesDataModule",
              "--data.root=x", "--print_config"])  # fmt: skip
    assert exit_info.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert (data["crop_size"], data["batch_size"], data["val_batch_size"]) == (769, 4, 1)  # own, own, base
    assert data["preflight"] is True and data["normalize_on_device"] is False
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.help", "deeplab_lit.data.SyntheticDataModule"])
    shown = capsys.readouterr().out
    assert "--data.preflight" in shown and "--data.num_workers" in shown and "--data.num_train" in shown
