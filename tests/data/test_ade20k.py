"""ADE20K on fakes in the SceneParsing layout: 150 classes, 0 ("other") -> 255, v -> v - 1, errors."""

from __future__ import annotations

import numpy as np
import pytest

from deeplab_lit.data import ADE20K_CLASSES, ADE20KDataModule, PreflightError
from tests.fakes import ADE20K_VALUES, make_ade20k, spoil_mask, stored_and_mapped

SMALL = {"batch_size": 2, "crop_size": 24, "num_workers": 0}


def test_classes_splits_and_the_label_map(tmp_path):
    make_ade20k(tmp_path, {"training": 3, "validation": 2})
    dm = ADE20KDataModule(str(tmp_path), **SMALL)
    assert dm.num_classes == 150 == len(set(dm.class_names)) and ADE20KDataModule("x").crop_size == 512
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[12], ADE20K_CLASSES[149]) == ("wall", "person", "flag")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataset) == 3 and dm.val_dataset.names == dm.test_dataset.names  # test = validation
    for raw, mask in stored_and_mapped(dm):
        assert set(np.unique(raw)) == set(ADE20K_VALUES)  # every value is there to check
        for value, expected in ((0, 255), (1, 0), (13, 12), (150, 149)):  # "other" void; wall, person, flag
            assert (mask[raw == value] == expected).all(), (value, expected)


def test_a_value_past_150_stops_the_preflight_naming_the_file(tmp_path):
    make_ade20k(tmp_path, {"training": 2, "validation": 1})
    bad = next((tmp_path / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))
    spoil_mask(bad, 151)
    with pytest.raises(PreflightError, match=r"label values \[151\].*0\.\.150") as err:
        ADE20KDataModule(str(tmp_path), **SMALL).setup("validate")
    assert str(bad) in str(err.value)


def test_missing_data_shows_the_layout_and_where_to_get_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"(?s)ADEChallengeData2016/images/.*ADEChallengeData2016\.zip"
    ):
        ADE20KDataModule(str(tmp_path), **SMALL).setup("validate")
    make_ade20k(tmp_path / "outer")
    with pytest.raises(FileNotFoundError, match="looks like the ADEChallengeData2016 folder itself"):
        ADE20KDataModule(str(tmp_path / "outer" / "ADEChallengeData2016"), **SMALL).setup("validate")
