"""PASCAL-Context on fakes in the converted VOC 2010 layout: 60 classes (background 0) or 59 (void)."""

from __future__ import annotations

import numpy as np
import pytest

from deeplab_lit.data import PASCAL_CONTEXT_59_CLASSES, PascalContextDataModule, PreflightError
from tests.fakes import PASCAL_CONTEXT_VALUES, make_pascal_context, spoil_mask, stored_and_mapped

SMALL = {"batch_size": 2, "crop_size": 24, "num_workers": 0}


@pytest.mark.parametrize(
    ("num_classes", "expected"),
    [
        (60, {0: 0, 1: 1, 30: 30, 59: 59, 255: 255}),  # background kept as class 0
        (59, {0: 255, 1: 0, 30: 29, 59: 58, 255: 255}),  # background void, the rest shifted down
    ],
)
def test_sixty_or_fifty_nine_classes(tmp_path, num_classes, expected):
    make_pascal_context(tmp_path)
    dm = PascalContextDataModule(str(tmp_path), num_classes=num_classes, **SMALL)
    assert dm.num_classes == num_classes and len(set(dm.class_names)) == num_classes
    assert dm.class_names[-1] == "wood" and dm.class_names[expected[1]] == "aeroplane"
    assert dm.class_names[0] == ("background" if num_classes == 60 else "aeroplane")
    for raw, mask in stored_and_mapped(dm):
        assert set(np.unique(raw)) == {*PASCAL_CONTEXT_VALUES, 255}  # every value is there to check
        for value, target in expected.items():
            assert (mask[raw == value] == target).all(), (value, target)


def test_a_value_past_59_stops_the_preflight_naming_the_file(tmp_path):
    make_pascal_context(tmp_path)
    bad = tmp_path / "VOCdevkit" / "VOC2010" / "SegmentationClassContext" / "2010_000001.png"
    spoil_mask(bad, 60)
    for num_classes in (60, 59):
        dm = PascalContextDataModule(str(tmp_path), num_classes=num_classes, **SMALL)
        with pytest.raises(PreflightError, match=r"label values \[60\].*0\.\.59, 255") as err:
            dm.setup("validate")
        assert str(bad) in str(err.value)


def test_bad_num_classes_and_missing_data(tmp_path):
    assert len(PASCAL_CONTEXT_59_CLASSES) == 59
    with pytest.raises(ValueError, match=r"must be 60 .* or 59 .*got 21"):
        PascalContextDataModule(str(tmp_path), num_classes=21)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)SegmentationContext/val\.txt.*SegmentationClassContext"
    ):
        PascalContextDataModule(str(tmp_path), **SMALL).setup("validate")
