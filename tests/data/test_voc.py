"""VOC 2012 + SBD on fakes in the real layout: splits, train_aug arithmetic, masks, palette, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_lit.data.voc import (
    VOC_CLASSES,
    VOCSegmentationDataset,
    check_voc_root,
    read_sbd_mask,
    voc_palette,
    voc_split,
)
from tests.fakes import VOC_TRAIN, VOC_VAL, make_voc, make_voc_sbd, save_palette_png


def test_voc_palette_is_the_standard_colour_map():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]  # aeroplane
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[20].tolist() == [0, 64, 128]  # tvmonitor
    assert palette[255].tolist() == [224, 224, 192]  # void
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person"


def test_voc_split_items(tmp_path):
    voc = make_voc(tmp_path)
    ds = voc_split(tmp_path, "train")
    assert len(ds) == len(VOC_TRAIN) and ds.names == list(VOC_TRAIN)
    sizes = set()
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "mask", "name"}
        image, mask = item["image"], item["mask"]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
        expected = np.array(Image.open(voc / "SegmentationClass" / f"{item['name']}.png"))  # palette indices
        np.testing.assert_array_equal(mask.numpy(), expected)
        assert (mask == 255).any() and (mask < 21).logical_or(mask == 255).all()
        sizes.add(tuple(mask.shape))
    assert len(sizes) > 1  # images of different sizes, evaluated whole
    assert len(voc_split(tmp_path, "val")) == len(VOC_VAL)
    assert len(voc_split(tmp_path, "trainval")) == len(VOC_TRAIN) + len(VOC_VAL)


def test_train_aug_list_arithmetic_and_mask_sources(tmp_path):
    ids = make_voc_sbd(tmp_path)
    ds = voc_split(tmp_path, "train_aug")
    assert ds.names == ids["train_aug"]
    assert not set(ds.names) & set(ids["voc_val"])  # VOC val never leaks into training
    assert set(ids["sbd_only"]) <= set(ds.names) and set(ids["voc_train"]) <= set(ds.names)
    sources = {name: mask.suffix for name, mask in zip(ds.names, ds.masks)}
    assert all(sources[i] == ".png" for i in ids["voc_train"])  # VOC PNG wins where both exist
    assert all(sources[i] == ".mat" for i in ids["sbd_only"])
    sbd_item = ds[ds.names.index(ids["sbd_only"][0])]
    expected = read_sbd_mask(tmp_path / "benchmark_RELEASE" / "dataset" / "cls" / f"{ids['sbd_only'][0]}.mat")
    np.testing.assert_array_equal(sbd_item["mask"].numpy(), expected)
    assert sbd_item["mask"].shape == sbd_item["image"].shape[1:]


def test_sbd_mat_reader_reads_gtcls_segmentation(tmp_path):
    from tests.fakes import save_sbd_mat

    seg = np.array([[0, 3], [15, 0]], dtype=np.uint8)
    save_sbd_mat(tmp_path / "x.mat", seg)
    out = read_sbd_mask(tmp_path / "x.mat")
    np.testing.assert_array_equal(out, seg)
    (tmp_path / "bad.mat").write_bytes(b"not matlab")
    with pytest.raises(ValueError, match=r"Could not read SBD mask .*bad\.mat"):
        read_sbd_mask(tmp_path / "bad.mat")


def test_dataset_reads_any_class_count(tmp_path):
    voc = make_voc(tmp_path, num_classes=6)
    ds = VOCSegmentationDataset(voc, ["2007_000032"], num_classes=6)
    assert int(ds[0]["mask"][ds[0]["mask"] != 255].max()) < 6


# --- bad input ------------------------------------------------------------------------------------------


def test_missing_root_shows_layout_and_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        check_voc_root(tmp_path / "nowhere")
    message = str(err.value)
    assert (
        "nowhere" in message and "VOCdevkit/VOC2012/JPEGImages" in message and "SegmentationClass" in message
    )
    assert (
        "download=True" in message and "VOCtrainval_11-May-2012.tar" in message and "benchmark.tgz" in message
    )


def test_voc2012_folder_passed_as_root_gets_a_hint(tmp_path):
    voc = make_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match="looks like the VOC2012 folder itself"):
        check_voc_root(voc)


def test_train_aug_without_sbd_says_what_is_needed(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train_aug.*needs the SBD.*benchmark_RELEASE/dataset"):
        voc_split(tmp_path, "train_aug")


def test_missing_split_file_is_named(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Split file not found: .*Segmentation/test\.txt"):
        voc_split(tmp_path, "test")


def test_empty_split_is_named(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"Split file .*val\.txt is empty"):
        voc_split(tmp_path, "val")


def test_missing_listed_image_fails_at_construction(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "JPEGImages" / f"{VOC_VAL[1]}.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"(?s)1 of 3 image files listed by .*val\.txt.*{VOC_VAL[1]}\.jpg"
    ):
        voc_split(tmp_path, "val")


def test_missing_mask_fails_at_construction(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "SegmentationClass" / f"{VOC_TRAIN[2]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"(?s)mask files .*{VOC_TRAIN[2]}\.png"):
        voc_split(tmp_path, "train")


def test_mask_size_mismatch_names_both_files_and_sizes(tmp_path):
    voc = make_voc(tmp_path)
    name = VOC_TRAIN[0]
    w, h = Image.open(voc / "JPEGImages" / f"{name}.jpg").size
    save_palette_png(voc / "SegmentationClass" / f"{name}.png", np.zeros((h + 1, w), np.uint8))
    with pytest.raises(ValueError) as err:
        voc_split(tmp_path, "train")[0]
    message = str(err.value)
    assert f"{name}.png" in message and f"{name}.jpg" in message
    assert f"{w}x{h + 1}" in message and f"{w}x{h}" in message


def test_mask_values_outside_classes_are_named(tmp_path):
    voc = make_voc(tmp_path)
    name = VOC_TRAIN[1]
    w, h = Image.open(voc / "JPEGImages" / f"{name}.jpg").size
    bad = np.zeros((h, w), np.uint8)
    bad[0, :3] = [21, 40, 255]
    save_palette_png(voc / "SegmentationClass" / f"{name}.png", bad)
    with pytest.raises(ValueError, match=rf"{name}\.png holds values \[21, 40\].*expected 0\.\.20 .*255"):
        voc_split(tmp_path, "train")[1]


def test_truncated_image_in_split_is_named(tmp_path):
    voc = make_voc(tmp_path)
    path = voc / "JPEGImages" / f"{VOC_TRAIN[0]}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"Could not decode image file .*{VOC_TRAIN[0]}\.jpg"):
        voc_split(tmp_path, "train")[0]


def test_download_puts_torchvision_archives_into_the_expected_layout(tmp_path, monkeypatch):
    """download=True via torchvision's VOCSegmentation/SBDataset, archives served from disk (no network)."""
    import tarfile

    import torchvision.datasets.sbd as tv_sbd
    import torchvision.datasets.voc as tv_voc
    from torchvision.datasets.utils import extract_archive

    from deeplab_lit.data.datamodules import VOCDataModule

    source = tmp_path / "source"
    ids = make_voc_sbd(source)
    archives = {
        "VOCtrainval_11-May-2012.tar": tmp_path / "voc.tar",
        "benchmark.tgz": tmp_path / "benchmark.tgz",
    }
    with tarfile.open(archives["VOCtrainval_11-May-2012.tar"], "w") as tar:
        tar.add(source / "VOCdevkit", arcname="VOCdevkit")
    with tarfile.open(archives["benchmark.tgz"], "w:gz") as tar:
        tar.add(source / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    fetched = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False):
        fetched.append(url)
        extract_archive(str(archives[filename]), str(extract_root or download_root))

    monkeypatch.setattr(tv_voc, "download_and_extract_archive", fake_download)
    monkeypatch.setattr(tv_sbd, "download_and_extract_archive", fake_download)
    root = tmp_path / "data"
    dm = VOCDataModule(str(root), download=True, batch_size=2, crop_size=16, num_workers=0)
    dm.prepare_data()
    assert [u.rsplit("/", 1)[-1] for u in fetched] == ["VOCtrainval_11-May-2012.tar", "benchmark.tgz"]
    assert (root / "benchmark_RELEASE" / "dataset" / "cls" / f"{ids['sbd_only'][0]}.mat").is_file()
    dm.setup("fit")
    assert dm.train_dataset.names == ids["train_aug"]
    dm.prepare_data()  # everything present: nothing fetched again
    assert len(fetched) == 2
