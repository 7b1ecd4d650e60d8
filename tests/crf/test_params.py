from __future__ import annotations

import dataclasses

import pytest

from deeplab_lit.crf import PRESETS, CRFParams


def test_defaults_are_the_deeplab_v2_preset():
    params = CRFParams()
    assert params == PRESETS["deeplab_v2"] == CRFParams.from_preset("deeplab_v2")
    assert (params.iterations, params.pos_w, params.pos_xy_std) == (10, 3.0, 1.0)
    assert (params.bi_w, params.bi_xy_std, params.bi_rgb_std) == (4.0, 67.0, 3.0)


def test_v1_largefov_preset():
    params = CRFParams.from_preset("deeplab_v1_largefov")
    assert dataclasses.astuple(params) == (10, 3.0, 3.0, 4.0, 121.0, 5.0)


def test_params_are_frozen_and_numbers_become_floats():
    params = CRFParams(5, 1, 2, 3, 4, 5)
    assert isinstance(params.pos_w, float) and params.iterations == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.iterations = 3  # type: ignore[misc]


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown CRF preset 'deeplab_v9'.*deeplab_v1_largefov.*deeplab_v2"):
        CRFParams.from_preset("deeplab_v9")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iterations": 0}, "iterations must be a positive int, got 0"),
        ({"iterations": 2.5}, "iterations must be a positive int"),
        ({"pos_xy_std": 0}, "pos_xy_std is a standard deviation and must be > 0, got 0"),
        ({"bi_rgb_std": -3}, "bi_rgb_std is a standard deviation"),
        ({"bi_w": -1}, "bi_w is a kernel weight and must be >= 0, got -1"),
        ({"pos_w": float("nan")}, "pos_w must be finite"),
        ({"bi_xy_std": "67"}, "bi_xy_std must be a number"),
    ],
)
def test_bad_params_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CRFParams(**kwargs)
