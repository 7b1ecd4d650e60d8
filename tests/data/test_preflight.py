"""Preflight: every bad file of the splits a stage uses stops setup with one error listing them all."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab_lit.data import (
    CityscapesDataModule,
    FolderDataModule,
    PreflightError,
    SegmentationDataModule,
    SyntheticDataModule,
    VOCDataModule,
)
from deeplab_lit.data import preflight as pf
from deeplab_lit.data.folder import FolderDataset, index_images
from tests.fakes import (
    VOC_TRAIN,
    VOC_VAL,
    make_cityscapes,
    make_folder_dataset,
    make_voc_sbd,
    save_palette_png,
)

VOC = Path("VOCdevkit", "VOC2012")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Each test caches into its own folder (never the user's ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def summary(caplog, monkeypatch):
    """The preflight's one-line summary goes through Lightning's logger, which does not propagate."""
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    return caplog


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def mask_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size[1], image.size[0]


def break_voc(root: Path) -> dict[str, tuple[Path, str]]:
    """Spoil five files of the fake VOC + SBD; returns role-tagged (path, expected reason) per file."""
    voc = root / VOC
    train_png, val_png = voc / "SegmentationClass" / f"{VOC_TRAIN[1]}.png", voc / "SegmentationClass"
    truncate(voc / "JPEGImages" / f"{VOC_TRAIN[0]}.jpg")  # train
    save_palette_png(train_png, np.full(mask_size(train_png), 30, np.uint8))  # train: class 30 of 21
    (root / "benchmark_RELEASE/dataset/cls/2008_000100.mat").write_bytes(b"not a MATLAB file")  # train (SBD)
    rgb = val_png / f"{VOC_VAL[1]}.png"
    Image.fromarray(np.zeros((*mask_size(rgb), 3), np.uint8)).save(rgb)  # val: RGB mask
    truncate(val_png / f"{VOC_VAL[2]}.png")  # val: truncated PNG
    return {
        "train": [
            (voc / "JPEGImages" / f"{VOC_TRAIN[0]}.jpg", "truncated"),
            (train_png, r"values [30] outside the classes"),
            (root / "benchmark_RELEASE/dataset/cls/2008_000100.mat", "Could not read SBD mask"),
        ],
        "val": [(rgb, "mode 'RGB'"), (val_png / f"{VOC_VAL[2]}.png", "Could not decode")],
    }


def _assert_listed(message: str, broken: list[tuple[Path, str]]) -> None:
    lines = message.splitlines()
    for path, reason in broken:
        assert any(str(path) in line and reason in line for line in lines), (path, reason, message)


def test_every_bad_file_of_the_stages_splits_is_listed_in_one_error(tmp_path):
    make_voc_sbd(tmp_path)
    broken = break_voc(tmp_path)
    dm = VOCDataModule(str(tmp_path), batch_size=2, num_workers=0)
    with pytest.raises(
        PreflightError, match=r"found 5 bad image/mask pair\(s\) among 8 train \+ 3 val"
    ) as err:
        dm.setup("fit")
    _assert_listed(str(err.value), broken["train"] + broken["val"])
    with pytest.raises(PreflightError, match=r"found 2 bad .* among 3 val;") as err:
        dm.setup("validate")  # validate reads only val: the train files are not its business
    _assert_listed(str(err.value), broken["val"])
    assert "JPEGImages" not in str(err.value)
    with pytest.raises(PreflightError, match=r"among 3 test;"):
        dm.setup("test")


def test_a_good_data_set_passes_with_one_summary_line(tmp_path, summary):
    make_voc_sbd(tmp_path)
    VOCDataModule(str(tmp_path), batch_size=2, num_workers=0).setup("fit")
    (line,) = [r.getMessage() for r in summary.records if "Preflight" in r.getMessage()]
    assert line.startswith("Preflight: all 8 train + 3 val image/mask pairs good (0 cached) in ")
    assert line.endswith(" s")


def test_the_next_run_reads_only_what_changed_and_the_data_root_is_not_written(tmp_path, cache_home):
    make_voc_sbd(tmp_path / "voc")
    before = sorted(p for p in (tmp_path / "voc").rglob("*"))
    dm = VOCDataModule(str(tmp_path / "voc"), batch_size=2, num_workers=0)
    dm.setup("fit")
    assert sorted(p for p in (tmp_path / "voc").rglob("*")) == before  # a read-only root works
    assert len(list((cache_home / "deeplab_lit" / "preflight").glob("*.json"))) == 2  # train, val
    splits = {"train": dm.train_dataset, "val": dm.val_dataset}
    checks = pf.check_splits(splits, num_workers=0)
    assert checks["train"].cached == 8 and checks["val"].cached == 3
    assert checks["val"].sizes == [mask_size(p) for p in dm.val_dataset.masks]  # (H, W) kept in the cache
    mask = tmp_path / "voc" / VOC / "SegmentationClass" / f"{VOC_VAL[0]}.png"
    save_palette_png(mask, np.full(mask_size(mask), 99, np.uint8))  # new content and mtime
    with pytest.raises(PreflightError, match=r"found 1 bad") as err:
        pf.check_splits(splits, num_workers=0)
    assert str(mask) in str(err.value)


def test_the_verdict_depends_on_the_number_of_classes(tmp_path):
    root = make_folder_dataset(tmp_path, n=5, num_classes=3)  # every mask holds classes 0, 1 and 2
    FolderDataModule(str(root), ["bg", "a", "b"], val_fraction=0.2, batch_size=2, num_workers=0).setup("fit")
    two = FolderDataModule(str(root), ["bg", "a"], val_fraction=0.2, batch_size=2, num_workers=0)
    with pytest.raises(PreflightError, match=r"found 5 bad .*\n.*holds values \[2\] outside the classes"):
        two.setup("fit")  # same files, same cache folder: not taken from the 3-class verdicts


def test_cityscapes_masks_are_checked_after_the_label_map(tmp_path):
    root = make_cityscapes(tmp_path, {"train": 2, "val": 2})  # raw labelIds up to 33 map into 0..18
    dm = CityscapesDataModule(str(root), batch_size=2, crop_size=16, num_workers=0)
    dm.setup("fit")
    trainval = CityscapesDataModule(str(root), "trainval", batch_size=2, crop_size=16, num_workers=0)
    trainval.setup("fit")  # train = ConcatDataset(train, val): sizes in the concatenation's order
    checks = pf.check_splits({"train": trainval.train_dataset}, num_workers=0)
    masks = [m for part in trainval.train_dataset.datasets for m in part.masks]
    assert checks["train"].sizes == [mask_size(m) for m in masks] and checks["train"].cached == 4
    bad = sorted((root / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    Image.fromarray(np.full(mask_size(bad), 40, np.uint8), mode="L").save(bad)  # labelId 40 does not exist
    with pytest.raises(
        PreflightError, match=r"label values \[40\] that the label map does not define"
    ) as err:
        dm.setup("validate")
    assert str(bad) in str(err.value)
    with pytest.raises(PreflightError, match=r"found 2 bad .* among 4 train \+ 2 val") as err:
        trainval.setup("fit")  # the val mask is in both splits
    assert f"[train] Mask {bad}" in str(err.value) and f"[val] Mask {bad}" in str(err.value)


def test_val_batch_size_above_one_needs_validation_images_of_one_size(tmp_path):
    make_voc_sbd(tmp_path)  # the fake images have random sizes
    dm = VOCDataModule(str(tmp_path), train_split="train", val_batch_size=2, num_workers=0)
    with pytest.raises(
        ValueError, match=r"val_batch_size=2, but the val images differ in size .*val_batch_size: 1"
    ):
        dm.setup("validate")
    dm = SyntheticDataModule(str(tmp_path / "syn"), num_train=4, num_val=3, image_size=32, num_workers=0)
    dm.setup("validate")  # one size: val_batch_size 16 is fine


def test_preflight_false_leaves_the_bad_file_to_the_loader(tmp_path):
    make_voc_sbd(tmp_path)
    truncate(tmp_path / VOC / "JPEGImages" / f"{VOC_VAL[0]}.jpg")
    dm = VOCDataModule(str(tmp_path), batch_size=2, num_workers=0, preflight=False)
    dm.setup("validate")
    with pytest.raises(ValueError, match="truncated"):
        next(iter(dm.val_dataloader()))


def test_worker_processes_find_what_one_process_finds(tmp_path, monkeypatch):
    root = make_folder_dataset(tmp_path, n=9, num_classes=2)
    truncate(root / "images" / "img_002.jpg")
    truncate(root / "masks" / "img_007.png")
    split = FolderDataset(
        index_images(root / "images"), [f"img_{i:03d}" for i in range(9)], root / "masks", 2
    )
    monkeypatch.setattr(pf, "POOL_MIN_PAIRS", 2)  # use the pool even for nine pairs
    found = []
    for workers in (0, 2):
        with pytest.raises(PreflightError) as err:
            pf.check_splits({"val": split}, num_workers=workers, write_cache=False)
        found.append(str(err.value))
    assert found[0] == found[1] and "img_002.jpg" in found[0] and "img_007.png" in found[0]


def test_ddp_processes_each_read_a_share_and_raise_the_same_error(tmp_path, cache_home):
    """Two ranks (threads here, torch.distributed in a real run) exchange verdicts through ``gather``."""
    root = make_folder_dataset(tmp_path, n=6, num_classes=2)
    stems = [f"img_{i:03d}" for i in range(6)]
    truncate(root / "images" / "img_002.jpg")  # rank 0's share: items 0, 2, 4
    truncate(root / "masks" / "img_003.png")  # rank 1's: 1, 3, 5
    barrier, shared = threading.Barrier(2), [None, None]
    errors: list[str | None] = [None, None]

    def gather_of(rank):
        def gather(obj):
            shared[rank] = obj
            barrier.wait()
            return list(shared)

        return gather

    def run(rank):
        split = FolderDataset(index_images(root / "images"), stems, root / "masks", 2)
        try:
            pf.check_splits(
                {"val": split}, 0, rank=rank, world_size=2, gather=gather_of(rank), write_cache=rank == 0
            )
        except PreflightError as err:
            errors[rank] = str(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors[0] is not None and errors[0] == errors[1]
    assert "img_002.jpg" in errors[0] and "img_003.png" in errors[0] and "found 2 bad" in errors[0]
    (cache,) = (cache_home / "deeplab_lit" / "preflight").glob("*.json")
    assert len(pf.load_cache(cache)) == 4  # rank 0 wrote the good pairs of both shards


def test_an_unwritable_cache_folder_is_a_warning_not_an_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "sub"))  # cannot be made, even by root
    make_voc_sbd(tmp_path / "voc")
    dm = VOCDataModule(str(tmp_path / "voc"), batch_size=2, num_workers=0)
    with pytest.warns(UserWarning, match="Preflight results not cached"):
        dm.setup("fit")


def test_a_long_list_goes_to_a_file_the_message_names(tmp_path, monkeypatch):
    root = make_folder_dataset(tmp_path, n=4, num_classes=3)
    monkeypatch.setattr(pf, "MAX_LISTED", 2)
    dm = FolderDataModule(str(root), ["bg"], val_fraction=0.5, batch_size=2, num_workers=0)
    with pytest.raises(PreflightError, match=r"found 4 bad") as err:
        dm.setup("fit")
    listed = Path(str(err.value).rsplit("all listed in ", 1)[1])
    assert "... and 2 more" in str(err.value) and len(listed.read_text().splitlines()) == 4


def test_a_split_the_preflight_cannot_read_is_refused(tmp_path):
    class Custom(SegmentationDataModule):
        class_names = ["bg", "fg"]

        def build_split(self, role, transform):
            return list(range(4))  # a dataset of another kind

    with pytest.raises(TypeError, match=r"SegmentationDataset splits; got list.*preflight: false"):
        Custom(batch_size=2, num_workers=0).setup("validate")
    Custom(batch_size=2, num_workers=0, preflight=False).setup("validate")


def test_a_crop_larger_than_every_training_image_is_a_warning_before_training(tmp_path, recwarn):
    root = make_folder_dataset(tmp_path, n=6, num_classes=2)
    options = {"val_fraction": 0.5, "batch_size": 2, "num_workers": 0, "scale_range": (0.5, 1.5)}
    FolderDataModule(str(root), ["bg", "a"], crop_size=16, **options).setup("fit")
    assert not [w for w in recwarn if "crop_size" in str(w.message)]
    dm = FolderDataModule(str(root), ["bg", "a"], crop_size=1000, **options)
    with pytest.warns(
        UserWarning, match=r"crop_size=1000 is larger than every train image, even scaled by 1\.5"
    ) as caught:
        dm.setup("fit")
    sizes = [size for size in pf.check_splits({"train": dm.train_dataset}, 0)["train"].sizes if size]
    h, w = max(sizes, key=lambda size: size[0] * size[1])
    # Only our warning: albumentations at its floor (1.4.22) adds a DeprecationWarning of its own.
    (ours,) = [str(w.message) for w in caught if "crop_size=1000" in str(w.message)]
    assert f"the largest, {w}x{h} (WxH), fills at most" in ours


def direct_class_counts(dataset) -> tuple[list[int], list[int]]:
    """Pixels per class, and labelled pixels of the masks holding each class, counted from the files."""
    pixels, image_pixels = np.zeros(256, np.int64), np.zeros(256, np.int64)
    for path in dataset.masks:
        values = np.asarray(dataset.load_mask(path))
        labelled = values[values != 255]
        counts = np.bincount(labelled, minlength=256)
        pixels += counts
        image_pixels += np.where(counts > 0, labelled.size, 0)
    last = int(np.nonzero(pixels)[0].max()) + 1
    return pixels[:last].tolist(), image_pixels[:last].tolist()


def test_the_training_split_class_counts_equal_the_masks_and_survive_the_cache(tmp_path):
    make_voc_sbd(tmp_path)
    dm = VOCDataModule(str(tmp_path), batch_size=2, num_workers=0)
    dm.setup("fit")
    expected = direct_class_counts(dm.train_dataset)
    assert dm.class_counts is not None
    assert (dm.class_counts.pixels, dm.class_counts.image_pixels) == expected
    again = VOCDataModule(str(tmp_path), batch_size=2, num_workers=0)
    again.setup("fit")  # every verdict from the cache: the counts too
    assert (again.class_counts.pixels, again.class_counts.image_pixels) == expected
    checks = pf.check_splits({"train": again.train_dataset}, num_workers=0)
    assert checks["train"].cached == 8
