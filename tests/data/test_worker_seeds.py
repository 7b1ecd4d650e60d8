"""seed_worker reseeds every transform of a worker's dataset, also inside (nested) ConcatDatasets."""

from __future__ import annotations

import shutil

import torch
from torch.utils.data import ConcatDataset, DataLoader

from deeplab_lit.data import CityscapesDataModule
from deeplab_lit.data.cityscapes import CityscapesDataset
from deeplab_lit.data.transforms import seed_worker
from tests.fakes import make_cityscapes


def _one_frame_twice(tmp_path) -> CityscapesDataModule:
    """Cityscapes with one frame in train and the same frame again in val: equal items, unequal crops."""
    root = make_cityscapes(tmp_path, {"train": 1})
    for folder in ("leftImg8bit", "gtFine"):
        shutil.copytree(root / folder / "train", root / folder / "val")
    return CityscapesDataModule(
        str(root), train_split="trainval", batch_size=1, crop_size=16, num_workers=2, persistent_workers=False
    )


def _first_draw_of_each_worker(loader: DataLoader) -> list[torch.Tensor]:
    """Batch ``k`` comes from worker ``k % 2``: with two items, each worker's first augmentation."""
    return [batch["image"][0] for batch in loader]


def test_two_workers_draw_different_crops_from_cityscapes_trainval(tmp_path):
    dm = _one_frame_twice(tmp_path)
    dm.train_dataset = dm.build_split("train", dm.train_transform(seed=0))  # the real trainval split
    assert isinstance(dm.train_dataset, ConcatDataset) and not hasattr(dm.train_dataset, "transform")
    first, second = _first_draw_of_each_worker(dm.train_dataloader())
    assert not torch.equal(first, second)  # one shared stream would crop the one frame the same way twice


def test_nested_concat_datasets_with_their_own_transforms_are_all_reseeded(tmp_path):
    dm = _one_frame_twice(tmp_path)
    parts = [CityscapesDataset(dm.root, split, dm.train_transform(seed=0)) for split in ("train", "val")]
    nested = ConcatDataset(
        [ConcatDataset([parts[0]]), parts[1]]
    )  # equal seeds: equal streams unless reseeded
    loader = DataLoader(nested, batch_size=1, num_workers=2, worker_init_fn=seed_worker)
    first, second = _first_draw_of_each_worker(loader)
    assert not torch.equal(first, second)
