"""Cityscapes on fakes: pairing, labelId -> trainId (void = 255), palette, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deeplab_lit.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CityscapesDataset,
    cityscapes_palette,
    label_id_to_train_id,
)
from tests.fakes import make_cityscapes


def test_label_map_matches_the_official_table():
    lut = label_id_to_train_id()
    assert (
        len(CITYSCAPES_CLASSES) == 19
        and CITYSCAPES_CLASSES[0] == "road"
        and CITYSCAPES_CLASSES[18] == "bicycle"
    )
    assert all(lut[i] == 255 for i in range(7))  # unlabeled, ego vehicle, ..., ground are void
    assert lut[7] == 0 and lut[8] == 1 and lut[11] == 2 and lut[24] == 11 and lut[26] == 13 and lut[33] == 18
    assert (
        lut[9] == 255 and lut[14] == 255 and lut[29] == 255
    )  # parking, guard rail, caravan: ignored in eval
    assert lut[34] == -1 and lut[200] == -1  # not a label id
    palette = cityscapes_palette()
    assert (
        palette.shape == (256, 3)
        and palette[0].tolist() == [128, 64, 128]
        and palette[10].tolist() == [70, 130, 180]
    )


def test_dataset_pairs_and_maps_to_train_ids(tmp_path):
    root = make_cityscapes(tmp_path, {"train": 4, "val": 2})
    ds = CityscapesDataset(root, "train")
    assert len(ds) == 4
    assert all(m.name.endswith("_gtFine_labelIds.png") for m in ds.masks)
    assert [i.name.replace("_leftImg8bit.png", "") for i in ds.images] == ds.names
    lut = label_id_to_train_id()
    for i in range(len(ds)):
        item = ds[i]
        raw = np.array(Image.open(ds.masks[i]))
        assert item["mask"].shape == item["image"].shape[1:] == raw.shape
        np.testing.assert_array_equal(item["mask"].numpy(), lut[raw])
        assert (item["mask"][raw < 7] == 255).all()  # void ids 0-6 -> 255
        assert ((item["mask"] < 19) | (item["mask"] == 255)).all()


def test_missing_root_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        CityscapesDataset(tmp_path / "nowhere", "train")
    message = str(err.value)
    assert "leftImg8bit/train" in message and "gtFine" in message and "cityscapes-dataset.com" in message


def test_missing_mask_is_named(tmp_path):
    root = make_cityscapes(tmp_path, {"val": 2})
    victim = sorted((root / "gtFine" / "val").glob("*/*_labelIds.png"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        CityscapesDataset(root, "val")


def test_empty_split_folder(tmp_path):
    (tmp_path / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"leftImg8bit/val holds no"):
        CityscapesDataset(tmp_path, "val")


def test_unknown_label_id_is_named(tmp_path):
    root = make_cityscapes(tmp_path, {"val": 1})
    mask_path = next((root / "gtFine" / "val").glob("*/*_labelIds.png"))
    raw = np.array(Image.open(mask_path))
    raw[0, 0] = 40
    Image.fromarray(raw, mode="L").save(mask_path)
    with pytest.raises(ValueError, match=rf"{mask_path.name} holds label values \[40\].*0\.\.33"):
        CityscapesDataset(root, "val")[0]
