"""COCO-Stuff 164k on fakes in the stuffthingmaps layout: 171 classes, the 11 unused ids void."""

from __future__ import annotations

import numpy as np
import pytest

from deeplab_lit.data import COCO_STUFF_CLASSES, COCOStuffDataModule, PreflightError
from tests.fakes import COCO_STUFF_VALUES, make_coco_stuff, spoil_mask, stored_and_mapped

SMALL = {"batch_size": 2, "crop_size": 24, "num_workers": 0}
#: Stored value (COCO id - 1) -> class: things keep theirs up to the first unused id (11), then shift.
EXPECTED = {0: 0, 10: 10, 11: 255, 12: 11, 25: 255, 90: 255, 91: 80, 181: 170, 255: 255}


def test_classes_splits_and_the_label_map(tmp_path):
    make_coco_stuff(tmp_path, {"train2017": 3, "val2017": 2})
    dm = COCOStuffDataModule(str(tmp_path), **SMALL)
    assert dm.num_classes == 171 == len(set(dm.class_names)) and COCOStuffDataModule("x").crop_size == 512
    names = [COCO_STUFF_CLASSES[EXPECTED[v]] for v in (0, 10, 12, 91, 181)]
    assert names == ["person", "fire hydrant", "stop sign", "banner", "wood"]  # COCO ids 1, 11, 13, 92, 182
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataset) == 3 and dm.test_dataset.names == dm.val_dataset.names  # test = val2017
    for raw, mask in stored_and_mapped(dm):
        assert set(np.unique(raw)) == {*COCO_STUFF_VALUES, 255}  # every value is there to check
        for value, target in EXPECTED.items():
            assert (mask[raw == value] == target).all(), (value, target)


def test_a_value_past_181_stops_the_preflight_and_a_missing_mask_is_named(tmp_path):
    make_coco_stuff(tmp_path, {"train2017": 2, "val2017": 1})
    bad = next((tmp_path / "annotations" / "val2017").glob("*.png"))
    spoil_mask(bad, 182)
    with pytest.raises(PreflightError, match=r"label values \[182\].*0\.\.181, 255") as err:
        COCOStuffDataModule(str(tmp_path), **SMALL).setup("validate")
    assert str(bad) in str(err.value)
    (tmp_path / "annotations" / "train2017" / "000000000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)mask files.*000000000001\.png"):
        COCOStuffDataModule(str(tmp_path), **SMALL).setup("fit")
