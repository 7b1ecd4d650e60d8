"""The one checked comparison of a file's state dict with a module's (used by ImageNet init and weights:)."""

import torch
from torch import nn

from deeplab_lit.weights.state_dicts import compare_state


def test_compare_state_fills_batch_counts_and_finds_missing_unexpected_and_wrong_shapes():
    """Old files lack num_batches_tracked (filled); skipped/ignored keys are not reported; shapes compared."""
    expected = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).state_dict()
    state = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    state["0.weight"] = torch.zeros(5, 3, 3, 3)
    del state["1.bias"]
    state["stray.weight"] = torch.zeros(1)
    report = compare_state(expected, state)
    assert report.state["1.num_batches_tracked"] is expected["1.num_batches_tracked"]
    assert report.missing == ["1.bias"] and report.unexpected == ["stray.weight"]
    assert report.wrong_shapes == ["0.weight"]
    assert report.shapes(expected) == ["0.weight: (5, 3, 3, 3) vs (4, 3, 3, 3)"]
    quiet = compare_state(expected, state, skip={"1.bias"}, ignore=lambda key: key.startswith("stray."))
    assert quiet.missing == [] and quiet.unexpected == [] and quiet.wrong_shapes == ["0.weight"]
