"""Evaluation loaders: images of different sizes in one batch stop with the images, sizes and remedy."""

from __future__ import annotations

import pytest

from deeplab_lit.data import FolderDataModule
from tests.fakes import make_folder_dataset


def test_val_batch_of_different_sizes_names_images_sizes_and_remedy(tmp_path):
    root = make_folder_dataset(tmp_path, n=8)  # every image its own size
    dm = FolderDataModule(str(root), ["a", "b", "c"], val_fraction=0.5, val_batch_size=2, num_workers=0)
    dm.val_dataset = dm.build_split(
        "val", dm.eval_transform()
    )  # no setup: its start-up check would stop first
    names = dm.val_dataset.names[:2]
    sizes = [tuple(dm.val_dataset[i]["image"].shape[-1:-3:-1]) for i in range(2)]  # (W, H)
    listed = ", ".join(f"{name} \\({w}x{h}\\)" for name, (w, h) in zip(names, sizes, strict=True))
    with pytest.raises(
        ValueError, match=rf"Cannot batch 2 validate images .*: {listed}\..*val_batch_size: 1"
    ):
        next(iter(dm.val_dataloader()))
