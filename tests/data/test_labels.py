"""The one label mapping: tables, reduce-zero, relabelling, chaining, palettes and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from deeplab_lit.data.labels import (
    LabelMapError,
    combined,
    describe_values,
    identity,
    lookup,
    palette_decoding,
    read_palette,
    reduce_zero_label,
    relabel,
)

RAW = np.array([[0, 1, 2], [150, 254, 255]], dtype=np.uint8)


def test_reduce_zero_label_makes_zero_void_and_shifts_the_rest():
    mapped = reduce_zero_label()(RAW, "m.png")
    assert mapped.dtype == np.uint8
    np.testing.assert_array_equal(mapped, [[255, 0, 1], [149, 253, 255]])
    with pytest.raises(LabelMapError, match=r"Mask m\.png holds label values \[254\].*0\.\.150, 255"):
        reduce_zero_label(max_value=150)(RAW, "m.png")  # ADE20K stores at most 150


def test_lookup_refuses_undefined_values_naming_file_and_values():
    table = lookup({0: 3, 1: 255, 2: 0})
    np.testing.assert_array_equal(table(RAW[:1], "a.png"), [[3, 255, 0]])
    with pytest.raises(LabelMapError, match=r"a\.png holds label values \[150, 254, 255\].*in 0\.\.2\b"):
        table(RAW, "a.png")
    wide = np.array([[0, 300]], dtype=np.uint16)  # 16-bit masks: values past the table are named too
    with pytest.raises(LabelMapError, match=r"values \[300\]"):
        identity(3)(wide, "w.png")
    with pytest.raises(ValueError, match="0..255"):
        lookup({256: 0})


def test_relabel_keeps_what_it_does_not_name_and_chains_before_reduce_zero():
    np.testing.assert_array_equal(relabel({2: 255, 255: 7})(RAW, "r.png"), [[0, 1, 255], [150, 254, 7]])
    chain = combined(label_map={0: 5, 2: 0}, reduce_zero=True)  # label_map first: 0 -> 5 -> 4, 2 -> 0 -> 255
    assert chain is not None
    np.testing.assert_array_equal(chain(RAW, "c.png"), [[4, 0, 255], [149, 253, 255]])
    assert combined() is None


def test_palette_decodes_colours_and_names_an_unknown_colour_and_its_file():
    colors = [[0, 0, 0], [255, 0, 0], [0, 128, 255]]
    mask = np.array([[[0, 128, 255], [255, 0, 0]], [[0, 0, 0], [0, 128, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(palette_decoding(colors)(mask, "p.png"), [[2, 1], [0, 2]])
    chain = combined(colors, {2: 255})  # a colour to ignore: label_map it to 255
    assert chain is not None and chain.colors is not None
    np.testing.assert_array_equal(chain(mask, "p.png"), [[255, 1], [0, 255]])
    mask[1, 1] = (1, 2, 3)
    with pytest.raises(LabelMapError, match=r"Mask p\.png holds the colour\(s\) \(1, 2, 3\) \(r, g, b\)"):
        palette_decoding(colors)(mask, "p.png")


def test_palette_file_and_its_errors(tmp_path):
    path = tmp_path / "palette.txt"
    path.write_text("# r g b\n0 0 0\n\n255, 0, 0  # road\n0 128 255\n")
    assert read_palette(path).tolist() == [[0, 0, 0], [255, 0, 0], [0, 128, 255]]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_palette(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"lists the colour \[1, 2, 3\] twice"):
        read_palette([[1, 2, 3], [1, 2, 3]])
    with pytest.raises(ValueError, match="triples"):
        read_palette([[1, 2]])
    with pytest.raises(ValueError, match="outside 0..255"):
        read_palette([[1, 2, 300]])


def test_fingerprint_tells_maps_apart_and_values_are_described_as_ranges():
    assert reduce_zero_label().fingerprint() != identity(254).fingerprint()
    assert palette_decoding([[0, 0, 0]]).fingerprint() != palette_decoding([[0, 0, 1]]).fingerprint()
    assert describe_values(np.array([5, 0, 1, 2, 255, 7, 6])) == "0..2, 5..7, 255"
