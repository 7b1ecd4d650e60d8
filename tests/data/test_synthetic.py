"""Synthetic default data: VOC layout, determinism, skip when complete, regenerate on change, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from deeplab_lit.data import synthetic
from deeplab_lit.data.synthetic import (
    MANIFEST,
    SYNTHETIC_CLASSES,
    generate_synthetic,
    shape_class_probabilities,
)
from deeplab_lit.data.voc import VOCSegmentationDataset, read_split

SMALL = {"num_train": 6, "num_val": 3, "image_size": 48}


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_voc_layout_readable_by_voc_reader(tmp_path):
    root = generate_synthetic(tmp_path / "syn", **SMALL)
    assert read_split(root / "ImageSets" / "Segmentation" / "train.txt") == [
        f"train_{i:05d}" for i in range(6)
    ]
    assert len(read_split(root / "ImageSets" / "Segmentation" / "val.txt")) == 3
    png = Image.open(root / "SegmentationClass" / "train_00000.png")
    assert png.mode == "P" and png.size == (48, 48)
    ds = VOCSegmentationDataset(
        root, read_split(root / "ImageSets" / "Segmentation" / "train.txt"), len(SYNTHETIC_CLASSES)
    )
    labels = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 48, 48) and item["mask"].shape == (48, 48)
        labels |= set(item["mask"].unique().tolist())
    assert (
        0 in labels and 255 in labels and len(labels - {0, 255}) >= 2
    )  # several shape classes, void borders
    assert labels <= set(range(6)) | {255}


def test_deterministic_given_seed(tmp_path):
    a = _files(generate_synthetic(tmp_path / "a", **SMALL, seed=3))
    b = _files(generate_synthetic(tmp_path / "b", **SMALL, seed=3))
    c = _files(generate_synthetic(tmp_path / "c", **SMALL, seed=4))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_skips_when_complete_and_regenerates_on_change(tmp_path, monkeypatch):
    root = generate_synthetic(tmp_path / "syn", **SMALL)
    calls = []
    original = synthetic._write_split
    monkeypatch.setattr(synthetic, "_write_split", lambda *a: calls.append(a[1]) or original(*a))
    generate_synthetic(root, **SMALL)
    assert calls == []  # manifest matches: nothing rewritten
    generate_synthetic(root, **{**SMALL, "num_val": 4})
    assert calls == ["train", "val"]
    assert len(read_split(root / "ImageSets" / "Segmentation" / "val.txt")) == 4
    assert json.loads((root / MANIFEST).read_text())["num_val"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]  # no temporary folders left behind


def test_crash_leaves_no_half_data_set(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_split", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic(tmp_path / "syn", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_crash_while_regenerating_keeps_the_old_set(tmp_path, monkeypatch):
    root = generate_synthetic(tmp_path / "syn", **SMALL)
    before = _files(root)
    monkeypatch.setattr(synthetic, "_write_split", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        generate_synthetic(root, **{**SMALL, "seed": 9})
    assert _files(root) == before


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=r"mine exists and is not a synthetic data set"):
        generate_synthetic(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_colour_does_not_tell_the_class(tmp_path):
    root = generate_synthetic(tmp_path / "syn", num_train=30, num_val=1, image_size=64)
    ids = read_split(root / "ImageSets" / "Segmentation" / "train.txt")
    mean_colours = {}
    for name in ids:
        image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg")).reshape(-1, 3).astype(float)
        mask = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png")).reshape(-1)
        for label in set(np.unique(mask)) - {0, 255}:
            mean_colours.setdefault(int(label), []).append(image[mask == label].mean(0))
    spreads = [np.std(np.array(c), axis=0).mean() for c in mean_colours.values() if len(c) >= 3]
    assert len(spreads) >= 3 and min(spreads) > 30  # each class appears in widely varying colours


def test_shapes_never_touch_each_other():
    """Every shape is whole: no two shapes overlap or touch (an occluded shape could be any class)."""
    for index in range(40):
        rng = np.random.default_rng([0, index])
        _, mask = synthetic.render_sample(rng, 64, max_objects=4, void_border=False)
        labels = set(np.unique(mask).tolist()) - {0}
        for label in labels:
            grown = np.asarray(
                Image.fromarray((mask == label).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))
            )
            others = (mask != label) & (mask != 0)
            assert not (others & (grown > 127)).any(), f"sample {index}: class {label} touches another class"


def test_imbalance_makes_the_last_shape_class_rare_and_leaves_the_default_as_it_was(tmp_path):
    def shape_pixels(root):
        masks = [np.asarray(Image.open(p)) for p in sorted((root / "SegmentationClass").glob("*.png"))]
        return np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=256)[1:6]

    balanced = generate_synthetic(tmp_path / "a", num_train=40, num_val=1, image_size=32)
    skewed = generate_synthetic(tmp_path / "b", num_train=40, num_val=1, image_size=32, imbalance=30.0)
    same = generate_synthetic(tmp_path / "c", num_train=40, num_val=1, image_size=32, imbalance=1.0)
    assert "imbalance" not in json.loads((balanced / "synthetic.json").read_text())  # old manifests valid
    assert _files(balanced) == _files(same)
    counts = shape_pixels(skewed)
    assert counts[-1] * 5 < counts[0]  # cross ("the rare class") far below disc
    assert shape_pixels(balanced)[-1] * 3 > shape_pixels(balanced)[0]
    assert np.allclose(
        shape_class_probabilities(30.0)[[0, -1]] / shape_class_probabilities(30.0)[-1], [30, 1]
    )
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        generate_synthetic(tmp_path / "d", imbalance=0.5)
