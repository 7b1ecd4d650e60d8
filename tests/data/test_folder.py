"""A researcher's own folder: deterministic split, list files, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deeplab_lit.data.folder import FolderDataset, index_images, read_stem_list, split_stems
from tests.fakes import make_folder_dataset


def test_split_is_deterministic_and_disjoint():
    stems = [f"s{i}" for i in range(20)]
    train, val = split_stems(stems, 0.1, seed=0)
    assert len(val) == 2 and len(train) == 18 and not set(train) & set(val)
    assert (train, val) == split_stems(list(reversed(stems)), 0.1, seed=0)  # independent of listing order
    assert val != split_stems(stems, 0.1, seed=1)[1] or train != split_stems(stems, 0.1, seed=1)[0]
    with pytest.raises(ValueError, match="at least 2 images"):
        split_stems(["only"], 0.1, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_stems(stems, 1.5, seed=0)


def test_folder_dataset_items(tmp_path):
    root = make_folder_dataset(tmp_path, n=5, num_classes=3, suffix=".png")
    images = index_images(root / "images")
    ds = FolderDataset(images, ["img_001", "img_003"], root / "masks", num_classes=3)
    item = ds[1]
    assert item["name"] == "img_003"
    np.testing.assert_array_equal(item["mask"].numpy(), np.array(Image.open(root / "masks" / "img_003.png")))


def test_list_files_accept_stems_or_file_names(tmp_path):
    (tmp_path / "l.txt").write_text("a\nb.jpg\n\n c.png \n")
    assert read_stem_list(tmp_path / "l.txt") == ["a", "b", "c"]
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"e\.txt is empty"):
        read_stem_list(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        read_stem_list(tmp_path / "missing.txt")


def test_errors_name_the_problem(tmp_path):
    root = make_folder_dataset(tmp_path, n=3)
    images = index_images(root / "images")
    with pytest.raises(FileNotFoundError, match=r"lists 1 stem\(s\) with no image .*: ghost"):
        FolderDataset(images, ["img_000", "ghost"], root / "masks", 3, source="train.txt")
    (root / "masks" / "img_001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)mask files.*img_001\.png"):
        FolderDataset(images, ["img_000", "img_001"], root / "masks", 3)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "img_000.png")
    with pytest.raises(ValueError, match=r"share the stem 'img_000'"):
        index_images(root / "images")
    with pytest.raises(FileNotFoundError, match=r"Image folder not found: .*nope"):
        index_images(root / "nope")
