"""Training/eval pipelines: crop size, padding with the ignore label and the mean pixel, normalisation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from deeplab_lit.data.transforms import augmentation_seed, eval_transform, seed_worker, train_transform
from deeplab_lit.normalization import CAFFE_BGR, IMAGENET


def _sample(h=20, w=30, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 5, (h, w), dtype=np.uint8)


def test_train_output_is_crop_size_and_pads_mask_with_255():
    image, mask = _sample(20, 30)
    transform = train_transform(crop_size=41, scale_range=(1.0, 1.0), seed=0)
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 41, 41) and out_image.dtype == torch.float32
    assert out_mask.shape == (41, 41) and out_mask.dtype == torch.int64
    assert (out_mask[20:, :] == 255).all() and (out_mask[:, 30:] == 255).all()  # padded bottom/right
    assert (out_mask[:20, :30] < 5).all()  # original pixels kept (scale 1, crop covers all)
    # padded image pixels hold the mean pixel, i.e. about 0 after normalisation
    assert out_image[:, 20:, :].abs().max() < 0.02


def test_train_scales_and_crops_bigger_images():
    image, mask = _sample(60, 90)
    transform = train_transform(crop_size=33, scale_range=(0.5, 2.0), seed=1)
    for _ in range(5):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 33, 33) and out_mask.shape == (33, 33)
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, 4, 255}  # nearest-neighbour mask, no blends


def test_flip_and_scale_keep_image_and_mask_aligned():
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :8] = 1  # left band
    image = np.zeros((32, 32, 3), np.uint8)
    image[mask == 1] = 255
    transform = train_transform(crop_size=32, scale_range=(1.0, 1.0), seed=3)
    flips = set()
    for _ in range(12):
        out_image, out_mask = transform(image, mask)
        bright = out_image[0] > 0
        assert torch.equal(bright, out_mask == 1)
        flips.add(bool(out_mask[0, -1] == 1))
    assert flips == {True, False}  # both flipped and unflipped seen


def test_eval_keeps_size_and_matches_normalization():
    image, mask = _sample(17, 23)
    out_image, out_mask = eval_transform(IMAGENET)(image, mask)
    assert out_image.shape == (3, 17, 23) and out_mask.shape == (17, 23)
    expected = IMAGENET.normalize(torch.from_numpy(image).permute(2, 0, 1))
    torch.testing.assert_close(out_image, expected)
    # albumentations hands over a channels-first view of HWC pixels; a strided output would make the
    # element-wise normalisation and the DataLoader's collate of 513x513 crops ~2x slower
    assert out_image.is_contiguous()
    assert torch.equal(out_mask, torch.from_numpy(mask).long())
    bgr_image, _ = eval_transform(CAFFE_BGR)(image, mask)
    torch.testing.assert_close(CAFFE_BGR.denormalize(bgr_image), torch.from_numpy(image).permute(2, 0, 1))
    assert torch.allclose(
        bgr_image[0], torch.from_numpy(image[..., 2]).float() - CAFFE_BGR.mean[2]
    )  # BGR order
    assert eval_transform()(image)[1] is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop_size"):
        train_transform(crop_size=0)
    with pytest.raises(ValueError, match="scale_range"):
        train_transform(crop_size=8, scale_range=(2.0, 0.5))


def test_transform_pickles_and_seed_reproduces():
    image, mask = _sample(50, 50)
    a = train_transform(25, seed=7)
    b = pickle.loads(pickle.dumps(train_transform(25, seed=7)))
    for _ in range(3):
        assert torch.equal(a(image, mask)[1], b(image, mask)[1])


class _Same(Dataset):
    """One image many times: any difference between items comes from the augmentation."""

    def __init__(self):
        self.transform = train_transform(16, scale_range=(0.5, 2.0), seed=0)
        self.image, self.mask = _sample(40, 40)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(self.image, self.mask)[1]


def test_workers_get_different_augmentation_streams():
    loader = DataLoader(_Same(), batch_size=1, num_workers=2, worker_init_fn=seed_worker)
    crops = [m[0] for m in loader]
    # items 0 and 1 come from different workers, each its first sample: without reseeding they'd be equal
    assert not torch.equal(crops[0], crops[1])


def test_random_scale_keeps_aspect_ratio_within_range():
    image = np.full((20, 40, 3), 128, np.uint8)
    mask = np.ones((20, 40), np.uint8)
    transform = train_transform(crop_size=100, scale_range=(0.5, 2.0), seed=5)
    scales = []
    for _ in range(20):
        _, out_mask = transform(image, mask)
        rows = int((out_mask == 1).any(1).sum())
        cols = int((out_mask == 1).any(0).sum())
        assert abs(cols - 2 * rows) <= 1  # one scale factor for both sides
        scales.append(rows / 20)
    assert 0.5 - 0.05 <= min(scales) and max(scales) <= 2.0 + 0.05 and max(scales) - min(scales) > 0.5


def test_ddp_ranks_get_different_augmentation_seeds(monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    seeds = {}
    for rank in (0, 1):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        seeds[rank] = augmentation_seed(1234)
        assert augmentation_seed(1234) == seeds[rank]  # deterministic per (seed, rank)
    assert seeds[0] != seeds[1]
    crops = {
        r: train_transform(16, scale_range=(0.5, 2.0), seed=s)(*_sample(40, 40))[1] for r, s in seeds.items()
    }
    assert not torch.equal(crops[0], crops[1])
