"""The DDP evaluation sampler: every image exactly once over the processes (tests/integration/test_ddp.py
runs it in two real processes)."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from deeplab_lit.data.loaders import UnrepeatedDistributedSampler, unrepeated_eval_sampler


@pytest.mark.parametrize(("images", "processes"), [(5, 2), (7, 3), (4, 4), (9, 1)])
def test_shards_cover_every_image_once_in_order(images, processes):
    dataset = TensorDataset(torch.arange(images))
    shards = [list(UnrepeatedDistributedSampler(dataset, processes, rank)) for rank in range(processes)]
    assert sorted(i for shard in shards for i in shard) == list(range(images))  # none twice, none missing
    assert shards[0] == list(range(0, images, processes))  # in order, strided like torch's sampler
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for rank, shard in enumerate(shards):
        sampler = UnrepeatedDistributedSampler(dataset, processes, rank)
        assert len(sampler) == len(shard)
        assert len(DataLoader(dataset, batch_size=2, sampler=sampler)) == -(-len(shard) // 2)


def test_is_a_distributed_sampler_so_lightning_keeps_it():
    assert isinstance(UnrepeatedDistributedSampler(TensorDataset(torch.arange(3)), 2, 0), DistributedSampler)


def test_torchs_sampler_would_repeat_an_image():
    """Why the sampler exists: torch's pads 5 images over 2 processes to 6."""
    dataset = TensorDataset(torch.arange(5))
    padded = [i for rank in range(2) for i in DistributedSampler(dataset, 2, rank, shuffle=False)]
    assert len(padded) == 6


def test_a_process_without_any_image_is_refused():
    with pytest.raises(ValueError, match="2 images for 3 processes: process 2 would get none"):
        UnrepeatedDistributedSampler(TensorDataset(torch.arange(2)), 3, 2)


def test_not_distributed_means_no_sampler():
    assert unrepeated_eval_sampler(TensorDataset(torch.arange(3))) is None
