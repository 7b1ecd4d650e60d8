"""FolderDataModule's label options: reduce_zero_label, label_map and RGB masks with a palette."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deeplab_lit.data import FolderDataModule, PreflightError
from tests.fakes import FOLDER_COLORS, make_color_folder_dataset, make_folder_dataset, stored_and_mapped

SMALL = {"batch_size": 2, "crop_size": 24, "num_workers": 0, "val_fraction": 0.5}


def test_reduce_zero_label_and_label_map(tmp_path):
    root = make_folder_dataset(tmp_path, n=4, num_classes=3)  # values 0, 1, 2 and a 255 outline
    reduced = FolderDataModule(str(root), ["a", "b"], reduce_zero_label=True, **SMALL)
    for raw, mask in stored_and_mapped(reduced):
        np.testing.assert_array_equal(mask, np.where((raw == 0) | (raw == 255), 255, raw - 1))
    # label_map first, then reduce_zero_label: 2 -> 0 -> void; 255 mapped to 1 -> 0; 1 -> 0 kept
    relabelled = FolderDataModule(
        str(root), ["a", "b"], label_map={2: 0, 255: 1}, reduce_zero_label=True, **SMALL
    )
    for raw, mask in stored_and_mapped(relabelled):
        np.testing.assert_array_equal(
            mask, np.select([raw == 2, raw == 255, raw == 0], [255, 0, 255], raw - 1)
        )
    plain = FolderDataModule(str(root), ["a", "b", "c"], label_map={1: 255}, **SMALL)
    for raw, mask in stored_and_mapped(plain):
        np.testing.assert_array_equal(mask, np.where(raw == 1, 255, raw))  # 255 stays void: not mapped
    with pytest.raises(PreflightError, match=r"holds values \[2\] outside the classes"):
        FolderDataModule(str(root), ["a", "b"], **SMALL).setup("validate")  # without the map, 2 is no class


def test_palette_list_or_file_decodes_colour_masks(tmp_path):
    root = make_color_folder_dataset(tmp_path, n=4)
    colors = np.array(FOLDER_COLORS, np.uint8)
    names = ["background", "road", "grass", "sky"]
    (root / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in FOLDER_COLORS))
    for palette in ([list(c) for c in FOLDER_COLORS], "palette.txt", str(root / "palette.txt")):
        dm = FolderDataModule(str(root), names, palette=palette, **SMALL)
        assert dm.palette[:4].tolist() == colors.tolist()  # predictions are written in the same colours
        for raw, mask in stored_and_mapped(dm):
            np.testing.assert_array_equal(colors[mask], raw)
            assert len(np.unique(mask)) > 1
    ignored = FolderDataModule(str(root), names[:3], palette="palette.txt", label_map={3: 255}, **SMALL)
    for raw, mask in stored_and_mapped(ignored):
        assert (mask[(raw == FOLDER_COLORS[3]).all(-1)] == 255).all()


def test_an_unknown_colour_is_named_with_its_file(tmp_path):
    root = make_color_folder_dataset(tmp_path, n=4)
    dm = FolderDataModule(str(root), ["a", "b", "c", "d"], palette=[list(c) for c in FOLDER_COLORS], **SMALL)
    dm.setup("validate")
    bad = dm.val_dataset.masks[0]
    pixels = np.array(Image.open(bad))
    pixels[1, 1] = (10, 20, 30)
    Image.fromarray(pixels).save(bad)
    with pytest.raises(PreflightError, match=r"holds the colour\(s\) \(10, 20, 30\)") as err:
        dm.setup("validate")
    assert str(bad) in str(err.value)
    with pytest.raises(PreflightError, match=r"mode 'RGB'.*palette"):
        FolderDataModule(str(root), ["a", "b", "c", "d"], **SMALL).setup("validate")  # colours, no palette


def test_bad_label_options_fail_at_construction(tmp_path):
    root = make_folder_dataset(tmp_path, n=2)
    with pytest.raises(ValueError, match=r"lists the colour \[0, 0, 0\] twice"):
        FolderDataModule(str(root), ["a"], palette=[[0, 0, 0], [0, 0, 0]])
    with pytest.raises(FileNotFoundError, match=r"Palette file not found: .*colours\.txt"):
        FolderDataModule(str(root), ["a"], palette="colours.txt")
    with pytest.raises(ValueError, match=r"0\.\.255.*300: 1"):
        FolderDataModule(str(root), ["a"], label_map={300: 1})


def test_the_cli_parser_reads_the_label_options(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FolderDataModule, "data")
    root = make_color_folder_dataset(tmp_path, n=2)
    cfg = parser.parse_args(
        ["--data.root", str(root), "--data.class_names", "[a, b, c]", "--data.label_map", "{3: 255}",
         "--data.palette", "[[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 255, 255]]",
         "--data.reduce_zero_label", "false"]
    )  # fmt: skip
    dm = parser.instantiate_classes(cfg).data
    assert dm.label_map is not None and dm.label_map.colors is not None
    assert dm.label_map(np.array([[[255, 255, 255], [0, 255, 0]]], np.uint8), "x").tolist() == [[255, 2]]
