"""The visualize helpers: palette colours, overlays, side-by-side panels, the confusion-matrix figure."""

import numpy as np
import pytest

from deeplab_lit.data import voc_palette
from deeplab_lit.visualize import colorize, confusion_matrix_figure, figure_to_array, overlay, side_by_side

PALETTE = voc_palette()


def test_colorize_maps_every_label_through_the_palette_including_void():
    mask = np.array([[0, 1], [15, 255]])
    rgb = colorize(mask, PALETTE)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 1] == PALETTE[1]).all() and (rgb[1, 1] == (224, 224, 192)).all()
    with pytest.raises(ValueError, match="palette has 21 colours"):
        colorize(np.array([[30]]), PALETTE[:21])


def test_overlay_blends_by_alpha_and_leaves_ignored_pixels_alone():
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[1, 1, 255], [2, 2, 2]])
    assert (overlay(image, mask, PALETTE, alpha=0.0) == image).all()
    assert (overlay(image, mask, PALETTE, alpha=1.0) == colorize(mask, PALETTE)).all()
    half = overlay(image, mask, PALETTE, alpha=0.5, ignore_index=255)
    assert (half[0, 2] == 100).all()
    assert (half[0, 0] == np.rint(0.5 * 100 + 0.5 * PALETTE[1])).all()
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, mask[:1], PALETTE)


def test_side_by_side_and_confusion_figure_render_pictures():
    a, b = np.zeros((5, 4, 3), np.uint8), np.ones((5, 6, 3), np.uint8)
    assert side_by_side([a, b], gap=2).shape == (5, 12, 3)
    with pytest.raises(ValueError, match="one height"):
        side_by_side([a, np.zeros((4, 4, 3), np.uint8)])
    figure = confusion_matrix_figure(np.array([[5, 1], [0, 3]]), ["bg", "cat"])
    picture = figure_to_array(figure)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3 and picture.std() > 0
    with pytest.raises(ValueError, match="2 class names"):
        confusion_matrix_figure(np.zeros((3, 3)), ["bg", "cat"])
